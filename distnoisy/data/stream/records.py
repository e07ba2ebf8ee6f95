"""Bad-sample records ``(key, reason)``: the truncated-shard reason and how many samples a
record stands for.

A corrupt image is one record for one sample. A shard that yields fewer samples than its
manifest count (a truncated or unreadable tar: Python's tarfile ends a cut stream without an
error) is one record under the shard's file name that stands for every sample it lost. The
``unreadable tar data`` record beside it says why and stands for none (the loss is counted once,
by the truncation record).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_TRUNCATED = re.compile(r"^shard yielded (\d+) of (\d+) samples")
_TAR_ERROR = "unreadable tar data"


def truncated_reason(seen: int, expected: int) -> str:
    """The reason recorded for a shard that yielded ``seen`` of its ``expected`` samples."""
    return f"shard yielded {seen} of {expected} samples (truncated or unreadable)"


def samples_lost(reason: str) -> int:
    """Training samples one record stands for: the missing ones of a truncated shard, none for
    the tar error that explains them, one for anything else (a corrupt or unusable sample)."""
    match = _TRUNCATED.match(reason)
    if match:
        return max(0, int(match.group(2)) - int(match.group(1)))
    return 0 if reason.startswith(_TAR_ERROR) else 1


def count_bad(records: Iterable[tuple[str, str, str]]) -> int:
    """Distinct bad samples of ``(set, key, reason)`` records from any ranks and passes.

    Each ``(set, key)`` counts once, with the most samples any of its records stands for: a
    corrupt image met by the training stream and again by the final pass over the training set,
    or a truncated shard that every rank reads in ``split=sample`` mode, is one problem.
    """
    lost: dict[tuple[str, str], int] = {}
    for name, key, reason in records:
        item = (str(name), str(key))
        lost[item] = max(lost.get(item, 0), samples_lost(str(reason)))
    return sum(lost.values())
