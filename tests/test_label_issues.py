"""Label-issue functions on hand-computed arrays, and the flag column of a real digits run."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from distnoisy.issues.ranking import (
    confident_joint,
    estimate_noise_rate,
    estimate_num_label_issues,
    is_label_issue,
    per_class_thresholds,
    precision_at_k,
    rank_by_score,
)

# Six samples, three classes. Sample 2 is labelled 0 but predicted 1 with confidence 0.8.
LABELS = np.array([0, 0, 0, 1, 1, 2])
PROBS = np.array(
    [
        [0.8, 0.1, 0.1],
        [0.6, 0.3, 0.1],
        [0.1, 0.8, 0.1],
        [0.2, 0.7, 0.1],
        [0.1, 0.5, 0.4],
        [0.3, 0.1, 0.6],
    ]
)


def test_rank_orders_by_score_with_ties_by_index_and_nan_last() -> None:
    score = np.array([0.2, 0.9, np.nan, 0.2, 0.5, 0.9])
    assert rank_by_score(score).tolist() == [1, 5, 4, 0, 3, 2]
    assert rank_by_score(np.array([])).tolist() == []


def test_precision_at_k_hand_values() -> None:
    score = np.array([0.9, 0.8, 0.7, 0.1])
    issue = np.array([True, False, True, False])
    assert precision_at_k(score, issue) == 0.5  # k = 2 true issues: top two are 0 and 1
    assert precision_at_k(score, issue, k=1) == 1.0
    assert precision_at_k(score, issue, k=3) == pytest.approx(2 / 3)
    # a tie at the cut goes to the lower index
    assert precision_at_k(np.array([0.5, 0.5]), np.array([False, True]), k=1) == 0.0
    with pytest.raises(ValueError, match="k must be"):
        precision_at_k(score, issue, k=0)


def test_thresholds_are_mean_self_confidence_per_class() -> None:
    # class 0: (0.8 + 0.6 + 0.1)/3, class 1: (0.7 + 0.5)/2, class 2: 0.6
    np.testing.assert_allclose(per_class_thresholds(LABELS, PROBS), [0.5, 0.6, 0.6])
    # a class nobody is labelled with can never be confidently assigned
    t = per_class_thresholds(np.array([0, 0]), np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0]]))
    assert t[0] == pytest.approx(0.55) and np.isinf(t[1]) and np.isinf(t[2])


def test_confident_joint_hand_example() -> None:
    # Thresholds 0.5, 0.6, 0.6. Sample 0 and 1: only p_0 passes -> (0, 0). Sample 2: only
    # p_1 = 0.8 passes -> (0, 1), the one issue. Sample 3 -> (1, 1). Sample 4: 0.1, 0.5, 0.4
    # pass nothing -> not counted. Sample 5 -> (2, 2).
    expected = np.array([[2, 1, 0], [0, 1, 0], [0, 0, 1]])
    assert confident_joint(LABELS, PROBS).tolist() == expected.tolist()
    assert estimate_num_label_issues(LABELS, PROBS) == 1


def test_confident_joint_takes_the_largest_passing_class() -> None:
    # Thresholds t_0 = (0.5 + 0.3)/2 = 0.4 and t_1 = (0.4 + 0.4)/2 = 0.4. Sample 0 passes both
    # with a tie (-> the first, class 0); samples 2 and 3 pass both, 0.6 > 0.4 -> class 0.
    labels = np.array([0, 0, 1, 1])
    probs = np.array([[0.5, 0.5], [0.3, 0.7], [0.6, 0.4], [0.6, 0.4]])
    assert confident_joint(labels, probs).tolist() == [[1, 1], [2, 0]]
    assert estimate_num_label_issues(labels, probs) == 3


def test_noise_rate_is_the_weight_of_the_high_score_cluster() -> None:
    # 70 clean scores in [0, 1] and 30 mislabelled ones in [9, 10]: two well-separated
    # clusters, so the mixture puts weight 0.3 on the upper one.
    score = np.concatenate([np.linspace(0, 1, 70), np.linspace(9, 10, 30)])
    assert estimate_noise_rate(score) == pytest.approx(0.3, abs=1e-9)
    assert estimate_noise_rate(score[::-1]) == pytest.approx(0.3, abs=1e-9)  # order-free
    assert estimate_noise_rate(np.full(5, 2.0)) == 0.0  # nothing separates two groups
    with pytest.raises(ValueError, match="finite"):
        estimate_noise_rate(np.array([0.0, np.nan]))


def test_is_label_issue_flags_the_top_of_the_ranking() -> None:
    score = np.array([0.2, 0.9, 0.9, 0.1, 0.5])
    # ties at the cut go to the lower index
    assert is_label_issue(score, num_issues=1).tolist() == [0, 1, 0, 0, 0]
    assert is_label_issue(score, num_issues=3).tolist() == [0, 1, 1, 0, 1]
    # ineligible samples are skipped: the next ones down the ranking are flagged instead
    eligible = np.array([1, 0, 1, 1, 1], bool)
    assert is_label_issue(score, eligible, num_issues=2).tolist() == [0, 0, 1, 0, 1]
    assert not is_label_issue(score, np.zeros(5, bool)).any()
    with pytest.raises(ValueError, match="num_issues"):
        is_label_issue(score, eligible, num_issues=5)
    # default count: round(0.3 * 100) from the mixture
    clusters = np.concatenate([np.linspace(0, 1, 70), np.linspace(9, 10, 30)])
    flags = is_label_issue(clusters)
    assert flags.sum() == 30 and flags[70:].all()
    # a NaN score (a diverged sample) is not fitted and ranks last; too few finite scores: none
    with_nan = np.concatenate([clusters, [np.nan]])
    assert is_label_issue(with_nan).sum() == 30 and not is_label_issue(with_nan)[-1]
    assert not is_label_issue(np.array([np.nan, 1.0])).any()
    # the confident joint's count can be passed in (one issue in the hand example)
    own = 1.0 - PROBS[np.arange(6), LABELS]  # 0.2 0.4 0.9 0.3 0.5 0.4
    n = estimate_num_label_issues(LABELS, PROBS)
    assert is_label_issue(own, num_issues=n).tolist() == [0, 0, 1, 0, 0, 0]


@pytest.mark.slow
def test_run_writes_is_label_issue_column(long_elr_run) -> None:
    # The session's long ELR run on digits (tests/conftest.py).
    run = long_elr_run.run_dir
    issues = pq.read_table(run / "label_issues.parquet").to_pandas()
    assert issues["is_label_issue"].dtype == bool
    flagged = issues["is_label_issue"].to_numpy()
    stats = pq.read_table(run / "sample_stats.parquet").to_pandas()
    seen = (stats["train_pred"].to_numpy() >= 0)[issues["index"].to_numpy()]
    # The flags are the top of the ranking among the samples trained on.
    n = int(flagged.sum())
    assert 0 < n < len(issues)
    assert flagged[seen].tolist() == [True] * n + [False] * (int(seen.sum()) - n)
    # ...and they find corrupted labels far above the noise rate.
    corrupted = issues["is_corrupted"].to_numpy(dtype=bool)
    noise_rate = json.loads((run / "summary.json").read_text())["noise_rate_realised"]
    assert corrupted[flagged].mean() > 2 * noise_rate
