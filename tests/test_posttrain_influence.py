"""The influence math against float64 autograd references and actual leave-one-out refits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from distnoisy.posttrain import influence as infl
from distnoisy.posttrain.config import PostTrainParams
from distnoisy.posttrain.refit import fit_head, mean_nll
from distnoisy.posttrain.rounds import select


def _problem(n=60, d=4, c=3, seed=0, noisy=0.2):
    """Gaussian blobs with some labels flipped: a small logistic-regression head."""
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, c, n)
    centers = rng.normal(0, 2.0, (c, d))
    h = centers[y_true] + rng.normal(0, 1.0, (n, d))
    y = y_true.copy()
    flip = rng.random(n) < noisy
    y[flip] = (y[flip] + rng.integers(1, c, flip.sum())) % c
    theta = rng.normal(0, 0.3, (c, d + 1))
    return h, y, theta


def _objective(theta_flat, h, y, mu, c):
    theta = theta_flat.reshape(c, -1)
    x = torch.cat([h, torch.ones(len(h), 1, dtype=h.dtype)], 1)
    ce = torch.nn.functional.cross_entropy(x @ theta.T, y, reduction="mean")
    return ce + 0.5 * mu * (theta_flat**2).sum()


def test_hessian_and_gradients_match_autograd_in_float64():
    h, y, theta = _problem()
    mu, c = 0.05, theta.shape[0]
    ht, yt = torch.from_numpy(h), torch.from_numpy(y)
    ref = torch.autograd.functional.hessian(
        lambda t: _objective(t, ht, yt, mu, c), torch.from_numpy(theta.ravel())
    ).numpy()
    np.testing.assert_allclose(infl.exact_hessian(theta, h, mu, chunk=7), ref, atol=1e-12)
    # Per-sample gradient = (p - e_y) x^T: its norm is grad_norm.
    for i in (0, 5, 17):
        t = torch.from_numpy(theta.ravel()).requires_grad_(True)
        _objective(t, ht[i : i + 1], yt[i : i + 1], 0.0, c).backward()
        assert infl.grad_norm_scores(theta, h[i : i + 1], y[i : i + 1])[0] == pytest.approx(
            float(t.grad.norm()), rel=1e-12
        )


def test_exact_scores_match_a_direct_solve():
    h, y, theta = _problem(n=40)
    mu = 0.1
    hess = infl.exact_hessian(theta, h, mu)
    x = infl.augment(h)
    _, r = infl.residuals(theta, x, y)
    g = np.stack([np.outer(r[i], x[i]).ravel() for i in range(len(y))])
    z = np.linalg.solve(hess, g.T)
    got = infl.exact_scores(theta, h, y, mu, chunk=9)
    np.testing.assert_allclose(got["influence"], np.linalg.norm(z, axis=0) / len(y), rtol=1e-9)
    np.testing.assert_allclose(got["self_influence"], (g * z.T).sum(1), rtol=1e-9)


def test_influence_predicts_actual_leave_one_out_refits():
    h, y, theta0 = _problem(n=60, d=5, c=3, seed=1, noisy=0.25)
    mu = 0.02
    theta = fit_head(theta0, h, y, mu, max_iter=500, tol=1e-12)
    scores = infl.exact_scores(theta, h, y, mu)["influence"]
    moved = []
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        moved.append(np.linalg.norm(fit_head(theta, h[keep], y[keep], mu, 500, 1e-12) - theta))
    rho = spearmanr(scores, moved).statistic
    assert rho >= 0.9, rho
    # And in magnitude, to first order (removal changes the mean over n - 1 samples).
    assert np.median(np.asarray(moved) / scores) == pytest.approx(1.0, abs=0.25)


def test_kfac_is_exact_for_one_feature_direction_and_ekfac_is_close():
    h, y, theta0 = _problem(n=200, d=6, c=4, seed=2)
    mu = 0.05
    theta = fit_head(theta0, h, y, mu, max_iter=300)  # scores are taken at the refit optimum
    exact = infl.exact_scores(theta, h, y, mu)
    ek = infl.approx_scores(theta, h, y, mu, corrected=True)
    kf = infl.approx_scores(theta, h, y, mu, corrected=False)
    for approx in (ek, kf):  # measured: 0.98-0.99 on this problem
        assert spearmanr(approx["influence"], exact["influence"]).statistic > 0.95
        assert spearmanr(approx["self_influence"], exact["self_influence"]).statistic > 0.95
    # With identical features the Hessian factorises exactly: both agree with the exact one.
    same = np.repeat(h[:1], 30, axis=0)
    ys = np.arange(30) % 4
    e1 = infl.exact_scores(theta, same, ys, mu)
    for corrected in (False, True):
        a1 = infl.approx_scores(theta, same, ys, mu, corrected=corrected)
        np.testing.assert_allclose(a1["influence"], e1["influence"], rtol=1e-8)
        np.testing.assert_allclose(a1["self_influence"], e1["self_influence"], rtol=1e-8)


def test_scores_do_not_depend_on_sample_order_or_chunks():
    h, y, theta = _problem(n=90)
    perm = np.random.default_rng(3).permutation(len(y))
    for fn in (
        lambda a, b, ch: infl.exact_scores(theta, a, b, 0.1, chunk=ch)["influence"],
        lambda a, b, ch: infl.approx_scores(theta, a, b, 0.1, chunk=ch)["influence"],
        lambda a, b, ch: infl.grad_norm_scores(theta, a, b, chunk=ch),
    ):
        base = fn(h, y, 1000)
        np.testing.assert_allclose(fn(h[perm], y[perm], 13), base[perm], rtol=1e-10)


def test_refit_reaches_the_regularised_optimum():
    h, y, theta0 = _problem(n=50)
    mu = 0.1
    theta = fit_head(theta0, h, y, mu, max_iter=300, tol=1e-12)
    t = torch.from_numpy(theta.ravel()).requires_grad_(True)
    _objective(t, torch.from_numpy(h), torch.from_numpy(y), mu, theta.shape[0]).backward()
    assert float(t.grad.abs().max()) < 1e-6


def test_mean_nll_is_the_mean_cross_entropy_at_any_chunk_size():
    """The rounds' ``val_nll``: float64 autograd's cross-entropy, also for huge logits (where a
    softmax without the max shift overflows) and chunks that split the rows unevenly."""
    h, y, theta = _problem(n=37)
    # |logits| up to ~1.4e3: a softmax without the max shift overflows in float64
    theta = theta * np.array([[1.0] * (theta.shape[1] - 1) + [3000.0]])
    x = torch.cat([torch.from_numpy(h), torch.ones(len(h), 1, dtype=torch.float64)], 1)
    want = torch.nn.functional.cross_entropy(x @ torch.from_numpy(theta).T, torch.from_numpy(y))
    for chunk in (1, 5, 37, 100):
        got = mean_nll(theta, h, y, chunk=chunk)
        assert np.isfinite(got) and got == pytest.approx(float(want), rel=1e-12)


def test_class_balanced_selection_takes_each_class_in_proportion():
    labels = np.array([0] * 60 + [1] * 30 + [2] * 10)
    scores = np.r_[np.zeros(60), np.ones(30), np.full(10, 2.0)]  # class 2 scores highest
    chosen = select(scores, labels, 10, 3, balanced=True)
    assert np.bincount(labels[chosen], minlength=3).tolist() == [6, 3, 1]
    assert labels[select(scores, labels, 10, 3, balanced=False)].tolist() == [2] * 10
    assert PostTrainParams().class_balanced
