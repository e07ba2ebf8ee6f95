"""The partitioned store: the same updates from 1, 2 or 4 gloo ranks give the same table as the
replicated store on one process (bit for bit: every update is row-wise), with prefetched reads,
float16 storage, duplicate writes, checkpoints across world sizes and staging mismatches."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distnoisy.core.errors import DistnoisyError
from distnoisy.store import FieldSpec, PartitionedStore, SampleStore, make_store

N, C, E, STEPS, BATCH = 103, 5, 3, 12, 16


def _specs() -> dict[str, FieldSpec]:
    return {
        "target": FieldSpec(shape=(C,), lowp=True),
        "hist": FieldSpec(shape=(E,), fill=float("nan"), lowp=True),
        "pred": FieldSpec(dtype=torch.int64, fill=-1),
        "small": FieldSpec(dtype=torch.int16, fill=-1),
    }


def _global_batch(step: int) -> torch.Tensor:
    """Distinct rows of one global step (what a sampler hands the ranks together). The last
    step's rows all belong to the first partition: the other ranks are asked for no rows (a
    batch the million-sample pipeline met after 3,120 steps)."""
    if step == STEPS - 1:
        return torch.arange(BATCH)
    g = torch.Generator().manual_seed(step)
    return torch.randperm(N, generator=g)[:BATCH]


def _run(store, rank: int, world: int) -> None:
    """A fixed sequence of ELR-like updates: read targets, blend, write targets, history, pred."""
    for step in range(STEPS):
        index = _global_batch(step).chunk(world)[rank] if world > 1 else _global_batch(step)
        store.prefetch(index)
        old = store.get("target", index)
        signal = torch.sin(index[:, None].double() * (step + 1) + torch.arange(C)).float()
        store.stage("target", index, 0.7 * old + 0.3 * signal)
        store.stage("hist", index, signal[:, 0], column=step % E)
        store.stage("pred", index, signal.argmax(1) + 10 * step)
        store.stage("small", index, (signal.argmax(1) - step).to(torch.int16))
        store.flush()
    # A duplicate row in one flush: the highest rank wins, whatever the backend.
    store.set("pred", torch.tensor([3]), torch.tensor([1000 + rank]))


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-equal values, dtype and shape, NaN equal to NaN (unvisited history entries)."""
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.isnan(), b.isnan())
        and (
            torch.equal(a[~a.isnan()], b[~b.isnan()])
            if a.is_floating_point()
            else torch.equal(a, b)
        )
    )


def _reference(dtype: str) -> dict[str, torch.Tensor]:
    store = make_store(N, _specs(), backend="replicated", dtype=dtype)
    _run(store, 0, 1)
    return store.state_dict()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    for backend in ("replicated", "partitioned"):
        for dtype in ("float32", "float16"):
            store = make_store(N, _specs(), backend=backend, dtype=dtype, world_size=world)
            _run(store, rank, world)
            state = store.state_dict()
            # A 1-process replicated checkpoint restores on W ranks, partitioned.
            other = make_store(N, _specs(), backend="partitioned", dtype=dtype, world_size=world)
            other.load_state_dict(_reference(dtype))
            lo, hi = other.owned_range()
            local = {k: v[lo:hi] for k, v in _reference(dtype).items()}
            same = all(_same(other.local(k), local[k]) for k in local)
            mean = other.mean("target")
            store.close()
            other.close()
            if rank == 0:
                torch.save(state, os.path.join(out_dir, f"{backend}-{dtype}.pt"))
            torch.save(
                {"same": torch.tensor(same), "mean": torch.tensor(mean)},
                os.path.join(out_dir, f"{backend}-{dtype}-rank{rank}-restore.pt"),
            )
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_same_table_from_1_2_and_4_ranks_both_backends(tmp_path, world) -> None:
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    for dtype in ("float32", "float16"):
        ref = _reference(dtype)
        # The winner of the duplicate write is the highest rank.
        assert ref["pred"][3] == 1000
        for backend in ("replicated", "partitioned"):
            got = torch.load(tmp_path / f"{backend}-{dtype}.pt", weights_only=True)
            assert set(got) == set(ref)
            for name in ref:
                expected = ref[name].clone()
                if name == "pred":
                    expected[3] = 1000 + world - 1
                assert _same(got[name], expected), (backend, dtype, name)
            for rank in range(world):
                flags = torch.load(
                    tmp_path / f"{backend}-{dtype}-rank{rank}-restore.pt", weights_only=True
                )
                assert bool(flags["same"])
                assert float(flags["mean"]) == pytest.approx(float(ref["target"].double().mean()))
    assert ref["target"].dtype == torch.float16 and ref["pred"].dtype == torch.int64


def test_one_process_partitioned_equals_replicated_and_float16_halves_bytes() -> None:
    ref = _reference("float32")
    store = make_store(N, _specs(), backend="partitioned")
    assert isinstance(store, PartitionedStore)
    _run(store, 0, 1)
    for name, t in store.state_dict().items():
        assert _same(t, ref[name]), name
    store.close()
    half = make_store(N, _specs(), backend="auto", dtype="float16")
    assert isinstance(half, SampleStore)  # one process never partitions
    assert half.bytes_per_sample() == {"target": 2 * C, "hist": 2 * E, "pred": 8, "small": 2}
    # get returns the declared dtype, the storage is float16
    assert half.get("target", torch.tensor([0])).dtype == torch.float32
    assert half["target"].dtype == torch.float16


def test_partitioned_get_must_read_the_prefetched_rows() -> None:
    store = make_store(N, _specs(), backend="partitioned")
    store.get("target", torch.tensor([1, 2]))
    store.prefetch(torch.tensor([4, 5]))
    with pytest.raises(DistnoisyError, match="other rows than the batch prefetched"):
        store.get("target", torch.tensor([5, 4]))
    store.close()


def _mismatch_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    store = make_store(4, {"a": FieldSpec(), "b": FieldSpec()}, backend="partitioned", world_size=2)
    store.stage("a", torch.tensor([rank]), torch.tensor([1.0]))
    if rank == 1:
        store.stage("b", torch.tensor([3]), torch.tensor([2.0]))
    store.flush()  # returns at once; the error comes with the next wait
    message = "no error"
    try:
        store.sync()
    except DistnoisyError as err:
        message = str(err)
    store.set("a", torch.tensor([2 * rank]), torch.tensor([5.0]))  # the store still works
    state = store.state_dict()
    store.close()
    if rank == 0:
        torch.save(state, os.path.join(out_dir, "state.pt"))
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        f.write(message)
    dist.destroy_process_group()


def test_partitioned_flush_fails_on_every_rank_when_ranks_stage_different_entries(tmp_path):
    mp.spawn(_mismatch_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        msg = (tmp_path / f"rank{rank}.txt").read_text()
        assert "ranks staged different entries" in msg and "nothing was written" in msg, msg
    assert "rank 1: 2 entries [a, b]" in (tmp_path / "rank1.txt").read_text()
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state["a"].tolist() == [5.0, 0.0, 5.0, 0.0] and not state["b"].any()


def test_redeclaring_a_nan_filled_field_is_idempotent() -> None:
    for backend in ("replicated", "partitioned"):
        store = make_store(3, {"g": FieldSpec(fill=float("nan"))}, backend=backend)
        store.declare("g", FieldSpec(fill=float("nan")))  # as a method's attach does
        with pytest.raises(ValueError, match="already declared"):
            store.declare("g", FieldSpec(fill=0.0))
        store.close()


def test_no_rows_read_and_written_on_both_backends() -> None:
    """A batch that leaves a rank nothing to read or write (a filtered subset, a rank's empty
    share) is [0, ...] in, [0, ...] out, and the table is unchanged."""
    for backend in ("replicated", "partitioned"):
        store = make_store(N, _specs(), backend=backend)
        before = store.state_dict()
        none = torch.zeros(0, dtype=torch.long)
        store.stage("target", none, torch.zeros(0, C))
        store.stage("hist", none, torch.zeros(0), column=1)
        store.flush()
        assert store.get("target", none).shape == (0, C)
        assert store.get("pred", none).shape == (0,)
        assert all(_same(before[k], v) for k, v in store.state_dict().items()), backend
        store.close()
