"""What every store backend shares: field specs, storage dtypes, staged writes, byte packing.

A field is declared once (by the run or by a method) with a :class:`FieldSpec`; a backend keeps
``N`` rows of it. Float fields that only feed targets and histories (``lowp=True``) may be kept
in float16 or bfloat16 (``store.dtype``), halving their memory; everything that must be exact
(integer predictions, counters) keeps its declared dtype.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, replace

import numpy as np
import torch

#: ``store.dtype``: storage of the low-precision-capable float fields.
FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class FieldSpec:
    """A per-sample field: ``shape`` is the per-row shape (``()`` for a scalar).

    ``lowp``: the field tolerates reduced-precision storage (ELR targets, loss histories,
    probabilities); ``store.dtype=float16|bfloat16`` then stores it in that dtype.
    """

    shape: tuple[int, ...] = ()
    dtype: torch.dtype = torch.float32
    fill: float = 0.0
    lowp: bool = False


def same_spec(a: FieldSpec, b: FieldSpec) -> bool:
    """Equal specs, a NaN fill equal to a NaN fill (a redeclared NaN-filled field is the same)."""
    fills = a.fill == b.fill or (np.isnan(a.fill) and np.isnan(b.fill))
    return fills and (a.shape, a.dtype, a.lowp) == (b.shape, b.dtype, b.lowp)


def storage_spec(spec: FieldSpec, float_dtype: torch.dtype) -> FieldSpec:
    """The spec a backend actually stores: ``float_dtype`` for a float32 ``lowp`` field."""
    if spec.lowp and spec.dtype == torch.float32:
        return replace(spec, dtype=float_dtype)
    return spec


def row_bytes(spec: FieldSpec) -> int:
    """Bytes one row of a field takes in memory."""
    per_row = int(np.prod(spec.shape, dtype=np.int64)) if spec.shape else 1
    return per_row * torch.empty((), dtype=spec.dtype).element_size()


def bytes_per_sample(specs: dict[str, FieldSpec], float_dtype: torch.dtype) -> dict[str, int]:
    """Bytes per sample of each field once stored (``store.dtype`` applied)."""
    return {name: row_bytes(storage_spec(s, float_dtype)) for name, s in specs.items()}


def check_rows(
    name: str, rows: torch.Tensor, lo: int, num_samples: int, row_shape: tuple[int, ...]
) -> None:
    """Rows ``[lo, lo + len(rows))`` of a checkpoint field must lie in ``[0, num_samples)`` and
    have the field's per-row shape (ValueError otherwise)."""
    if tuple(rows.shape[1:]) != tuple(row_shape) or not 0 <= lo <= num_samples - len(rows):
        raise ValueError(
            f"checkpoint field {name!r}: rows [{lo}, {lo + len(rows)}) of shape "
            f"{tuple(rows.shape[1:])} do not fit {num_samples} rows of shape {tuple(row_shape)}"
        )


@dataclass
class Staged:
    """One queued write: rows ``index`` of field ``name`` (one ``column`` of it, or all)."""

    name: str
    index: torch.Tensor
    values: torch.Tensor
    column: int | None


def entry_name(s: Staged) -> str:
    return s.name if s.column is None else f"{s.name}[:, {s.column}]"


def signature(staged: list[Staged]) -> tuple[int, int]:
    """``(count, crc32 of the entries' field and column sequence)`` of one rank's staged writes:
    equal on all ranks exactly when they staged the same entries in the same order (up to a
    hash collision)."""
    text = "\x00".join(entry_name(s) for s in staged)
    return len(staged), zlib.crc32(text.encode())


def last_occurrence(index: torch.Tensor) -> torch.Tensor:
    """Positions that keep, for each distinct index, its last occurrence (in order)."""
    idx = index.cpu().numpy()
    if len(np.unique(idx)) == len(idx):
        return torch.arange(len(idx))
    _, first_in_reversed = np.unique(idx[::-1], return_index=True)
    return torch.from_numpy(np.sort(len(idx) - 1 - first_in_reversed))


def to_bytes(t: torch.Tensor) -> torch.Tensor:
    """``[n, ...]`` -> ``[n, row bytes]`` uint8, a view of the same memory when contiguous:
    values travel bit-exactly whatever their dtype (float16, bfloat16, int64)."""
    # The row width from the shape, not -1: a rank asked for no rows sends [0, row bytes].
    flat = t.reshape(t.shape[0], math.prod(t.shape[1:])).contiguous()
    return flat.view(torch.uint8)


def from_bytes(raw: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`to_bytes`: ``[n, row bytes]`` uint8 -> ``[n, *shape]`` of ``dtype``."""
    # A fresh copy: a slice of packed rows may be misaligned for ``dtype`` or look contiguous
    # with a stale row stride (one row), which ``view`` rejects.
    own = torch.empty(raw.shape, dtype=torch.uint8)
    own.copy_(raw)
    return own.view(dtype).reshape(len(raw), *shape)
