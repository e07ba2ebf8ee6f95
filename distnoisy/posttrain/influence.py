"""Influence of each training sample on a linear softmax head (pure numpy, chunked).

Notation (docs/posttrain.md has the derivation): ``x`` = features with a 1 appended (``D`` =
``d + 1``), ``theta`` = the head ``[W b]`` of shape ``(C, D)``, ``p = softmax(theta x)``,
``r = p - e_y`` (``y`` the given label). The regularised objective over the kept set ``S`` of
size ``n`` is ``L = (1/n) sum_S CE + (mu/2) ||theta||^2``. Its per-sample gradient is the outer
product ``g = r x^T`` and its Hessian is

    H = (1/n) sum_S (diag p - p p^T) kron x x^T + mu I.

Removing sample ``i`` moves the optimum by ``delta_i = (1/n) H^-1 vec(g_i)`` to first order; the
``influence`` score is ``||delta_i||``, the ``self_influence`` score ``vec(g_i)^T H^-1 vec(g_i)``,
``grad_norm`` is ``||g_i|| = ||r_i|| ||x_i||``.

``H`` is ``(CD) x (CD)``: exact for small heads (:func:`exact_scores`); for large ones
:func:`kfac_scores` uses the eigenbasis of the Kronecker factorisation
``H ~ A kron B + mu I`` with ``A = mean(diag p - p p^T)`` and ``B = mean(x x^T)`` and, with
``corrected=True`` (EK-FAC), replaces the eigenvalues ``a_c b_k`` by the Hessian's own diagonal
in that basis. Every function works on row chunks so memory stays ``O(chunk * D + D^2)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

#: Rows per chunk.
CHUNK = 16384


def augment(h: np.ndarray) -> np.ndarray:
    """Features with a column of ones appended (the bias), in float64."""
    h = np.asarray(h, dtype=np.float64)
    return np.concatenate([h, np.ones((len(h), 1))], axis=1)


def head_matrix(w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[W b]``, shape ``(C, d + 1)``, float64."""
    return np.concatenate([np.asarray(w, np.float64), np.asarray(b, np.float64)[:, None]], 1)


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _chunks(n: int, chunk: int) -> Iterator[slice]:
    for lo in range(0, n, chunk):
        yield slice(lo, min(lo + chunk, n))


def residuals(theta: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(p, r = p - e_y)`` for augmented features ``x``."""
    p = softmax(x @ theta.T)
    r = p.copy()
    r[np.arange(len(y)), y] -= 1.0
    return p, r


def grad_norm_scores(theta: np.ndarray, h: np.ndarray, y: np.ndarray, chunk: int = CHUNK):
    """``||g_i||_F = ||p_i - e_y|| * ||x_i||`` (the outer product's Frobenius norm)."""
    out = np.empty(len(y))
    for s in _chunks(len(y), chunk):
        x = augment(h[s])
        _, r = residuals(theta, x, y[s])
        out[s] = np.linalg.norm(r, axis=1) * np.linalg.norm(x, axis=1)
    return out


# -- exact ------------------------------------------------------------------------------------
def exact_hessian(
    theta: np.ndarray, h: np.ndarray, mu: float, n: int | None = None, chunk: int = CHUNK
) -> np.ndarray:
    """The head Hessian ``(CD, CD)`` (row-major ``vec``: index ``c * D + k``) over rows ``h``;
    ``n`` is the divisor (default ``len(h)``)."""
    c, d = theta.shape
    hess = np.zeros((c, d, c, d))
    for s in _chunks(len(h), chunk):
        x = augment(h[s])
        p = softmax(x @ theta.T)
        # sum_i p_ic x_i x_i^T on the diagonal blocks, minus sum_i p_ic p_ic' x_i x_i^T.
        diag = np.einsum("ic,ik,il->ckl", p, x, x)
        hess[np.arange(c), :, np.arange(c), :] += diag
        px = (p[:, :, None] * x[:, None, :]).reshape(len(x), c * d)  # vec(p x^T) per row
        hess -= (px.T @ px).reshape(c, d, c, d)
    hess = hess.reshape(c * d, c * d) / (n or len(h))
    hess[np.diag_indices_from(hess)] += mu
    return hess


def exact_scores(
    theta: np.ndarray, h: np.ndarray, y: np.ndarray, mu: float, chunk: int = CHUNK
) -> dict[str, np.ndarray]:
    """``influence`` and ``self_influence`` of every row with the exact Hessian of the rows."""
    import scipy.linalg

    n = len(y)
    factor = scipy.linalg.cho_factor(exact_hessian(theta, h, mu, chunk=chunk))
    infl, self_infl = np.empty(n), np.empty(n)
    for s in _chunks(n, chunk):
        x = augment(h[s])
        _, r = residuals(theta, x, y[s])
        g = (r[:, :, None] * x[:, None, :]).reshape(len(r), -1)  # vec(r x^T), row-major
        z = scipy.linalg.cho_solve(factor, g.T)  # (CD, rows)
        infl[s] = np.linalg.norm(z, axis=0) / n
        self_infl[s] = np.einsum("ij,ji->i", g, z)
    return {"influence": infl, "self_influence": self_infl}


# -- K-FAC / EK-FAC -----------------------------------------------------------------------------
@dataclass(frozen=True)
class KfacBasis:
    """Eigenbases of the two Kronecker factors and the eigenvalues ``(C, D)`` in that basis."""

    ua: np.ndarray  # (C, C)
    ub: np.ndarray  # (D, D)
    eig: np.ndarray  # (C, D): a_c * b_k (K-FAC) or the Hessian's diagonal in the basis (EK-FAC)


def kfac_factors(
    theta: np.ndarray, h: np.ndarray, chunk: int = CHUNK
) -> tuple[np.ndarray, np.ndarray]:
    """Sums ``(sum_i diag p_i - p_i p_i^T, sum_i x_i x_i^T)`` over rows ``h`` (additive:
    ranks sum their parts)."""
    c, d = theta.shape
    a, b = np.zeros((c, c)), np.zeros((d, d))
    for s in _chunks(len(h), chunk):
        x = augment(h[s])
        p = softmax(x @ theta.T)
        a += np.diag(p.sum(0)) - p.T @ p
        b += x.T @ x
    return a, b


def kfac_corrections(
    theta: np.ndarray, h: np.ndarray, ua: np.ndarray, ub: np.ndarray, chunk: int = CHUNK
) -> np.ndarray:
    """Sum over rows of the Hessian's diagonal in the Kronecker eigenbasis ``(C, D)``:
    ``sum_i (ua^T Lambda_i ua)_cc (ub^T x_i)_k^2`` (additive over ranks)."""
    c, d = theta.shape
    out = np.zeros((c, d))
    for s in _chunks(len(h), chunk):
        x = augment(h[s])
        p = softmax(x @ theta.T)
        # (ua^T (diag p - p p^T) ua)_cc = sum_j ua_jc^2 p_j - (ua^T p)_c^2
        lam = p @ (ua**2) - (p @ ua) ** 2
        out += lam.T @ (x @ ub) ** 2
    return out


def kfac_basis(
    a_sum: np.ndarray, b_sum: np.ndarray, n: int, corr_sum: np.ndarray | None = None
) -> KfacBasis:
    """The basis from the factor sums; with ``corr_sum`` (EK-FAC) its corrected eigenvalues."""
    av, ua = np.linalg.eigh(a_sum / n)
    bv, ub = np.linalg.eigh(b_sum / n)
    eig = np.outer(np.clip(av, 0, None), np.clip(bv, 0, None))
    if corr_sum is not None:
        eig = corr_sum / n
    return KfacBasis(ua, ub, eig)


def kfac_scores(
    theta: np.ndarray,
    h: np.ndarray,
    y: np.ndarray,
    mu: float,
    basis: KfacBasis,
    n: int,
    chunk: int = CHUNK,
) -> dict[str, np.ndarray]:
    """``influence`` and ``self_influence`` of rows ``h`` with ``H ~ U diag(eig + mu) U^T``.

    For ``g = r x^T`` the solve is diagonal in the basis: with ``rho = ua^T r`` and
    ``eta = ub^T x``, ``||H^-1 g||^2 = sum_ck rho_c^2 eta_k^2 / (eig_ck + mu)^2`` and
    ``g^T H^-1 g = sum_ck rho_c^2 eta_k^2 / (eig_ck + mu)``: ``O(CD + D^2)`` per sample.
    """
    inv = 1.0 / (basis.eig + mu)
    infl, self_infl = np.empty(len(y)), np.empty(len(y))
    for s in _chunks(len(y), chunk):
        x = augment(h[s])
        _, r = residuals(theta, x, y[s])
        rho2, eta2 = (r @ basis.ua) ** 2, (x @ basis.ub) ** 2
        infl[s] = np.sqrt(np.einsum("ic,ck,ik->i", rho2, inv**2, eta2, optimize=True)) / n
        self_infl[s] = np.einsum("ic,ck,ik->i", rho2, inv, eta2, optimize=True)
    return {"influence": infl, "self_influence": self_infl}


def approx_scores(
    theta: np.ndarray,
    h: np.ndarray,
    y: np.ndarray,
    mu: float,
    corrected: bool = True,
    chunk: int = CHUNK,
) -> dict[str, np.ndarray]:
    """K-FAC (``corrected=False``) or EK-FAC scores of every row, in one process."""
    n = len(y)
    a, b = kfac_factors(theta, h, chunk)
    basis = kfac_basis(a, b, n)
    if corrected:
        basis = kfac_basis(a, b, n, kfac_corrections(theta, h, basis.ua, basis.ub, chunk))
    return kfac_scores(theta, h, y, mu, basis, n, chunk)
