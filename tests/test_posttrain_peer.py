"""The peer (cleanlab's recipe on the same head and penalty), checked against independent
float64 fits and cleanlab itself."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from distnoisy.core.errors import ConfigError
from distnoisy.posttrain import peer
from distnoisy.posttrain.refit import fit_head, predict
from distnoisy.posttrain.rounds import RoundsInput, Split


def _blobs(n, d=5, c=4, seed=0, flip=0.3):
    """Gaussian blobs, a share of the labels flipped to another class: (h, given, truth), and a
    clean test split of the same blobs."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 2.5, (c, d))

    def draw(m):
        truth = rng.integers(0, c, m)
        return (centers[truth] + rng.normal(0, 1.0, (m, d))).astype(np.float32), truth

    h, truth = draw(n)
    given = truth.copy()
    flipped = rng.random(n) < flip
    given[flipped] = (given[flipped] + rng.integers(1, c, flipped.sum())) % c
    return h, given, truth, Split(*draw(n // 2))


def test_stratified_folds_hold_each_class_in_proportion():
    y = np.array([0] * 23 + [1] * 11 + [2] * 6)
    fold = peer.stratified_folds(y, 5, seed=3)
    for c in range(3):
        counts = np.bincount(fold[y == c], minlength=5)
        assert counts.max() - counts.min() <= 1
    sizes = np.bincount(fold, minlength=5)
    assert sizes.max() - sizes.min() <= 1
    np.testing.assert_array_equal(fold, peer.stratified_folds(y, 5, seed=3))
    assert not np.array_equal(fold, peer.stratified_folds(y, 5, seed=4))


def _reference_head(h, y, mu, c):
    """The regularised head by a separate float64 solver (torch L-BFGS from zero, to 1e-12)."""
    x = torch.cat([torch.from_numpy(h).double(), torch.ones(len(h), 1, dtype=torch.float64)], 1)
    t = torch.zeros(c, x.shape[1], dtype=torch.float64, requires_grad=True)
    yt = torch.from_numpy(y)
    opt = torch.optim.LBFGS(
        [t], max_iter=2000, tolerance_grad=1e-12, tolerance_change=0, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ t.T, yt) + 0.5 * mu * (t**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return t.detach()


def test_out_of_sample_probabilities_come_from_heads_fitted_without_the_fold():
    h, given, _, _ = _blobs(300)
    mu = 0.05
    probs = peer.out_of_sample_probs(h, given, 4, mu, folds=3, seed=1)
    fold = peer.stratified_folds(given, 3, seed=1)
    for k in range(3):
        t = _reference_head(h[fold != k], given[fold != k], mu, 4)
        xk = torch.cat(
            [
                torch.from_numpy(h[fold == k]).double(),
                torch.ones(int((fold == k).sum()), 1, dtype=torch.float64),
            ],
            1,
        )
        want = torch.softmax(xk @ t.T, 1).numpy()
        np.testing.assert_allclose(probs[fold == k], want, atol=1e-5)
    np.testing.assert_allclose(probs.sum(1), 1.0)


def test_cleanlab_recipe_removes_cleanlabs_issues_and_refits_the_same_head():
    from cleanlab.filter import find_label_issues

    h, given, truth, test = _blobs(800, seed=2)
    mu = 0.02
    theta0 = np.zeros((4, h.shape[1] + 1))
    refit = fit_head(theta0, h, given, mu, 300)
    inp = RoundsInput(train=h, given=given, theta=theta0, test=test, corrupted=given != truth)
    out = peer.cleanlab_recipe(inp, mu, refit, 300, folds=5, seed=0)

    probs = peer.out_of_sample_probs(h, given, 4, mu, folds=5, seed=0)
    # n_jobs=1 as the recipe does: cleanlab's process pool can hang in a process that holds
    # torch's and Ray's threads (a forked worker inherits their locks)
    want = np.flatnonzero(find_label_issues(given, probs, n_jobs=1))
    np.testing.assert_array_equal(out["removed_index"], want)
    assert out["removed"] == len(want)
    corrupted = given != truth
    assert out["precision_removed"] == pytest.approx(corrupted[want].mean())
    assert out["recall_removed"] == pytest.approx(corrupted[want].sum() / corrupted.sum())
    assert out["precision_removed"] > 0.8 > corrupted.mean()  # it finds the flipped labels
    kept = np.ones(len(given), bool)
    kept[want] = False
    head = fit_head(refit, h[kept], given[kept], mu, 300)
    assert out["test_acc"] == pytest.approx((predict(head, test.features) == test.labels).mean())


def test_without_cleanlab_the_recipe_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cleanlab", None)  # import cleanlab raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'distnoisy\[bench\]'"):
        peer.require_cleanlab()


def test_perfect_removal_removes_exactly_the_corrupted_samples_and_refits_the_same_head():
    h, given, truth, test = _blobs(600, seed=4)
    mu = 0.02
    theta0 = np.zeros((4, h.shape[1] + 1))
    refit = fit_head(theta0, h, given, mu, 300)
    corrupted = given != truth
    inp = RoundsInput(train=h, given=given, theta=theta0, test=test, corrupted=corrupted)
    out = peer.perfect_removal(inp, mu, refit, 300)
    assert out["removed"] == corrupted.sum() > 0
    assert out["precision_removed"] == 1.0 and out["recall_removed"] == 1.0
    assert out["removed_fraction"] == pytest.approx(corrupted.mean())
    # the head an independent float64 solver fits on the clean rows alone
    kept = ~corrupted
    head = _reference_head(h[kept], given[kept], mu, 4).numpy()
    assert out["test_acc"] == pytest.approx((predict(head, test.features) == test.labels).mean())
    assert out["train_acc_kept"] == pytest.approx((predict(head, h[kept]) == given[kept]).mean())

    unknown = RoundsInput(train=h, given=given, theta=theta0, test=test)
    with pytest.raises(ConfigError, match="truly corrupted samples"):
        peer.perfect_removal(unknown, mu, refit, 300)
