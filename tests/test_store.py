"""The per-sample store: local semantics, and replicas kept identical across a real gloo group."""

from __future__ import annotations

import os
import socket
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distnoisy.core.errors import DistnoisyError
from distnoisy.store import FieldSpec, SampleStore


def test_stage_flush_get_and_columns() -> None:
    store = SampleStore(6)
    store.declare("target", FieldSpec(shape=(3,)))
    store.declare("hist", FieldSpec(shape=(4,), fill=float("nan")))
    idx = torch.tensor([4, 1])
    store.stage("target", idx, torch.tensor([[0.1, 0.2, 0.7], [1.0, 0.0, 0.0]]))
    # Not visible before the flush: staged writes become global together.
    assert torch.equal(store.get("target", idx), torch.zeros(2, 3))
    store.stage("hist", idx, torch.tensor([2.5, 3.5]), column=2)
    store.flush()
    assert torch.allclose(
        store.get("target", torch.tensor([1, 4])), torch.tensor([[1.0, 0.0, 0.0], [0.1, 0.2, 0.7]])
    )
    assert store["hist"][4, 2] == 2.5 and store["hist"][1, 2] == 3.5
    assert torch.isnan(store["hist"][4, 0]) and torch.isnan(store["hist"][0, 2])


def test_duplicate_index_keeps_last_write() -> None:
    store = SampleStore(3)
    store.declare("x", FieldSpec())
    store.set("x", torch.tensor([2, 0, 2]), torch.tensor([1.0, 5.0, 9.0]))
    assert store["x"].tolist() == [5.0, 0.0, 9.0]


def test_int_fields_roundtrip_exactly() -> None:
    store = SampleStore(3)
    store.declare("pred", FieldSpec(dtype=torch.int64, fill=-1))
    store.set("pred", torch.tensor([1]), torch.tensor([2**40 + 3]))
    assert store["pred"].tolist() == [-1, 2**40 + 3, -1]


def test_state_dict_and_parquet_export(tmp_path) -> None:
    store = SampleStore(4)
    store.declare("t", FieldSpec(shape=(2,)))
    store.declare("s", FieldSpec())
    store.set("t", torch.tensor([3]), torch.tensor([[0.25, 0.75]]))
    other = SampleStore(4)
    other.declare("t", FieldSpec(shape=(2,)))
    other.declare("s", FieldSpec())
    other.load_state_dict(store.state_dict())
    assert torch.equal(other["t"], store["t"])
    wrong = SampleStore(5)
    wrong.declare("t", FieldSpec(shape=(2,)))
    with pytest.raises(ValueError, match="shape"):
        wrong.load_state_dict(store.state_dict())
    store.export_parquet(tmp_path / "s.parquet", extra={"key": np.array(["a", "b", "c", "d"])})
    table = pq.read_table(tmp_path / "s.parquet").to_pydict()
    assert table["index"] == [0, 1, 2, 3]
    assert table["key"] == ["a", "b", "c", "d"]
    assert table["t"][3] == [0.25, 0.75]
    assert not list(tmp_path.glob(".*tmp*"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _replica_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    store = SampleStore(8)
    store.declare("t", FieldSpec(shape=(2,)))
    store.declare("h", FieldSpec(shape=(3,)))
    # Step 1: disjoint rows; rank 1 writes index 5 which rank 0 never sees locally.
    idx = torch.tensor([0, 1]) if rank == 0 else torch.tensor([5, 6, 7])
    store.stage("t", idx, torch.full((len(idx), 2), float(rank + 1)))
    store.stage("h", idx, torch.full((len(idx),), 10.0 + rank), column=1)
    store.flush()
    # Step 2: both ranks write index 3; the highest rank wins on every replica.
    store.set("t", torch.tensor([3]), torch.tensor([[float(rank), -1.0]]))
    # Step 3: rank 1 has nothing to write (an uneven eval share) but still takes part.
    idx = torch.tensor([2]) if rank == 0 else torch.zeros(0, dtype=torch.long)
    store.set("t", idx, torch.full((len(idx), 2), 7.0))
    torch.save(store.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_replicas_identical_across_two_gloo_ranks(tmp_path) -> None:
    mp.spawn(_replica_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    s0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    s1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for name in s0:
        assert torch.equal(s0[name], s1[name]), name
    t = s0["t"]
    assert t[0].tolist() == [1.0, 1.0] and t[5].tolist() == [2.0, 2.0]
    assert t[3].tolist() == [1.0, -1.0]  # rank 1's write wins
    assert t[2].tolist() == [7.0, 7.0] and t[4].tolist() == [0.0, 0.0]
    assert s0["h"][6].tolist() == [0.0, 11.0, 0.0]


def _mismatch_worker(rank: int, world: int, port: int, out_dir: str, case: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    store = SampleStore(4)
    store.declare("a", FieldSpec())
    store.declare("b", FieldSpec())
    store.declare("h", FieldSpec(shape=(2,)))
    store.stage("a", torch.tensor([rank]), torch.tensor([1.0]))
    if rank == 1 and case == "extra":
        store.stage("b", torch.tensor([3]), torch.tensor([2.0]))
    if case == "column":
        store.stage("h", torch.tensor([rank]), torch.tensor([5.0]), column=rank)
    message = "no error"
    try:
        store.flush()
    except DistnoisyError as err:
        message = str(err)
    # Nothing was applied, and the group is still usable (no rank is stuck in a collective).
    dist.barrier()
    torch.save(store.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        f.write(message)
    dist.destroy_process_group()


@pytest.mark.parametrize("case", ["extra", "column"])
def test_flush_fails_clearly_when_ranks_stage_different_entries(tmp_path, case) -> None:
    ctx = mp.spawn(
        _mismatch_worker,
        args=(2, _free_port(), str(tmp_path), case),
        nprocs=2,
        join=False,
    )
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("a rank hung in flush after a staging mismatch")
    for rank in (0, 1):
        msg = (tmp_path / f"rank{rank}.txt").read_text()
        assert "ranks staged different entries" in msg, msg
        if case == "extra":
            assert "entry 1 (field b)" in msg and "rank 0: 1 entries [a]" in msg
            assert "rank 1: 2 entries [a, b]" in msg
        else:
            assert "field h[:, 0] vs h[:, 1]" in msg
        state = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert not any(t.any() for t in state.values())
