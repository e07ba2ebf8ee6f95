"""Checks a rank runs on its training data every epoch: unusable samples and the class mix.

Each check gathers every rank's records so that every rank reaches the same verdict (and raises
together: no rank is left waiting in a collective).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from distnoisy.config import Config
from distnoisy.data.mixing import POOR_MIX, expected_distinct_classes, poor_mix_message
from distnoisy.engine import collectives

log = logging.getLogger(__name__)


def check_bad_samples(stream: Any, n: int, cfg: Config) -> int:
    """Unusable training samples met so far (all ranks); abort past ``data.max_bad_fraction``.

    Each sample counts once however many ranks or passes met it, and a truncated shard counts
    every sample it lost (:func:`distnoisy.data.stream.count_bad`): those are never trained on.
    Every rank gathers the same records and gets the same total, so every rank raises together
    (no rank left waiting in a collective).
    """
    from distnoisy.data.stream import count_bad, samples_lost

    gathered = collectives.all_gather_object(stream.bad_samples)
    records = [("train", k, r) for part in gathered for k, r in part]
    total = count_bad(records)
    limit = cfg.data.max_bad_fraction * n
    if total > limit:
        from distnoisy.core.errors import DataError

        # The records that lost the most samples first: a truncated shard before a bad image.
        named = sorted(
            dict.fromkeys((k, r) for _, k, r in records), key=lambda kr: -samples_lost(kr[1])
        )
        first = "; ".join(f"{k}: {r}" for k, r in named[:3])
        raise DataError(
            f"{total} unusable training samples, more than data.max_bad_fraction="
            f"{cfg.data.max_bad_fraction:g} of {n}; first: {first}. "
            "Repair or re-convert the data, or raise data.max_bad_fraction"
        )
    return total


def check_class_mix(
    mean_distinct: float, class_counts: np.ndarray, batch_size: int, cfg: Config, *, warn: bool
) -> float:
    """``batch_class_mix`` of an epoch's batches; warns (once) when the stream cannot mix."""
    expected = expected_distinct_classes(class_counts, batch_size)
    if warn and mean_distinct < POOR_MIX * expected:
        log.warning(
            poor_mix_message(
                mean_distinct,
                expected,
                batch_size=batch_size,
                open_shards=cfg.data.open_shards,
                buffer=cfg.data.shuffle_buffer,
            )
        )
    return mean_distinct / expected


def gather_bad_samples(*named: tuple[str, Any]) -> list[dict[str, str]]:
    """Distinct skipped samples of every rank's streams (a collective: call on all ranks).

    One entry per ``(set, key, reason)``; count them with :func:`count_bad_samples`.
    """
    local = [
        {"set": name, "key": key, "reason": reason}
        for name, stream in named
        if stream is not None
        for key, reason in stream.bad_samples
    ]
    seen: dict[tuple[str, str, str], None] = {}
    for part in collectives.all_gather_object(local):
        for item in part:  # type: ignore[attr-defined]
            seen.setdefault((item["set"], item["key"], item["reason"]), None)
    return [{"set": a, "key": b, "reason": c} for a, b, c in seen]


def count_bad_samples(bad_list: list[dict[str, str]]) -> int:
    """Distinct bad samples of a :func:`gather_bad_samples` list: each ``(set, key)`` once
    (the training stream and the final pass over the training set meet the same corrupt
    image), a truncated shard as the number of samples it lost."""
    from distnoisy.data.stream import count_bad

    return count_bad((b["set"], b["key"], b["reason"]) for b in bad_list)
