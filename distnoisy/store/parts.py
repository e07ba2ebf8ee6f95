"""Checkpoints of a partitioned store: one file per rank, never the whole table in one process.

Each rank writes the rows it owns to ``store-part-<rank>.pt`` (:func:`part_file`) in its own
checkpoint directory; the launcher merges the ranks' directories into one checkpoint (Ray Train
copies every worker's files to the same checkpoint path; the local launcher copies them into one
directory before publishing it). A part holds::

    {"format": 1, "num_samples": N, "lo": lo, "hi": hi, "fields": {name: rows [lo, hi)}}

:func:`load_parts` restores any store from such a set, whatever its backend and number of ranks:
each rank reads only the parts that overlap the rows it keeps (all of them for the replicated
backend), memory-mapped, so a rank of a partitioned store never holds more than its own rows plus
one part's overlap.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from distnoisy.core.errors import DistnoisyError

if TYPE_CHECKING:
    from distnoisy.store import Store

PART_FORMAT = 1


def part_file(rank: int) -> str:
    """File name of rank ``rank``'s part (unique per rank, so the ranks' files never collide)."""
    return f"store-part-{rank:05d}.pt"


def part_range(num_samples: int, parts: int, part: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of part ``part`` of ``parts`` (the partitioned store's row ranges)."""
    per = max(1, -(-num_samples // parts))
    lo = min(part * per, num_samples)
    return lo, min(lo + per, num_samples)


def save_part(store: Store, directory: Path, rank: int) -> None:
    """Write this rank's rows of every field to ``directory`` (atomically)."""
    from distnoisy.engine.checkpoint import save_atomic

    lo, hi = store.owned_range()
    part = {
        "format": PART_FORMAT,
        "num_samples": store.num_samples,
        "lo": lo,
        "hi": hi,
        "fields": {name: store.local(name) for name in store.specs},
    }
    save_atomic(part, Path(directory) / part_file(rank))


def load_parts(store: Store, directory: Path, parts: int) -> None:
    """Fill ``store`` from the ``parts`` part files in ``directory`` (every rank calls it).

    Raises
    ------
    DistnoisyError
        A part is missing or does not belong to a store of this size.
    """
    lo, hi = store.owned_range() if store.backend == "partitioned" else (0, store.num_samples)
    for p in range(parts):
        p_lo, p_hi = part_range(store.num_samples, parts, p)
        if p_hi <= lo or p_lo >= hi:
            continue  # no row of this part is kept here
        state = _read_part(Path(directory) / part_file(p), store.num_samples, (p_lo, p_hi))
        store.load_rows(state["fields"], p_lo)


def _read_part(path: Path, num_samples: int, rows: tuple[int, int]) -> dict[str, Any]:
    if not path.exists():
        raise DistnoisyError(
            f"checkpoint store part {path} is missing: the checkpoint was not written completely; "
            "resume from an earlier one (delete this checkpoint directory) or start a new run"
        )
    # mmap: only the rows this rank copies are read from disk
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if (state.get("format"), state.get("num_samples")) != (PART_FORMAT, num_samples) or (
        state.get("lo"),
        state.get("hi"),
    ) != rows:
        raise DistnoisyError(
            f"checkpoint store part {path} holds rows [{state.get('lo')}, {state.get('hi')}) of "
            f"{state.get('num_samples')} samples, expected rows [{rows[0]}, {rows[1]}) of "
            f"{num_samples}: it belongs to another run; start a new run (another output_dir)"
        )
    return state
