"""A partitioned store at rest: checkpoint parts written by each rank, restored on any number of
ranks and either backend; and a partitioned training run whose ranks write their own output
parts gives the same outputs as a replicated run, and resumes exactly from its parts."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_store_partitioned import N, _reference, _run, _same, _specs

from distnoisy.config import load_config
from distnoisy.core.errors import DistnoisyError
from distnoisy.finished.runs import open_run
from distnoisy.store import make_store
from distnoisy.store.parts import load_parts, part_file, save_part
from distnoisy.train import train


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _expected(world: int) -> dict[str, torch.Tensor]:
    """The table the updates of ``_run`` build on ``world`` ranks (float16 storage)."""
    ref = _reference("float16")
    ref["pred"][3] = 1000 + world - 1  # the duplicate write: the highest rank wins
    return ref


def _save_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    store = make_store(N, _specs(), backend="partitioned", dtype="float16", world_size=world)
    _run(store, rank, world)
    save_part(store, Path(out_dir), rank)
    store.close()
    dist.destroy_process_group()


def _load_worker(rank: int, world: int, port: int, parts_dir: str, parts: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    store = make_store(N, _specs(), backend="partitioned", dtype="float16", world_size=world)
    load_parts(store, Path(parts_dir), parts)
    lo, hi = store.owned_range()
    got = {name: store.local(name).clone() for name in store.specs}
    torch.save({"lo": lo, "hi": hi, "fields": got}, Path(parts_dir) / f"loaded-{rank}.pt")
    store.close()
    dist.destroy_process_group()


@pytest.mark.slow
def test_parts_of_two_ranks_restore_on_one_and_three_ranks_and_either_backend(tmp_path) -> None:
    mp.spawn(_save_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    expected = _expected(2)
    assert sorted(p.name for p in tmp_path.glob("store-part-*")) == [part_file(0), part_file(1)]
    # A part holds its owner's rows only (about N/W rows, not the table).
    part = torch.load(tmp_path / part_file(1), weights_only=True)
    assert (part["lo"], part["hi"]) == (52, N) and len(part["fields"]["target"]) == N - 52
    # One process, replicated backend: every row back.
    whole = make_store(N, _specs(), backend="replicated", dtype="float16")
    load_parts(whole, tmp_path, 2)
    for name in expected:
        assert _same(whole[name], expected[name]), name
    # Three ranks, partitioned: each rank reads the parts that overlap its rows.
    mp.spawn(_load_worker, args=(3, _free_port(), str(tmp_path), 2), nprocs=3, join=True)
    for rank in range(3):
        got = torch.load(tmp_path / f"loaded-{rank}.pt", weights_only=True)
        lo, hi = got["lo"], got["hi"]
        for name in expected:
            assert _same(got["fields"][name], expected[name][lo:hi]), (rank, name)


def test_missing_or_foreign_parts_are_one_line_errors(tmp_path) -> None:
    mp.spawn(_save_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    store = make_store(N, _specs(), backend="replicated", dtype="float16")
    with pytest.raises(DistnoisyError, match="missing"):
        load_parts(store, tmp_path, 3)  # a checkpoint of 3 parts without part 2
    other = make_store(N + 1, _specs(), backend="replicated", dtype="float16")
    with pytest.raises(DistnoisyError, match="another run"):
        load_parts(other, tmp_path, 2)


# -- a partitioned training run: rank-parallel outputs, checkpoint parts, resume ---------------
def _train(run_dir: Path, digits_root: Path, backend: str, *extra: str) -> dict:
    args = [
        f"data.root={digits_root}",
        f"output_dir={run_dir}",
        "train.epochs=2",
        "method.name=elr",
        "scaling.launcher=local",
        "scaling.num_workers=2",
        "data.split=sample",
        "tracking.enabled=false",
        f"store.backend={backend}",
        "store.top_k=50",
        *extra,
    ]
    return train(load_config(args))


def _assert_same_rows(a: dict[str, np.ndarray], b: dict[str, np.ndarray], what: str) -> None:
    """The same columns and, row by row in sample order, the same values (NaN equal NaN)."""
    assert list(a) == list(b), what
    oa, ob = np.argsort(a["index"], kind="stable"), np.argsort(b["index"], kind="stable")
    for name in a:
        ca, cb = a[name][oa], b[name][ob]
        if ca.dtype.kind == "f":
            np.testing.assert_array_equal(ca, cb, err_msg=f"{what}: {name}")
        else:
            assert np.array_equal(ca, cb), f"{what}: {name}"


def _assert_tables_equal(a: pa.Table, b: pa.Table, what: str) -> None:
    assert a.column_names == b.column_names, what
    for name in a.column_names:
        assert a.column(name).to_pylist() == b.column(name).to_pylist(), f"{what}: {name}"


@pytest.fixture(scope="module")
def partitioned(tmp_path_factory, digits_root) -> tuple[Path, dict]:
    """A finished partitioned run (2 ranks), shared by the tests below (they copy it to change
    it): its directory and summary."""
    run_dir = tmp_path_factory.mktemp("partitioned") / "par"
    return run_dir, _train(run_dir, digits_root, "partitioned")


@pytest.mark.slow
def test_partitioned_run_writes_its_parts_in_parallel_and_equals_a_replicated_run(
    tmp_path, digits_root, partitioned
) -> None:
    rep = _train(tmp_path / "rep", digits_root, "replicated")
    par_dir, par = partitioned
    assert par["store"]["backend"] == "partitioned"
    for key in ("test_acc", "memorized", "clean_train_acc", "label_issue_auroc",
                "label_issue_precision_at_k", "train_acc_given", "num_train_seen"):  # fmt: skip
        assert par[key] == rep[key], key
    # The checkpoint: state.pt without the store's rows, one part per rank beside it.
    last = sorted((par_dir / "checkpoints").glob("epoch=*"))[-1]
    state = torch.load(last / "state.pt", weights_only=True)
    assert state["store"] == {} and state["store_parts"] == 2
    assert (last / part_file(0)).exists() and (last / part_file(1)).exists()
    # The outputs: a part per rank, equal row for row to the replicated run's single files.
    for name in ("sample_stats", "label_issues"):
        parts = sorted(p.name for p in (par_dir / name).glob("part-*.parquet"))
        assert parts == ["part-00000.parquet", "part-00001.parquet"], name
    a, b = open_run(str(tmp_path / "rep")), open_run(str(par_dir))
    _assert_same_rows(a.read_table(), b.read_table(), "sample_stats")
    issues_b = b.read_table("label_issues.parquet")
    _assert_same_rows(a.read_table("label_issues.parquet"), issues_b, "label_issues")
    assert 0 < int(np.sum(issues_b["is_label_issue"])) < len(issues_b["index"])
    # The merged top-k is the replicated ranking's head, in the same order.
    top_a = pq.read_table(tmp_path / "rep" / "label_issues_top.parquet")
    top_b = pq.read_table(par_dir / "label_issues_top.parquet")
    assert top_b.num_rows == 50
    _assert_tables_equal(top_a, top_b, "label_issues_top")


@pytest.mark.slow
def test_partitioned_run_resumes_exactly_from_its_parts(tmp_path, digits_root, partitioned) -> None:
    straight_dir, straight = partitioned
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(straight_dir, resumed_dir)
    for name in ("summary.json", "sample_stats", "label_issues", "label_issues_top.parquet"):
        target = resumed_dir / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    shutil.rmtree(sorted((resumed_dir / "checkpoints").glob("epoch=*"))[-1])
    resumed = _train(resumed_dir, digits_root, "partitioned", "resume=true")
    for key in ("test_acc", "memorized", "label_issue_auroc"):
        assert resumed[key] == straight[key], key
    a, b = open_run(str(straight_dir)), open_run(str(resumed_dir))
    _assert_same_rows(a.read_table(), b.read_table(), "sample_stats")
