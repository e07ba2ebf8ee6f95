"""Refit the linear head on frozen features: L-BFGS on the regularised mean cross-entropy.

The objective is the one the influence scores differentiate (:mod:`.influence`):
``(1/n) sum_S CE(theta x_i, y_i) + (mu/2) ||theta||^2`` over the kept rows, bias included in
``theta``. It is convex, so warm-started L-BFGS converges in a few dozen iterations; the loss
and gradient are accumulated over row chunks so the features never need a float64 copy.
"""

from __future__ import annotations

import numpy as np

from distnoisy.posttrain.influence import CHUNK


def fit_head(
    theta0: np.ndarray,
    h: np.ndarray,
    y: np.ndarray,
    mu: float,
    max_iter: int = 100,
    tol: float = 1e-9,
    chunk: int = CHUNK,
) -> np.ndarray:
    """The head ``(C, d + 1)`` minimising the regularised objective, from ``theta0``.

    Parameters
    ----------
    theta0
        Warm start ``[W b]``.
    h, y
        Kept rows' features ``(n, d)`` (any float dtype) and given labels ``(n,)``.
    mu
        L2 strength (> 0 makes the optimum unique).
    max_iter, tol
        L-BFGS iterations and gradient tolerance.
    """
    import torch

    theta = torch.tensor(theta0, dtype=torch.float64, requires_grad=True)
    n = len(y)
    parts = [
        (
            torch.from_numpy(np.array(h[lo : lo + chunk])),
            torch.from_numpy(y[lo : lo + chunk]),
        )
        for lo in range(0, n, chunk)
    ]
    opt = torch.optim.LBFGS(
        [theta],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=tol,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        total = 0.5 * mu * (theta**2).sum()
        total.backward()
        value = total.item()
        for hc, yc in parts:
            x = hc.to(torch.float64)
            logits = x @ theta[:, :-1].T + theta[:, -1]
            loss = torch.nn.functional.cross_entropy(logits, yc.long(), reduction="sum") / n
            loss.backward()
            value += loss.item()
        return torch.tensor(value, dtype=torch.float64)

    opt.step(closure)
    return theta.detach().numpy().copy()


def predict(theta: np.ndarray, h: np.ndarray, chunk: int = CHUNK) -> np.ndarray:
    """Predicted classes of rows ``h`` under head ``theta``."""
    out = np.empty(len(h), dtype=np.int64)
    w, b = theta[:, :-1], theta[:, -1]
    for lo in range(0, len(h), chunk):
        out[lo : lo + chunk] = np.argmax(np.asarray(h[lo : lo + chunk], np.float64) @ w.T + b, 1)
    return out
