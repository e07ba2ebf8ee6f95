"""Refit the linear head on frozen features: L-BFGS on the regularised mean cross-entropy.

The objective is the one the influence scores differentiate (:mod:`.influence`):
``(1/n) sum_S CE(theta x_i, y_i) + (mu/2) ||theta||^2`` over the kept rows, bias included in
``theta``. It is convex, so warm-started L-BFGS converges in a few dozen iterations; the loss
and gradient are accumulated over row chunks read from the (memory-mapped) features at every
evaluation, so neither a copy of the features nor of the kept rows is ever held: the memory is
one chunk, whatever ``N`` (at 1M x 2048 a copy would be 8 GB).
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
    rows: np.ndarray | None = None,
) -> np.ndarray:
    """The head ``(C, d + 1)`` minimising the regularised objective, from ``theta0``.

    Parameters
    ----------
    theta0
        Warm start ``[W b]``.
    h, y
        Features ``(N, d)`` (any float dtype; a memory map is read chunk by chunk) and the
        given labels of the fitted rows ``(n,)``.
    rows
        The fitted rows of ``h`` (ascending indices, ``n`` of them); None = all.
    mu
        L2 strength (> 0 makes the optimum unique).
    max_iter, tol
        L-BFGS iterations and gradient tolerance.
    """
    import torch

    theta = torch.tensor(theta0, dtype=torch.float64, requires_grad=True)
    n = len(y)
    labels = torch.from_numpy(np.asarray(y, dtype=np.int64))
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
        for lo in range(0, n, chunk):
            x = torch.from_numpy(_chunk(h, rows, lo, chunk))
            logits = x @ theta[:, :-1].T + theta[:, -1]
            yc = labels[lo : lo + chunk]
            loss = torch.nn.functional.cross_entropy(logits, yc, reduction="sum") / n
            loss.backward()
            value += loss.item()
        return torch.tensor(value, dtype=torch.float64)

    opt.step(closure)
    return theta.detach().numpy().copy()


def _chunk(h: np.ndarray, rows: np.ndarray | None, lo: int, chunk: int) -> np.ndarray:
    """Fitted rows ``[lo, lo + chunk)`` of ``h`` (all rows, or ``rows``) as float64."""
    part = h[lo : lo + chunk] if rows is None else h[rows[lo : lo + chunk]]
    return np.asarray(part, np.float64)


def predict(
    theta: np.ndarray, h: np.ndarray, chunk: int = CHUNK, rows: np.ndarray | None = None
) -> np.ndarray:
    """Predicted classes of rows ``h`` (or of its rows ``rows``) under head ``theta``."""
    out = np.empty(len(h) if rows is None else len(rows), dtype=np.int64)
    w, b = theta[:, :-1], theta[:, -1]
    for lo in range(0, len(out), chunk):
        out[lo : lo + chunk] = np.argmax(_chunk(h, rows, lo, chunk) @ w.T + b, 1)
    return out


def mean_nll(theta: np.ndarray, h: np.ndarray, labels: np.ndarray, chunk: int = CHUNK) -> float:
    """Mean cross-entropy (natural log) of ``labels`` under head ``theta`` on rows ``h``."""
    w, b = theta[:, :-1], theta[:, -1]
    total = 0.0
    for lo in range(0, len(labels), chunk):
        z = _chunk(h, None, lo, chunk) @ w.T + b
        z -= z.max(1, keepdims=True)
        log_p = z - np.log(np.exp(z).sum(1, keepdims=True))
        total -= float(log_p[np.arange(len(z)), labels[lo : lo + chunk]].sum())
    return total / max(len(labels), 1)
