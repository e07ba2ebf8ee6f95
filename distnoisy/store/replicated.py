"""The replicated store backend: every rank holds every row (the choice for small N).

Design (measured choice for N <= a few million, see docs/benchmarks.md): every rank holds a
full replica of each field; writes are *staged* locally during a step and made global by
:meth:`SampleStore.flush`, a collective that gathers ``(index, values)`` from every rank and
applies them everywhere in rank order. Replicas therefore stay bit-identical without a server,
reads are local (no latency on the hot path), and a sample's state is the same whichever worker
visits it. The cost per step is three ``all_gather`` calls of B x (1 + columns) numbers,
negligible next to the gradient all-reduce. Memory: Clothing1M (N=1M, C=14, fp32) is 56 MB per
replica.

Rules that keep replicas identical:
- every rank calls :meth:`flush` the same number of times (the trainer does it once per step,
  and every rank runs the same number of steps);
- every rank stages the same entries (field, column) in the same order before a flush; only the
  rows differ. :meth:`flush` checks this with the all-reduce it already makes (entry count and a
  hash of the entry sequence, compared as max and min over ranks) and raises
  :class:`~distnoisy.core.errors.DistnoisyError` on every rank rather than mixing up fields;
- a sample written twice in one flush keeps the value of the last writer (highest rank, then
  latest position), so the merge is deterministic.

The store is saved in checkpoints (:meth:`state_dict`) and exported to Parquet for the later
phases (post-training, analysis, label-issue reports). :mod:`distnoisy.store.partitioned` is the
backend for large N (each rank owns a row range); both offer the same interface.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from distnoisy.core.errors import DistnoisyError
from distnoisy.engine import collectives
from distnoisy.store.base import (
    FieldSpec,
    Staged,
    bytes_per_sample,
    check_rows,
    entry_name,
    last_occurrence,
    same_spec,
    signature,
    storage_spec,
)


class SampleStore:
    """Per-sample fields of ``num_samples`` rows, replicated on every rank.

    Parameters
    ----------
    num_samples
        N, the number of training samples (rows are global sample indices 0..N-1).
    comm_device
        Device that collective buffers are moved to (``cuda`` under NCCL, ``cpu`` under gloo).
        The fields themselves stay on the CPU.
    float_dtype
        Storage dtype of the ``lowp`` float fields (``store.dtype``).
    """

    backend = "replicated"

    def __init__(
        self,
        num_samples: int,
        comm_device: torch.device | str = "cpu",
        float_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.num_samples = int(num_samples)
        self.comm_device = torch.device(comm_device)
        self.float_dtype = float_dtype
        self.fields: dict[str, torch.Tensor] = {}
        self.specs: dict[str, FieldSpec] = {}
        self._staged: list[Staged] = []

    # -- schema -------------------------------------------------------------------------------
    def declare(self, name: str, spec: FieldSpec) -> None:
        """Create a field (idempotent for an identical spec)."""
        if name in self.specs:
            if not same_spec(self.specs[name], spec):
                raise ValueError(f"store field {name!r} already declared as {self.specs[name]}")
            return
        self.specs[name] = spec
        kept = storage_spec(spec, self.float_dtype)
        self.fields[name] = torch.full((self.num_samples, *kept.shape), kept.fill, dtype=kept.dtype)

    def bytes_per_sample(self) -> dict[str, int]:
        """Bytes per sample of each field as stored (one replica)."""
        return bytes_per_sample(self.specs, self.float_dtype)

    def owned_range(self) -> tuple[int, int]:
        """The rows this rank answers for in reductions and exports (every row is here; the
        ranks split them evenly so that per-rank sums add up to each row once)."""
        n, w, r = self.num_samples, collectives.world_size(), collectives.rank()
        per = -(-n // w) if n else 0
        return min(r * per, n), min((r + 1) * per, n)

    def local(self, name: str) -> torch.Tensor:
        """Rows :meth:`owned_range` of a field (a view)."""
        lo, hi = self.owned_range()
        return self.fields[name][lo:hi]

    def prefetch(self, index: torch.Tensor) -> None:
        """Nothing to fetch: every row is local (the partitioned backend reads ahead here)."""

    def mean(self, name: str) -> float:
        """Mean of a field over all rows and entries (local: every row is here)."""
        return float(self.fields[name].double().mean())

    def sync(self) -> None:
        """Nothing to wait for: :meth:`flush` applies the writes before it returns."""

    def materialize(self) -> None:
        """Nothing to gather: every field is whole on every rank."""

    def close(self) -> None:
        """Nothing to stop (the partitioned backend stops its communication thread)."""

    def __contains__(self, name: str) -> bool:
        return name in self.fields

    def __getitem__(self, name: str) -> torch.Tensor:
        """The whole field (N x ...), e.g. for exports and end-of-run scores."""
        return self.fields[name]

    # -- reads and writes -----------------------------------------------------------------------
    def get(self, name: str, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` of a field (a copy, on the CPU, in the declared dtype)."""
        return self.fields[name][index.cpu()].to(self.specs[name].dtype)

    def stage(
        self, name: str, index: torch.Tensor, values: torch.Tensor, column: int | None = None
    ) -> None:
        """Queue a write of ``values`` to rows ``index`` (``column`` for one entry of a vector
        field, e.g. one epoch of a loss history). It becomes visible at the next :meth:`flush`."""
        if name not in self.fields:
            raise KeyError(f"store field {name!r} was not declared; declared: {list(self.fields)}")
        self._staged.append(
            Staged(name, index.detach().cpu().long(), values.detach().cpu(), column)
        )

    def set(
        self, name: str, index: torch.Tensor, values: torch.Tensor, column: int | None = None
    ) -> None:
        """Stage and flush at once (a collective: every rank must call it)."""
        self.stage(name, index, values, column)
        self.flush()

    def flush(self) -> None:
        """Gather every rank's staged writes and apply them on every rank (a collective)."""
        staged, self._staged = self._staged, []
        if not staged and collectives.world_size() == 1:
            return
        # One gather of all staged rows: each entry becomes a block of rows
        # [entry id, index, values...] in float64 (exact for float32 values and for integers
        # below 2**53), padded to a common width agreed on by all ranks.
        rows = []
        for entry_id, s in enumerate(staged):
            per_row = int(np.prod(s.values.shape[1:], dtype=np.int64))
            vals = s.values.reshape(len(s.index), per_row).to(torch.float64)
            ids = torch.full((len(s.index), 1), float(entry_id), dtype=torch.float64)
            rows.append(torch.cat([ids, s.index.to(torch.float64).unsqueeze(1), vals], dim=1))
        # One all-reduce (max) agrees on the padded width and checks the invariant that every
        # rank staged the same entries in the same order: each rank contributes its entry count
        # and a hash of the entries' (field, column) sequence, negated as well, so that max and
        # min over ranks come back together and must be equal.
        width = max((r.shape[1] for r in rows), default=2)
        sig = signature(staged)
        agreed = collectives.all_reduce_max(
            torch.tensor([width, *sig, *(-v for v in sig)], device=self.comm_device)
        ).tolist()
        width = int(agreed[0])
        if agreed[1:3] != [-v for v in agreed[3:5]]:
            self._raise_mismatch(staged)
        local = torch.zeros((0, width), dtype=torch.float64)
        if rows:
            local = torch.cat([torch.nn.functional.pad(r, (0, width - r.shape[1])) for r in rows])
        gathered = collectives.all_gather_cat(local.to(self.comm_device)).cpu()
        # All ranks staged the same entries in the same order (checked above), so entry ids
        # refer to the same (name, column) everywhere; apply them in entry order.
        for entry_id, s in enumerate(staged):
            block = gathered[gathered[:, 0] == entry_id]
            if len(block) == 0:
                continue
            index = block[:, 1].long()
            per_row = int(np.prod(s.values.shape[1:], dtype=np.int64))
            values = block[:, 2 : 2 + per_row]
            keep = last_occurrence(index)
            index, values = index[keep], values[keep]
            target = self.fields[s.name]
            if s.column is None:
                target[index] = values.reshape(len(index), *target.shape[1:]).to(target.dtype)
            else:
                target[index, s.column] = values.reshape(len(index)).to(target.dtype)

    @staticmethod
    def _raise_mismatch(staged: list[Staged]) -> None:
        """Fail on every rank, naming each rank's staged entries (only after a mismatch was
        seen by all ranks, so the extra collective here cannot hang)."""
        names = [entry_name(s) for s in staged]
        per_rank = collectives.all_gather_object(names)
        described = "; ".join(
            f"rank {r}: {len(e)} entries [{', '.join(e)}]" for r, e in enumerate(per_rank)
        )
        first = min(len(e) for e in per_rank)
        diverge = next(
            (i for i in range(first) if len({e[i] for e in per_rank}) > 1),
            first,
        )
        fields = sorted({e[diverge] for e in per_rank if diverge < len(e)})
        raise DistnoisyError(
            f"SampleStore.flush: ranks staged different entries, first differing at entry "
            f"{diverge} (field {' vs '.join(fields) or '(none)'}); {described}. Every rank must "
            "stage the same fields, columns and order each step (only the rows may differ); "
            "nothing was written"
        )

    # -- persistence ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every field, whole (call on every rank: the partitioned backend's is a collective)."""
        return {name: t.clone() for name, t in self.fields.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, t in state.items():
            if name not in self.fields:
                continue  # a field a later version dropped
            if t.shape != self.fields[name].shape:
                raise ValueError(
                    f"checkpoint field {name!r} has shape {tuple(t.shape)}, "
                    f"expected {tuple(self.fields[name].shape)}"
                )
            self.fields[name].copy_(t.to(self.fields[name].dtype))

    def load_rows(self, fields: dict[str, torch.Tensor], lo: int) -> None:
        """Put rows ``[lo, lo + n)`` of each field back (a checkpoint part, :mod:`.parts`)."""
        for name, t in fields.items():
            if name not in self.fields:
                continue  # a field a later version dropped
            check_rows(name, t, lo, self.num_samples, tuple(self.fields[name].shape[1:]))
            self.fields[name][lo : lo + len(t)].copy_(t.to(self.fields[name].dtype))

    def export_parquet(self, path: Path, extra: dict[str, np.ndarray] | None = None) -> None:
        """Write one row per sample (``index`` plus every field; vector fields as lists),
        atomically."""
        import pyarrow as pa

        from distnoisy.store.export import atomic_write_table, field_columns

        columns: dict[str, pa.Array] = {"index": pa.array(np.arange(self.num_samples))}
        for name, values in (extra or {}).items():
            columns[name] = pa.array(values)
        columns.update(field_columns(self.fields))
        atomic_write_table(pa.table(columns), Path(path))
