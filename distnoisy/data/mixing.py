"""How well training batches mix the classes: observed against a random draw.

A stream over shards that each hold one or two classes (an image folder converted in listing
order, or shards written by another tool class by class) serves batches of one class at a time
unless the reader mixes several shards at once; every noisy-label method then trains on nonsense
without failing. The training loop measures the *class mix* of its batches with the pure
functions here and warns when it is far below what a random draw would give.

The class mix of a batch is its number of distinct (given) labels. For a batch of ``b`` samples
drawn independently with class probabilities ``p``, class ``c`` is absent with probability
``(1 - p_c) ** b``, so the expected number of distinct classes is ``sum_c 1 - (1 - p_c) ** b``
(10 classes, uniform, b = 64: 9.99). ``batch_class_mix`` is the observed mean divided by that
expectation: about 1 for well-mixed batches, ``1 / C``-ish for single-class ones.
"""

from __future__ import annotations

import numpy as np

#: ``batch_class_mix`` below this in the first epoch triggers the re-convert warning.
POOR_MIX = 0.75


def expected_distinct_classes(class_counts: np.ndarray, batch_size: int) -> float:
    """Expected number of distinct classes in ``batch_size`` independent draws.

    Parameters
    ----------
    class_counts
        Samples per class, shape (C,) (the draw's class probabilities are their shares).
    batch_size
        Samples per batch.

    Returns
    -------
    float
        ``sum_c 1 - (1 - p_c) ** batch_size`` with ``p = class_counts / class_counts.sum()``.
    """
    counts = np.asarray(class_counts, dtype=np.float64)
    if counts.ndim != 1 or counts.sum() <= 0 or batch_size < 1:
        raise ValueError("class_counts must be a non-empty 1-D count vector, batch_size >= 1")
    p = counts / counts.sum()
    return float(np.sum(1.0 - (1.0 - p) ** batch_size))


def distinct_classes(labels: np.ndarray) -> int:
    """Number of distinct labels in one batch."""
    return int(np.unique(np.asarray(labels)).size)


def class_mix(mean_distinct: float, class_counts: np.ndarray, batch_size: int) -> float:
    """``batch_class_mix``: observed mean distinct classes per batch over the random expectation."""
    return float(mean_distinct / expected_distinct_classes(class_counts, batch_size))


def poor_mix_message(
    mean_distinct: float, expected: float, *, batch_size: int, open_shards: int, buffer: int
) -> str:
    """The warning for a poorly mixed stream: what was measured, why, and the fix."""
    return (
        f"training batches of {batch_size} hold {mean_distinct:.1f} distinct labels on average "
        f"where random batches would hold {expected:.1f} (batch_class_mix "
        f"{mean_distinct / expected:.2f}): the shards each hold few classes and "
        f"data.open_shards={open_shards}, data.shuffle_buffer={buffer} cannot mix them. "
        "Re-convert the data (the converters write samples into shards in a shuffled order) "
        "or raise data.open_shards to about the number of classes"
    )
