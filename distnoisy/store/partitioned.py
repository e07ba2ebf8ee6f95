"""The partitioned store backend: each rank owns a contiguous range of about N/W rows.

The choice for large N (WebVision-1000 size: 2.4M x 1000 floats is 9.6 GB per field, too much to
replicate on every rank). Rank ``r`` owns rows ``[r * ceil(N/W), (r + 1) * ceil(N/W))``.

- **Reads** (:meth:`PartitionedStore.get`) send each requested index to its owner and bring the
  rows back: two ``all_to_all`` exchanges (indices out, rows back) plus one of counts. The
  trainer calls :meth:`PartitionedStore.prefetch` with a batch's indices before its forward
  pass; the rows of every field the method read in the previous step are then fetched while the
  forward runs, and the method's ``get`` finds them ready.
- **Writes** are staged as with the replicated backend and :meth:`PartitionedStore.flush` sends
  each row to its owner (one ``all_to_all``); the flush returns at once and the exchange runs
  while the next step computes.
- Both run on one communication thread with a process group of its own (gloo), in the order the
  calls were made, which is the same on every rank: a read issued after a flush sees that
  flush's writes, exactly as in the replicated backend, and the store's traffic never interleaves
  with DDP's all-reduces on the default group. A prefetch is valid until the next flush.
- Duplicate writes to a row within one flush keep the last writer (highest rank, then latest
  position), as in the replicated backend, so both backends build identical tables.
- Values are converted and copied to the CPU on the communication thread, not in the step.

Checkpoints hold one file per rank with the rows it owns (:mod:`distnoisy.store.parts`), written
in parallel; they restore on any number of ranks and with either backend.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist

from distnoisy.core.errors import DistnoisyError
from distnoisy.engine import collectives
from distnoisy.store.base import (
    FieldSpec,
    Staged,
    bytes_per_sample,
    check_rows,
    entry_name,
    from_bytes,
    last_occurrence,
    row_bytes,
    same_spec,
    signature,
    storage_spec,
    to_bytes,
)

#: Longest wait for one store exchange (a dead peer otherwise blocks until gloo's own timeout).
WAIT_TIMEOUT_S = 900.0
_HEAD = 16  # bytes of (entry id, row index) in front of each written row


class _CommThread:
    """One daemon thread that runs submitted calls in submission order."""

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[Future, Callable[..., Any], tuple] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="distnoisy-store", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        fut: Future = Future()
        self._queue.put((fut, fn, args))
        return fut

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            fut, fn, args = item
            try:
                fut.set_result(fn(*args))
            except BaseException as err:  # handed to the caller through the future
                fut.set_exception(err)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=WAIT_TIMEOUT_S)


def _wait(fut: Future) -> Any:
    try:
        return fut.result(timeout=WAIT_TIMEOUT_S)
    except TimeoutError:
        raise DistnoisyError(
            f"a per-sample store exchange did not finish in {WAIT_TIMEOUT_S:.0f} s: another "
            "worker probably died; the run restarts from its last checkpoint if "
            "scaling.max_failures allows"
        ) from None


class PartitionedStore:
    """Per-sample fields of ``num_samples`` rows, each rank holding its own row range.

    Parameters
    ----------
    num_samples
        N, the number of training samples.
    comm_device
        Unused (the store's exchanges run on the CPU over a gloo group of their own); accepted
        for the interface of :class:`~distnoisy.store.replicated.SampleStore`.
    float_dtype
        Storage dtype of the ``lowp`` float fields (``store.dtype``).
    """

    backend = "partitioned"

    def __init__(
        self,
        num_samples: int,
        comm_device: torch.device | str = "cpu",
        float_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.num_samples = int(num_samples)
        self.float_dtype = float_dtype
        self.world, self.rank = collectives.world_size(), collectives.rank()
        self.rows_per = max(1, -(-self.num_samples // self.world))
        self.lo = min(self.rank * self.rows_per, self.num_samples)
        self.hi = min(self.lo + self.rows_per, self.num_samples)
        # new_group is a collective of the default group: every rank builds its store together.
        self._group = tdist.new_group(backend="gloo") if collectives.is_distributed() else None
        self.specs: dict[str, FieldSpec] = {}
        self.kept: dict[str, FieldSpec] = {}
        self.parts: dict[str, torch.Tensor] = {}
        self._staged: list[Staged] = []
        self._pending: list[Future] = []
        self._prefetch: tuple[torch.Tensor, list[str], Future] | None = None
        self._reads: list[str] = []  # fields read since the last prefetch, in order
        self._full: dict[str, torch.Tensor] | None = None
        self._comm = _CommThread()

    # -- schema -------------------------------------------------------------------------------
    def declare(self, name: str, spec: FieldSpec) -> None:
        """Create a field (idempotent for an identical spec); this rank allocates its rows."""
        if name in self.specs:
            if not same_spec(self.specs[name], spec):
                raise ValueError(f"store field {name!r} already declared as {self.specs[name]}")
            return
        kept = storage_spec(spec, self.float_dtype)
        self.specs[name], self.kept[name] = spec, kept
        self.parts[name] = torch.full((self.hi - self.lo, *kept.shape), kept.fill, dtype=kept.dtype)

    def __contains__(self, name: str) -> bool:
        return name in self.specs

    def bytes_per_sample(self) -> dict[str, int]:
        """Bytes per sample of each field as stored (a rank holds about N/W samples)."""
        return bytes_per_sample(self.specs, self.float_dtype)

    def owned_range(self) -> tuple[int, int]:
        """The global rows ``[lo, hi)`` this rank holds."""
        return self.lo, self.hi

    def local(self, name: str) -> torch.Tensor:
        """This rank's rows of a field (after every queued write has been applied)."""
        self.sync()
        return self.parts[name]

    def __getitem__(self, name: str) -> torch.Tensor:
        """The whole field: only on rank 0 after :meth:`materialize` (a collective)."""
        self.sync()
        if self.world == 1:
            return self.parts[name]
        if self._full is None or name not in self._full:
            raise DistnoisyError(
                f"store field {name!r} is partitioned over {self.world} ranks: read this rank's "
                "rows with store.local(name), or gather the field to rank 0 with "
                "store.materialize() on every rank first"
            )
        return self._full[name]

    # -- reads ----------------------------------------------------------------------------------
    def prefetch(self, index: torch.Tensor) -> None:
        """Start reading rows ``index`` of the fields the previous step read (a collective)."""
        self._check()
        names, self._reads = list(self._reads), []
        self._prefetch = None
        if names:
            index = index.detach().cpu().long()
            self._prefetch = (index, names, self._comm.submit(self._read, names, index))

    def get(self, name: str, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` of a field, in its declared dtype (a collective: every rank reads the
        same fields in the same order, as with ``stage``)."""
        if name not in self.specs:
            raise KeyError(f"store field {name!r} was not declared; declared: {list(self.specs)}")
        if name not in self._reads:
            self._reads.append(name)
        if self._prefetch is not None and name in self._prefetch[1]:
            pre_index, names, fut = self._prefetch
            if not torch.equal(pre_index, index.detach().cpu().long()):
                raise DistnoisyError(
                    f"store.get({name!r}) asked for other rows than the batch prefetched; "
                    "a method must read the rows of its batch (batch.index)"
                )
            return _wait(fut)[names.index(name)].clone()  # a copy, as the replicated get
        self._check()
        return _wait(self._comm.submit(self._read, [name], index.detach().cpu().long()))[0]

    def _read(self, names: list[str], index: torch.Tensor) -> list[torch.Tensor]:
        owner = index // self.rows_per
        order = torch.argsort(owner, stable=True)
        counts = torch.bincount(owner, minlength=self.world).tolist()
        asked, asked_counts = self._exchange(index[order], counts)
        local = asked - self.lo
        payload = torch.cat([to_bytes(self.parts[n][local]) for n in names], dim=1)
        rows, _ = self._exchange(payload, asked_counts, counts)
        out = torch.empty_like(rows)
        out[order] = rows
        values, start = [], 0
        for n in names:
            width = row_bytes(self.kept[n])
            raw = out[:, start : start + width]
            values.append(from_bytes(raw, self.kept[n].dtype, self.kept[n].shape))
            values[-1] = values[-1].to(self.specs[n].dtype)
            start += width
        return values

    # -- writes ---------------------------------------------------------------------------------
    def stage(
        self, name: str, index: torch.Tensor, values: torch.Tensor, column: int | None = None
    ) -> None:
        """Queue a write of ``values`` to rows ``index`` (``column``: one entry of a vector
        field); it is sent to the owners at the next :meth:`flush`. No host copy here."""
        if name not in self.specs:
            raise KeyError(f"store field {name!r} was not declared; declared: {list(self.specs)}")
        shape = self.kept[name].shape if column is None else ()
        if tuple(values.shape) not in ((len(index), *shape), (len(index),) * (shape == ())):
            raise ValueError(
                f"store.stage({name!r}): values of shape {tuple(values.shape)} for "
                f"{len(index)} rows of {'one column' if column is not None else 'shape'} "
                f"{shape}"
            )
        self._staged.append(Staged(name, index.detach(), values.detach(), column))

    def flush(self) -> None:
        """Send the staged writes to their owners (a collective; returns without waiting)."""
        self._check()
        staged, self._staged = self._staged, []
        self._prefetch = None  # it was read before these writes
        self._full = None
        self._pending.append(self._comm.submit(self._write, staged))

    def set(
        self, name: str, index: torch.Tensor, values: torch.Tensor, column: int | None = None
    ) -> None:
        """Stage and flush at once (a collective: every rank must call it)."""
        self.stage(name, index, values, column)
        self.flush()

    def sync(self) -> None:
        """Wait until every queued write is applied; raise the first exchange error."""
        pending, self._pending = self._pending, []
        for fut in pending:
            _wait(fut)

    def _check(self) -> None:
        """Raise the error of a finished write (without waiting for the unfinished ones)."""
        for fut in self._pending:
            if fut.done() and fut.exception() is not None:
                self.sync()
        self._pending = [f for f in self._pending if not f.done()]

    def _pack(self, staged: list[Staged]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``[entry id, index, value bytes, padding]`` (uint8) and each row's owner."""
        widths = [
            row_bytes(self.kept[s.name]) // (1 if s.column is None else _cols(s, self))
            for s in staged
        ]
        width = _HEAD + max(widths, default=0)
        rows, owners = [], []
        for e, s in enumerate(staged):
            idx = s.index.cpu().long()
            head = to_bytes(torch.stack([torch.full_like(idx, e), idx], dim=1))
            body = to_bytes(s.values.cpu().to(self.kept[s.name].dtype))  # [n, row bytes]
            pad = torch.zeros((len(idx), width - _HEAD - body.shape[1]), dtype=torch.uint8)
            rows.append(torch.cat([head, body, pad], dim=1))
            owners.append(idx // self.rows_per)
        if not rows:
            return torch.zeros((0, width), dtype=torch.uint8), torch.zeros(0, dtype=torch.long)
        return torch.cat(rows), torch.cat(owners)

    def _write(self, staged: list[Staged]) -> None:
        rows, owners = self._pack(staged)
        order = torch.argsort(owners, stable=True)
        counts = torch.bincount(owners, minlength=self.world).tolist()
        got, _ = self._exchange(rows[order], counts, sig=(signature(staged), staged))
        head = from_bytes(got[:, :_HEAD], torch.int64, (2,))
        for e, s in enumerate(staged):
            block = got[head[:, 0] == e]
            if len(block) == 0:
                continue
            index = head[head[:, 0] == e, 1]
            keep = last_occurrence(index)
            index, block = index[keep] - self.lo, block[keep]
            kept = self.kept[s.name]
            target = self.parts[s.name]
            if s.column is None:
                body = block[:, _HEAD : _HEAD + row_bytes(kept)]
                target[index] = from_bytes(body, kept.dtype, kept.shape)
            else:
                size = target.element_size()
                target[index, s.column] = from_bytes(block[:, _HEAD : _HEAD + size], kept.dtype, ())

    # -- the exchange ---------------------------------------------------------------------------
    def _exchange(
        self,
        send: torch.Tensor,
        send_counts: list[int],
        recv_counts: list[int] | None = None,
        sig: tuple[tuple[int, int], list[Staged]] | None = None,
    ) -> tuple[torch.Tensor, list[int]]:
        """``all_to_all`` of rows grouped by destination rank; returns the rows received (in
        source rank order) and how many came from each rank. With ``sig``, the counts travel
        with each rank's staging signature and a mismatch raises before any row moves."""
        if self._group is None:
            return send, send_counts
        if recv_counts is None:
            mine = sig[0] if sig else (0, 0)
            out = torch.tensor([[c, *mine] for c in send_counts], dtype=torch.long)
            back = torch.empty_like(out)
            tdist.all_to_all_single(back, out, group=self._group)
            if sig and (back[:, 1:] != torch.tensor(mine)).any():
                self._raise_mismatch(sig[1], back)
            recv_counts = back[:, 0].tolist()
        recv = torch.empty((sum(recv_counts), *send.shape[1:]), dtype=send.dtype)
        tdist.all_to_all_single(
            recv,
            send.contiguous(),
            output_split_sizes=recv_counts,
            input_split_sizes=send_counts,
            group=self._group,
        )
        return recv, recv_counts

    def _raise_mismatch(self, staged: list[Staged], peers: torch.Tensor) -> None:
        names = ", ".join(entry_name(s) for s in staged)
        others = "; ".join(
            f"rank {r}: {int(c)} entries" for r, (_, c, _) in enumerate(peers.tolist())
        )
        raise DistnoisyError(
            f"SampleStore.flush: ranks staged different entries (rank {self.rank}: "
            f"{len(staged)} entries [{names}]; {others}). Every rank must stage the same fields, "
            "columns and order each step (only the rows may differ); nothing was written"
        )

    # -- whole fields ---------------------------------------------------------------------------
    def mean(self, name: str) -> float:
        """Mean of a field over all rows and entries (a collective)."""
        self.sync()
        part = self.parts[name].double()
        local = torch.tensor([float(part.sum()), float(part.numel())], dtype=torch.float64)
        if self._group is not None:
            _wait(self._comm.submit(tdist.all_reduce, local, tdist.ReduceOp.SUM, self._group))
        return float(local[0] / local[1]) if local[1] else float("nan")

    def _gather(self, name: str) -> torch.Tensor | None:
        """The whole field on rank 0 (None elsewhere): partitions padded to ``rows_per``, sent
        as bytes (gloo gathers no int16 or bfloat16)."""
        part = self.parts[name]
        if self._group is None:
            return part.clone()
        pad = torch.zeros((self.rows_per - len(part), *part.shape[1:]), dtype=part.dtype)
        mine = to_bytes(torch.cat([part, pad]))
        parts = [torch.empty_like(mine) for _ in range(self.world)] if self.rank == 0 else None
        tdist.gather(mine, parts, dst=0, group=self._group)
        if parts is None:
            return None
        whole = torch.cat(parts)[: self.num_samples]
        return from_bytes(whole, part.dtype, tuple(part.shape[1:]))

    def materialize(self) -> None:
        """Gather every field whole onto rank 0 (a collective; for the end-of-run outputs at
        the sizes a single process holds: web-scale exports go partition by partition)."""
        self.sync()
        full = {n: _wait(self._comm.submit(self._gather, n)) for n in self.specs}
        self._full = full if self.rank == 0 else None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every field whole on rank 0, ``{}`` elsewhere (a collective: call on every rank)."""
        self.materialize()
        return {n: t.clone() for n, t in (self._full or {}).items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Keep this rank's rows of whole fields (a checkpoint of either backend)."""
        for name, t in state.items():
            if name in self.kept and tuple(t.shape) != (self.num_samples, *self.kept[name].shape):
                raise ValueError(
                    f"checkpoint field {name!r} has shape {tuple(t.shape)}, expected "
                    f"{(self.num_samples, *self.kept[name].shape)}"
                )
        self.load_rows(state, 0)

    def load_rows(self, fields: dict[str, torch.Tensor], lo: int) -> None:
        """Keep the rows of ``[lo, lo + n)`` that this rank owns (a checkpoint part of any
        number of ranks, :mod:`distnoisy.store.parts`)."""
        self.sync()
        for name, t in fields.items():
            if name not in self.parts:
                continue  # a field a later version dropped
            check_rows(name, t, lo, self.num_samples, self.kept[name].shape)
            a, b = max(lo, self.lo), min(lo + len(t), self.hi)
            if a < b:
                self.parts[name][a - self.lo : b - self.lo].copy_(
                    t[a - lo : b - lo].to(self.parts[name].dtype)
                )
        self._prefetch, self._reads = None, []

    def close(self) -> None:
        """Apply the queued writes and stop the communication thread."""
        self.sync()
        self._comm.close()


def _cols(s: Staged, store: PartitionedStore) -> int:
    """Entries per row of a vector field (a column write sends one of them)."""
    shape = store.kept[s.name].shape
    return int(np.prod(shape, dtype=np.int64)) if shape else 1
