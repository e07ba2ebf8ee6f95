"""``data.exclude_file`` (a sample mask by global index) and ``train.init_weights``: the
training stream never yields excluded samples, on any rank; bad files are one line."""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from distnoisy.config import load_config
from distnoisy.core.errors import ConfigError
from distnoisy.data.shards import read_manifest
from distnoisy.data.stream import KeptSubset, TrainStream, make_transform
from distnoisy.data.stream.sampling import read_index_file
from distnoisy.train import train


def _epoch_indices(manifest, world, excluded, split, epoch=0, global_batch=32):
    """Indices every simulated rank yields in one epoch, and each rank's step count."""
    per_rank, steps = [], []
    for rank in range(world):
        s = TrainStream(
            manifest,
            rank=rank,
            world_size=world,
            local_batch_size=global_batch // world,
            seed=3,
            split=split,
            transform=make_transform("digits", [0.0], [1.0]),
            shuffle_buffer=64,
            balanced=KeptSubset(manifest.num_samples, excluded),
        )
        got = [int(i) for batch in s.epoch_batches(epoch) for i in batch["index"]]
        per_rank.append(got)
        steps.append(s.steps_per_epoch)
    return per_rank, steps


@pytest.mark.parametrize("split", ["sample", "shard"])
def test_excluded_samples_are_never_yielded_on_any_rank(digits_root, split):
    m = read_manifest(digits_root / "train")
    n = m.num_samples
    excluded = np.random.default_rng(0).choice(n, size=n // 3, replace=False)
    kept = n - len(np.unique(excluded))
    seen = {}
    for world in (1, 2):
        per_rank, steps = _epoch_indices(m, world, excluded, split)
        assert steps == [kept // 32] * world  # from the kept count, equal on all ranks
        together = np.concatenate(per_rank)
        assert not np.isin(together, excluded).any()
        if split == "sample":  # ("shard": a rank short of samples reads some twice)
            assert len(np.unique(together)) == len(together)
        seen[world] = set(together.tolist())
    if split == "sample":  # one global order: 1 and 2 ranks train on exactly the same samples
        assert seen[1] == seen[2]
    # Only the floor's remainder of the kept samples is left out of an epoch.
    assert len(seen[1]) == (kept // 32) * 32


def test_index_files_npy_and_parquet_and_bad_ones(tmp_path):
    np.save(tmp_path / "ok.npy", np.array([3, 1, 3]))
    pq.write_table(pa.table({"index": [0, 9]}), tmp_path / "ok.parquet")
    assert read_index_file(str(tmp_path / "ok.npy"), 10).tolist() == [3, 1, 3]
    assert read_index_file(str(tmp_path / "ok.parquet"), 10).tolist() == [0, 9]
    np.save(tmp_path / "far.npy", np.array([2, 10]))
    np.save(tmp_path / "float.npy", np.array([0.5]))
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    cases = {
        "far.npy": "1 indices outside [0, 10) (e.g. 10)",
        "float.npy": "holds float64 values",
        "junk.npy": "cannot read it",
        "missing.npy": "no such file",
    }
    for name, message in cases.items():
        with pytest.raises(ConfigError, match=re.escape(message)):
            read_index_file(str(tmp_path / name), 10)


def _cfg(digits_root, tmp_path, *extra):
    return load_config(
        [
            f"data.root={digits_root}",
            f"output_dir={tmp_path / 'run'}",
            "tracking.enabled=false",
            "scaling.launcher=local",
            "scaling.num_workers=1",
            "train.epochs=1",
            *extra,
        ]
    )


def test_bad_exclude_and_init_files_fail_before_any_output(digits_root, tmp_path):
    np.save(tmp_path / "far.npy", np.array([0, 10**6]))
    torch.save({"other": {"w": torch.zeros(1)}}, tmp_path / "w.pt")
    cases = [
        (f"data.exclude_file={tmp_path / 'far.npy'}", "indices outside"),
        (f"train.init_weights={tmp_path / 'w.pt'}", "holds networks"),
        (f"train.init_weights={tmp_path / 'none.pt'}", "no such file"),
    ]
    for extra, message in cases:
        with pytest.raises(ConfigError, match=message) as e:
            train(_cfg(digits_root, tmp_path, extra))
        assert "\n" not in str(e.value)
        assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="cannot be combined"):
        _cfg(digits_root, tmp_path, "data.exclude_file=x.npy", "data.balanced_batches=2")
