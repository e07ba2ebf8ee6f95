"""Label-issue functions on hand-computed arrays, and the flag column of a real digits run."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from distnoisy.issues import count, dynamics, find, suggest
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
    summary = json.loads((run / "summary.json").read_text())
    noise_rate = summary["noise_rate_realised"]
    assert corrupted[flagged].mean() > 2 * noise_rate
    # The count is the calibrated estimate the summary reports, and the engine's columns are
    # find_label_issues recomputed from the run's own per-sample stats.
    assert summary["num_label_issues"] == n
    assert n == round(summary["noise_rate_estimated"] * int(seen.sum()))
    assert len(summary["noise_rate_estimated_per_class"]) == 10
    assert summary["flagged_suggesting_given_label"] == 0
    stats = stats.sort_values("index")
    fields = {
        c: np.stack(stats[c].to_numpy())
        for c in ("pred_hist", "loss_hist", "margin_hist", "final_prob", "elr_target")
    }
    found = find.find_label_issues(
        stats["given_label"].to_numpy(),
        fields,
        stats["label_issue_score"].to_numpy(),
        num_classes=10,
        eligible=stats["train_pred"].to_numpy() >= 0,
    )
    by_index = issues.sort_values("index")
    assert found.estimate.num_issues == n and found.window == summary["early_learning_epochs"]
    np.testing.assert_array_equal(by_index["is_label_issue"], found.is_label_issue)
    np.testing.assert_array_equal(by_index["suggested_label"], found.suggested_label)
    np.testing.assert_allclose(by_index["suggestion_confidence"], found.suggestion_confidence)
    assert (by_index["suggested_label"] != by_index["given_label"]).all()
    hit = flagged & corrupted
    clean = stats["clean_label"].to_numpy()[issues["index"].to_numpy()]
    right = (issues["suggested_label"].to_numpy()[hit] == clean[hit]).mean()
    assert summary["suggestion_acc_on_flagged_corrupted"] == pytest.approx(right)
    assert right > 0.8


# -- the calibrated count, the early-learning window and the suggestions ----------------------
def test_confident_joint_from_sums_hand_example() -> None:
    # cleanlab's thresholds (every sample): t = (0.8+0.6+0.1)/3, (0.7+0.5)/2, 0.6 = .5 .6 .6
    sums = count.self_confidence_sums(LABELS, PROBS)
    np.testing.assert_allclose(sums, [[1.5, 1.2, 0.6], [3, 2, 1]])
    t = count.thresholds_from_sums(sums)
    np.testing.assert_allclose(t, [0.5, 0.6, 0.6])
    np.testing.assert_array_equal(count.thresholds_from_sums(np.array([[1.0], [0.0]])), [np.inf])
    # sample 2 (given 0) is confidently 1; sample 4 passes no threshold
    joint = count.joint_counts(LABELS, PROBS, thresholds=t)
    np.testing.assert_array_equal(joint, [[2, 1, 0], [0, 1, 0], [0, 0, 1]])
    np.testing.assert_array_equal(joint, confident_joint(LABELS, PROBS))  # the older function
    # calibration: class 1's row (one counted sample of two) becomes [0, 2, 0]
    np.testing.assert_allclose(
        count.calibrate_joint(joint, np.array([3, 2, 1])), [[2, 1, 0], [0, 2, 0], [0, 0, 1]]
    )
    est = count.estimate_label_noise(LABELS, PROBS, thresholds="all")
    assert est.num_issues == 1 and est.num_per_class.tolist() == [1, 0, 0]
    np.testing.assert_allclose(est.rate, 1 / 6)
    np.testing.assert_allclose(est.rate_per_class, [1 / 3, 0, 0])


def test_agreeing_thresholds_hand_example() -> None:
    # Only samples whose argmax is their label set the thresholds: sample 2 (argmax 1, given 0)
    # is left out of class 0's mean: t0 = (0.8 + 0.6) / 2 = 0.7, t1 = 0.6, t2 = 0.6.
    mask = count.threshold_mask(LABELS, PROBS, thresholds="agreeing")
    assert mask.tolist() == [True, True, False, True, True, True]
    # sample 1 (0.6 < 0.7) now passes no threshold; class 0's counted row is [1, 1, 0]
    est = count.estimate_label_noise(LABELS, PROBS, thresholds="agreeing")
    np.testing.assert_allclose(est.joint[0], [1.5, 1.5, 0])
    assert est.num_issues == 2 and est.num_per_class.tolist() == [2, 0, 0]
    with pytest.raises(ValueError, match="thresholds"):
        count.threshold_mask(LABELS, PROBS, thresholds="median")


def test_rounding_keeps_per_class_counts_summing_to_the_total() -> None:
    # off-diagonal 1.4, 1.4, 1.2 (total 4.0): floors 1, 1, 1 and one more to a largest remainder
    joint = np.array([[6, 14, 0], [14, 6, 0], [12, 0, 8]])
    est = count.noise_from_joint(joint, np.array([20, 20, 20]))
    np.testing.assert_allclose(est.joint.sum(1) - np.diag(est.joint), [14, 14, 12])
    assert est.num_issues == 40 and est.num_per_class.tolist() == [14, 14, 12]
    est = count.noise_from_joint(np.array([[3, 2], [1, 3]]), np.array([3, 3]))
    # 3 * 2/5 = 1.2 and 3 * 1/4 = 0.75: total round(1.95) = 2 -> [1, 1]
    assert est.num_per_class.tolist() == [1, 1] and est.num_issues == 2


def _threaded_blocks(blocks, fn):
    """Run ``fn(block, reduce)`` on every block at once, ``reduce`` summing across blocks (an
    all-reduce with threads); returns each block's result."""
    import threading

    barrier = threading.Barrier(len(blocks))
    box: list = []
    lock = threading.Lock()
    results: list = [None] * len(blocks)

    def reduce(a):
        with lock:
            box.append(np.asarray(a, dtype=np.float64))
        barrier.wait()
        total = sum(box[: len(blocks)])
        barrier.wait()
        with lock:
            box.pop()
        barrier.wait()
        return total

    def run(i):
        results[i] = fn(blocks[i], reduce)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(blocks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_count_and_window_from_blocks_equal_the_whole_table() -> None:
    rng = np.random.default_rng(0)
    n, c, e = 600, 5, 12
    given = rng.integers(0, c, n)
    pred = np.where(rng.random((n, e)) < 0.7, given[:, None], rng.integers(0, c, (n, e)))
    pred[rng.random((n, e)) < 0.05] = -1  # not visited
    trained = rng.random(n) > 0.02
    votes = dynamics.prediction_votes(pred, num_classes=c, epochs=8)
    whole = count.estimate_label_noise(given, votes, mask=trained)
    whole_w = find.early_window(pred, given, mask=trained)
    cuts = [(0, 150), (150, 151), (151, 600)]  # uneven blocks, one of a single row

    def block(lohi, reduce):
        lo, hi = lohi
        est = count.estimate_label_noise(given[lo:hi], votes[lo:hi], mask=trained[lo:hi],
                                         reduce_sum=reduce)  # fmt: skip
        w = find.early_window(pred[lo:hi], given[lo:hi], mask=trained[lo:hi], reduce_sum=reduce)
        return est, w

    for est, w in _threaded_blocks(cuts, block):
        assert w == whole_w
        assert est.num_issues == whole.num_issues
        np.testing.assert_array_equal(est.num_per_class, whole.num_per_class)
        np.testing.assert_allclose(est.joint, whole.joint)


def test_count_with_all_thresholds_matches_cleanlab() -> None:
    cleanlab_count = pytest.importorskip("cleanlab.count")
    rng = np.random.default_rng(1)
    n, c = 500, 4
    clean = rng.integers(0, c, n)
    given = np.where(rng.random(n) < 0.3, (clean + rng.integers(1, c, n)) % c, clean)
    logits = 2.0 * np.eye(c)[clean] + rng.normal(size=(n, c))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    ours = count.estimate_label_noise(given, probs, thresholds="all")
    joint = cleanlab_count.compute_confident_joint(given, probs, calibrate=False)
    t = count.thresholds_from_sums(count.self_confidence_sums(given, probs))
    np.testing.assert_array_equal(count.joint_counts(given, probs, thresholds=t), joint)
    theirs = cleanlab_count.num_label_issues(
        given, probs, estimation_method="off_diagonal_calibrated"
    )
    assert abs(ours.num_issues - theirs) <= 1  # cleanlab rounds per cell, we round the total


def test_switch_counts_and_early_learning_end_by_hand() -> None:
    # sample 0: predicted 0 at epoch 0 (a suspect at epoch 1) then its label 1: one switch;
    # sample 1: never its label before epoch 3 (not visited at 2), then switches at 3
    pred = np.array([[0, 1, 1, 1], [0, 0, -1, 1]])
    switched, suspects = dynamics.switch_counts(pred, np.array([1, 1]))
    assert switched.tolist() == [0, 1, 0, 1] and suspects.tolist() == [0, 2, 0, 1]
    su = np.array([0, 100, 100, 100, 100, 100, 100])
    # shares .4 .1 .06 .08 .09 .20: the lowest before epoch 6 is .06; .20 > .06 + .05
    assert dynamics.early_learning_end(np.array([0, 40, 10, 6, 8, 9, 20]), su) == 6
    # .10 at epoch 6 is within .05 of .06: no memorisation, every epoch
    assert dynamics.early_learning_end(np.array([0, 40, 10, 6, 8, 9, 10]), su) == 7
    # the phase lasts at least min_epochs
    assert dynamics.early_learning_end(np.array([0, 5, 90]), np.array([0, 100, 100])) == 2
    assert dynamics.early_learning_end(np.array([0, 5, 90]), np.array([0, 100, 100]),
                                       min_epochs=3) == 3  # fmt: skip
    assert dynamics.early_learning_end(np.zeros(3), np.zeros(3)) == 3
    with pytest.raises(ValueError, match="rise"):
        dynamics.early_learning_end(su, su, rise=0)


def test_prediction_votes_window_and_unvisited_rows() -> None:
    pred = np.array([[2, 2, 0, 1], [-1, -1, -1, 1]])
    np.testing.assert_allclose(
        dynamics.prediction_votes(pred, num_classes=3, epochs=3), [[1 / 3, 0, 2 / 3], [0, 0, 0]]
    )
    np.testing.assert_allclose(dynamics.prediction_votes(pred, num_classes=3)[1], [0, 1, 0])
    with pytest.raises(ValueError, match="num_classes"):
        dynamics.prediction_votes(pred, num_classes=2)


def test_suggestions_never_name_the_given_label() -> None:
    rng = np.random.default_rng(2)
    n, c = 300, 6
    given = rng.integers(0, c, n)
    ev = rng.random((n, c)) ** 4
    ev[:50] = np.eye(c)[given[:50]]  # all evidence on the given label: no alternative
    final = rng.random((n, c))
    s, conf = suggest.suggest_labels(given, ev, tiebreak=[final])
    assert (s != given).all()
    # the best alternative by evidence; with none, the final probabilities decide, confidence 0
    masked = np.where(np.eye(c, dtype=bool)[given], -1, ev)
    np.testing.assert_array_equal(s[50:], masked[50:].argmax(1))
    alt_final = np.where(np.eye(c, dtype=bool)[given], -1, final)
    np.testing.assert_array_equal(s[:50], alt_final[:50].argmax(1))
    np.testing.assert_allclose(conf[50:], ev[50:][np.arange(250), s[50:]] / ev[50:].sum(1))
    assert (conf[:50] == 0).all()
    np.testing.assert_allclose(suggest.alternative_share(given[:50], ev[:50]), 0)


def test_early_probabilities_from_the_histories() -> None:
    # epoch 0: predicted 2, p_given = .2 and margin log(.2/.5): p_2 = .5; epoch 1 not visited;
    # epoch 2: predicted the given label 0 with p = .6 (the runner-up is unknown)
    pred = np.array([[2, -1, 0]])
    loss = -np.log(np.array([[0.2, np.nan, 0.6]]))
    margin = np.array([[np.log(0.2 / 0.5), np.nan, 1.0]])
    p = dynamics.early_probabilities(pred, loss, margin, np.array([0]), num_classes=3)
    np.testing.assert_allclose(p, [[0.4, 0, 0.25]])
    one = dynamics.early_probabilities(pred, loss, margin, np.array([0]), num_classes=3, epochs=1)
    np.testing.assert_allclose(one, [[0.2, 0, 0.5]])
    # the same from real logits: softmax entries of the given and the predicted class
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(50, 4, 5)) * 3  # 50 samples, 4 classes, 5 epochs
    given = rng.integers(0, 4, 50)
    prob = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    pred = logits.argmax(1)
    own = prob[np.arange(50), given]  # [50, 5]
    others = logits.copy()
    others[np.arange(50), given] = -np.inf
    margin = logits[np.arange(50), given] - others.max(1)
    want = np.zeros((50, 4))
    for e in range(5):
        want[np.arange(50), given] += own[:, e] / 5
        off = pred[:, e] != given
        want[np.flatnonzero(off), pred[off, e]] += prob[np.flatnonzero(off), pred[off, e], e] / 5
    got = dynamics.early_probabilities(pred, -np.log(own), margin, given, num_classes=4)
    np.testing.assert_allclose(got, want, rtol=1e-12)


def _hand_built_run() -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """4 classes x 10 samples, 8 epochs. Epoch 0: every sample predicted as the next class
    (p_given .2, p_pred .3). Clean samples: predicted their label with p .9 from epoch 1. The 3
    mislabelled ones (given 0, truly 2): predicted 2 with p .97 (p_given .02) in epochs 1-4,
    then memorised (0 with p .9)."""
    n, e = 40, 8
    given = np.repeat(np.arange(4), 10)
    wrong = np.array([0, 1, 2])
    pred = np.tile(given[:, None], (1, e))
    p_given = np.full((n, e), 0.9)
    margin = np.full((n, e), np.log(0.9 / 0.05))
    pred[:, 0] = (given + 1) % 4
    p_given[:, 0], margin[:, 0] = 0.2, np.log(0.2 / 0.3)
    pred[wrong, 1:5] = 2
    p_given[np.ix_(wrong, range(1, 5))] = 0.02
    margin[np.ix_(wrong, range(1, 5))] = np.log(0.02 / 0.97)
    final = np.eye(4)[given] * 0.9 + 0.025
    fields = {
        "pred_hist": pred,
        "loss_hist": -np.log(p_given),
        "margin_hist": margin,
        "final_prob": final,
    }
    score = np.zeros(n)
    score[wrong] = [3.0, 2.0, 1.0]
    score[10] = 2.5  # a clean sample that scores high
    return given, fields, score


def test_find_label_issues_on_a_hand_built_run() -> None:
    given, fields, score = _hand_built_run()
    n, wrong = len(given), np.array([0, 1, 2])
    found = find.find_label_issues(given, fields, score, num_classes=4)
    # suspects (mostly not their label so far) predicted as their label: epoch 1: 37 of 40;
    # epochs 2-4: 0 of the 3 mislabelled; epoch 5: 3 of 3 (memorised): the phase is epochs 0-4
    assert found.window == 5
    # in it: clean p_given = (.2 + 4 * .9) / 5 = .76; the mislabelled p_2 = 4 * .97 / 5 = .776,
    # p_0 = (.2 + 4 * .02) / 5 = .056. Thresholds: t_0 = (7 * .76 + 3 * .056) / 10 = .5488,
    # t_1..3 = .76: the 3 count in cell (0, 2), every clean sample on the diagonal.
    ev = find.run_evidence(fields, given, num_classes=4, window=5)
    np.testing.assert_allclose(ev.count[wrong[0]], [0.056, 0.3 / 5, 0.776, 0])
    assert found.estimate.num_issues == 3 and found.estimate.num_per_class.tolist() == [3, 0, 0, 0]
    np.testing.assert_allclose(found.estimate.rate_per_class, [0.3, 0, 0, 0])
    # the flags are the top 3 of the ranking (the clean sample 10 ranks second)
    assert np.flatnonzero(found.is_label_issue).tolist() == [0, 1, 10]
    # suggestions: the votes of every epoch name 2 for the mislabelled ones; never the given
    assert found.suggested_label[wrong].tolist() == [2, 2, 2]
    np.testing.assert_allclose(found.suggestion_confidence[wrong], 4 / 8)
    assert (found.suggested_label != given).all()
    # ineligible rows get no suggestion and no flag
    ineligible = np.ones(n, bool)
    ineligible[0] = False
    found = find.find_label_issues(given, fields, score, num_classes=4, eligible=ineligible)
    assert found.suggested_label[0] == -1 and not found.is_label_issue[0]
    # a method's distribution (ELR's target) is what the suggestion comes from
    target = np.full((n, 4), 0.1)
    target[np.arange(n), (given + 3) % 4] = 0.7
    ev = find.run_evidence({**fields, "elr_target": target}, given, num_classes=4, window=5)
    assert ev.suggest_source == "ELR target"
    s, _ = suggest.suggest_labels(given, ev.suggest, tiebreak=ev.tiebreak)
    np.testing.assert_array_equal(s, (given + 3) % 4)


def test_review_rows_show_the_suggestion_its_confidence_and_the_count() -> None:
    import pandas as pd

    from distnoisy.driver import review

    frame = pd.DataFrame(
        {
            "index": [7, 3],
            "key": ["a", "b"],
            "given_label": [1, 2],
            "suggested_label": [0, 1],
            "score": [2.5, 1.0],
            "is_label_issue": [True, False],
            "trained": [True, True],
            "suggestion_confidence": [0.625, 0.0],
            "is_corrupted": [True, False],
        }
    )
    rows = review._rows(frame, ["bag", "coat", "shirt"])
    assert rows[0]["suggested (confidence)"] == "0 bag (62%)"
    assert rows[1]["suggested (confidence)"] == "1 coat (no confident alternative)"
    summary = {
        "num_label_issues": 12,
        "noise_rate_estimated": 0.3,
        "noise_rate_realised": 0.25,
        "label_issue_count_source": "training probabilities of epochs 0-9",
        "suggested_label_source": "ELR target",
    }
    note = review.count_note(summary)
    assert note.startswith("12 samples flagged") and "30.0% (realised 25.0%)" in note
    assert "epochs 0-9" in note and "ELR target" in note
    md = review.issues_markdown(rows, "Top 2", note)
    assert md.splitlines()[2] == note and "| 0 bag (62%) |" in md
    page = review.issues_html(rows, {}, "Top 2", note)
    assert "<p>12 samples flagged" in page
    assert review.count_note({}) == ""  # older runs: no line


def test_console_summary_prints_the_count_and_both_noise_rates() -> None:
    from distnoisy.driver.summary import format_summary

    base = {"method": "ce", "dataset": "digits", "num_train": 1000, "noise_kind": "symmetric",
            "num_workers": 1, "epochs": 3}  # fmt: skip
    lines = format_summary(
        {**base, "num_label_issues": 371, "noise_rate_estimated": 0.371, "noise_rate_realised": 0.4}
    ).splitlines()
    assert (
        "  label issues          371 flagged; estimated noise rate 37.1% (realised 40.0%)" in lines
    )
    older = format_summary(base)  # a summary from before the count: n/a, no crash
    assert "n/a flagged; estimated noise rate n/a (realised n/a)" in older
