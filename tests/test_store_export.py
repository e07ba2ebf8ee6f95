"""The partitioned Parquet export: round trip, the old single-file layout, per-part ranking,
the merged top-k and the per-part flags equal to the whole-table ones."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from distnoisy.issues.ranking import flag_cut, flags_from_cut, is_label_issue, rank_by_score
from distnoisy.store import FieldSpec, make_store
from distnoisy.store.export import (
    LABEL_ISSUES_TOP,
    field_columns,
    iter_sample_stats,
    merge_top_k,
    rank_part,
    write_index,
    write_part,
    write_top_k,
)


def _parts(n: int, parts: int) -> list[tuple[int, int]]:
    per = -(-n // parts)
    return [(lo, min(lo + per, n)) for lo in range(0, n, per)]


def test_round_trip_of_a_partitioned_store_export(tmp_path) -> None:
    n = 37
    store = make_store(
        n,
        {"t": FieldSpec(shape=(3,), lowp=True), "p": FieldSpec(dtype=torch.int16, fill=-1)},
        dtype="float16",
    )
    index = torch.arange(0, n, 2)
    store.set("t", index, torch.rand(len(index), 3))
    store.set("p", index, (index % 5).to(torch.int16))
    out = tmp_path / "run" / "sample_stats"
    entries = []
    for k, (lo, hi) in enumerate(_parts(n, 4)):
        cols = {"index": pa.array(np.arange(lo, hi))}
        cols.update(field_columns({name: store[name][lo:hi] for name in ("t", "p")}))
        entries.append(write_part(out, k, pa.table(cols), lo))
    write_index(out, entries, pa.table(cols).schema)
    index_json = json.loads((out / "index.json").read_text())
    assert index_json["num_rows"] == n and [p["rows"] for p in index_json["parts"]] == [
        10,
        10,
        10,
        7,
    ]
    assert index_json["columns"]["p"] == "int16"
    batches = list(iter_sample_stats(tmp_path / "run", columns=["index", "t"], batch_rows=4))
    assert max(b.num_rows for b in batches) == 4  # read in bounded batches
    table = pa.Table.from_batches(batches)
    assert table.column_names == ["index", "t"]
    assert table.column("index").to_pylist() == list(range(n))
    got = np.asarray(table.column("t").to_pylist(), dtype=np.float32)
    assert np.array_equal(got, store["t"].float().numpy())  # float16 -> float32 exactly
    assert not list(out.glob(".*tmp*"))


def test_old_single_file_runs_are_read_too(tmp_path) -> None:
    store = make_store(5, {"x": FieldSpec()})
    store.set("x", torch.tensor([4]), torch.tensor([2.5]))
    store.export_parquet(tmp_path / "sample_stats.parquet")
    rows = pa.Table.from_batches(list(iter_sample_stats(tmp_path))).to_pydict()
    assert rows["x"] == [0, 0, 0, 0, 2.5] and rows["index"] == [0, 1, 2, 3, 4]
    with pytest.raises(FileNotFoundError, match="no per-sample stats"):
        next(iter_sample_stats(tmp_path / "nothing"))


def test_ranked_parts_merge_to_the_global_top_k_with_the_global_flags(tmp_path) -> None:
    rng = np.random.default_rng(1)
    n = 1000
    # two clusters (clean low, noisy high), ties and NaN included
    score = np.where(rng.random(n) < 0.3, rng.normal(3, 0.5, n), rng.normal(0, 0.5, n))
    score[::50] = 1.0
    score[7] = np.nan
    eligible = rng.random(n) > 0.05
    whole = is_label_issue(score, eligible)
    cut = flag_cut(score, eligible)
    directory = tmp_path / "label_issues"
    entries, schema = [], None
    for k, (lo, hi) in enumerate(_parts(n, 3)):
        idx = np.arange(lo, hi)
        flags = flags_from_cut(score[lo:hi], idx, eligible[lo:hi], cut)
        assert np.array_equal(flags, whole[lo:hi])
        table = rank_part(pa.table({"index": idx, "score": score[lo:hi], "is_label_issue": flags}))
        schema = table.schema
        entries.append(write_part(directory, k, table, lo))
    write_index(directory, entries, schema)
    order = rank_by_score(score)
    for k in (1, 10, 400, n, 5000):
        top = merge_top_k(directory, k)
        assert top.column("index").to_pylist() == order[:k].tolist()
    assert write_top_k(directory, tmp_path / LABEL_ISSUES_TOP, 25) == 25
    top = pq.read_table(tmp_path / LABEL_ISSUES_TOP)
    assert top.column("is_label_issue").to_pylist() == whole[order[:25]].tolist()


def test_flag_cut_edges() -> None:
    score = np.array([0.1, 0.1, 0.1, 0.1])
    assert flag_cut(score, num_issues=0) is None
    assert not flags_from_cut(score, np.arange(4), None, None).any()
    cut = flag_cut(score, num_issues=2)
    assert cut == (0.1, 1)
    assert flags_from_cut(score, np.arange(4), None, cut).tolist() == [True, True, False, False]
    nan = np.array([1.0, np.nan, np.nan])
    cut = flag_cut(nan, num_issues=2)
    assert flags_from_cut(nan, np.arange(3), None, cut).tolist() == [True, True, False]


def test_flag_cut_fitted_on_a_quantile_sketch_matches_the_full_fit() -> None:
    rng = np.random.default_rng(2)
    score = np.concatenate([rng.normal(0, 0.5, 7000), rng.normal(3, 0.5, 3000)])
    full = flag_cut(score)
    sketch = flag_cut(score, fit_at_most=2000)
    # The count from 2000 quantiles is within a few samples of the count from all 10,000.
    n_full = flags_from_cut(score, np.arange(len(score)), None, full).sum()
    n_sketch = flags_from_cut(score, np.arange(len(score)), None, sketch).sum()
    assert abs(int(n_full) - int(n_sketch)) <= 10 and 2900 < n_full < 3100
    assert flag_cut(score, fit_at_most=len(score)) == full  # no sketch: the exact cut


def test_reference_probs_read_from_a_partitioned_export(tmp_path) -> None:
    from distnoisy.methods.correction import read_reference_probs

    probs = np.random.default_rng(3).dirichlet(np.ones(4), size=11)
    out = tmp_path / "sample_stats"
    entries = []
    for k, (lo, hi) in enumerate(_parts(11, 3)):
        cols = {"index": pa.array(np.arange(lo, hi)), **field_columns({"final_prob": probs[lo:hi]})}
        entries.append(write_part(out, k, pa.table(cols), lo))
    write_index(out, entries, pa.table(cols).schema)
    assert np.array_equal(read_reference_probs(tmp_path), probs)
