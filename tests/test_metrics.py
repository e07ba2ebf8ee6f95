import numpy as np
import pytest

from distnoisy.issues.ranking import auroc


def test_auroc_hand_values() -> None:
    # positives score 0.9 and 0.4; negatives 0.5 and 0.1: pairs won = (0.9>0.5, 0.9>0.1, 0.4>0.1)
    assert auroc(np.array([0.9, 0.4, 0.5, 0.1]), np.array([1, 1, 0, 0], bool)) == 0.75
    # a tie between a positive and a negative counts one half
    assert auroc(np.array([0.5, 0.5]), np.array([1, 0], bool)) == 0.5
    assert auroc(np.array([3.0, 1.0, 2.0]), np.array([1, 0, 0], bool)) == 1.0


def test_auroc_matches_sklearn_on_random_ties() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    score = rng.integers(0, 20, 500).astype(float)
    y = rng.random(500) < 0.3
    assert auroc(score, y) == pytest.approx(roc_auc_score(y, score), abs=1e-12)


def test_auroc_needs_both_classes() -> None:
    with pytest.raises(ValueError):
        auroc(np.array([1.0, 2.0]), np.array([True, True]))
