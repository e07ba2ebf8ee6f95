"""Training-dynamics aggregates on a hand-written history (every value worked out by hand)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from distnoisy.store.history import (
    area_under_margin,
    first_memorized_epoch,
    forgetting_events,
    mean_loss,
)

# Given label 1 for every row; -1 = not visited that epoch.
PRED = np.array(
    [
        [1, 1, 1, 1],  # right from the start: memorized at 0, never forgotten
        [0, 1, 0, 1],  # right, wrong, right: memorized at 3, forgotten once (1 -> 2)
        [1, 0, -1, 0],  # learnt then forgotten for good: -1, one event
        [-1, -1, -1, -1],  # never visited
        [0, -1, 1, -1],  # last visit right: memorized at 2 (epoch 3 unvisited), no event
        [1, -1, 0, 1],  # right, (skip), wrong, right: one event across the gap, memorized at 3
    ]
)
GIVEN = np.ones(len(PRED), dtype=np.int64)


def test_first_memorized_epoch_by_hand() -> None:
    assert first_memorized_epoch(PRED, GIVEN).tolist() == [0, 3, -1, -1, 2, 3]


def test_forgetting_events_by_hand() -> None:
    assert forgetting_events(PRED, GIVEN).tolist() == [0, 1, 1, 0, 0, 1]
    # per-sample labels matter: with given label 0 row 1 is right, wrong, right, wrong
    assert forgetting_events(PRED[1:2], np.array([0])).tolist() == [2]


def test_area_under_margin_and_mean_loss_skip_unvisited() -> None:
    margin = np.array([[2.0, 1.0, np.nan], [np.nan, np.nan, np.nan], [-1.0, -3.0, 0.5]])
    aum = area_under_margin(margin)
    assert aum[0] == pytest.approx(1.5) and np.isnan(aum[1])
    assert aum[2] == pytest.approx(-3.5 / 3)
    assert mean_loss(np.array([[0.5, np.nan, 1.5]], dtype=np.float16)).tolist() == [1.0]


def test_rowwise_so_partitions_give_the_same_answer() -> None:
    rng = np.random.default_rng(0)
    pred = rng.integers(-1, 3, size=(500, 7))
    given = rng.integers(0, 3, size=500)
    whole = forgetting_events(pred, given), first_memorized_epoch(pred, given)
    parts = [
        (forgetting_events(p, g), first_memorized_epoch(p, g))
        for p, g in zip(np.array_split(pred, 3), np.array_split(given, 3), strict=True)
    ]
    assert np.array_equal(whole[0], np.concatenate([p[0] for p in parts]))
    assert np.array_equal(whole[1], np.concatenate([p[1] for p in parts]))
    # an independent per-row re-implementation (plain Python loops)
    for row, g, fm, fe in zip(pred, given, whole[1], whole[0], strict=True):
        seq = [int(p == g) for p in row if p >= 0]
        assert fe == sum(a == 1 and b == 0 for a, b in itertools.pairwise(seq))
        epochs = [e for e, p in enumerate(row) if p >= 0]
        expected = -1
        for k in range(len(seq) - 1, -1, -1):
            if not seq[k]:
                break
            expected = epochs[k]
        assert fm == expected


def test_bad_shape_is_one_clear_error() -> None:
    with pytest.raises(ValueError, match="pred_hist must be"):
        forgetting_events(np.zeros(3), np.zeros(3))
