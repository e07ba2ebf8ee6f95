"""Numeric tests for ``distnoisy.losses``.

Every loss is checked against an independent float64 re-implementation of its formula, written
out below with explicit ``exp``/``log`` expressions (no call into ``distnoisy.losses`` and no
``F.cross_entropy``), both for the value and for the gradient with respect to the logits
(float64 autograd of the reference). A few values are also worked out by hand in comments.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch

from distnoisy.core.errors import ConfigError
from distnoisy.losses import (
    LOSSES,
    BackwardCorrectionLoss,
    BootstrapLoss,
    CELoss,
    DALLoss,
    ELRLoss,
    ForwardCorrectionLoss,
    GCELoss,
    LabelSmoothingLoss,
    LIMITLoss,
    MAELoss,
    NCERCELoss,
    PeerLoss,
    SCELoss,
    TruncatedGCELoss,
    dal_lambda,
    dal_q,
    dal_t0,
    elr_loss,
    elr_regularizer,
    elr_target_update,
    estimate_transition_matrix,
    limit_terms,
)

Tensor = torch.Tensor

# Small hand-made batches: B = 3, C = 3 (all softmax entries well inside [1e-4, 1 - 1e-4]) and
# B = 2, C = 2.
Z3 = [[2.0, -1.0, 0.5], [0.1, 0.3, -0.7], [-1.2, 0.8, 1.5]]
Y3 = [0, 2, 1]
Z2 = [[1.5, -0.5], [-0.3, 0.9]]
Y2 = [1, 1]
BATCHES = {"C3": (Z3, Y3), "C2": (Z2, Y2)}


# --------------------------------------------------------------------------------------------
# Independent float64 reference formulas
# --------------------------------------------------------------------------------------------


def sm(z: Tensor) -> Tensor:
    """Softmax written out: exp(z - max) / sum exp(z - max)."""
    e = torch.exp(z - z.max(dim=1, keepdim=True).values)
    return e / e.sum(dim=1, keepdim=True)


def log_sm(z: Tensor) -> Tensor:
    m = z.max(dim=1, keepdim=True).values
    return z - m - torch.log(torch.exp(z - m).sum(dim=1, keepdim=True))


def one_hot(y: Tensor, c: int) -> Tensor:
    return (torch.arange(c).unsqueeze(0) == y.unsqueeze(1)).double()


def pick(m: Tensor, y: Tensor) -> Tensor:
    return m[torch.arange(m.shape[0]), y]


def ref_ce(z: Tensor, y: Tensor) -> Tensor:
    return (-pick(log_sm(z), y)).mean()


def ref_mae(z: Tensor, y: Tensor) -> Tensor:
    return (1.0 - pick(sm(z), y)).mean()


def ref_gce(z: Tensor, y: Tensor, q: float) -> Tensor:
    p_y = torch.clamp(pick(sm(z), y), min=1e-6)
    return ((1.0 - p_y**q) / q).mean()


def ref_tgce(z: Tensor, y: Tensor, q: float, k: float) -> Tensor:
    p_y = pick(sm(z), y)
    per = torch.where(p_y > k, (1.0 - p_y**q) / q, torch.full_like(p_y, (1.0 - k**q) / q))
    return per.mean()


def ref_rce(z: Tensor, y: Tensor) -> Tensor:
    # -sum_k p_k log(clamp(onehot)_k) = -log(1e-4) * sum_{k != y} max(p_k, 1e-6)
    p = torch.clamp(sm(z), min=1e-6)
    off = 1.0 - one_hot(y, z.shape[1])
    return (-math.log(1e-4) * (p * off).sum(dim=1)).mean()


def ref_sce(z: Tensor, y: Tensor, alpha: float, beta: float) -> Tensor:
    return alpha * ref_ce(z, y) + beta * ref_rce(z, y)


def ref_nce_rce(z: Tensor, y: Tensor, alpha: float, beta: float) -> Tensor:
    lp = log_sm(z)
    nce = (pick(lp, y) / lp.sum(dim=1)).mean()
    return alpha * nce + beta * ref_rce(z, y)


def ref_ls(z: Tensor, y: Tensor, eps: float) -> Tensor:
    c = z.shape[1]
    target = (1.0 - eps) * one_hot(y, c) + eps / c
    return (-(target * log_sm(z)).sum(dim=1)).mean()


def ref_bootstrap(z: Tensor, y: Tensor, beta: float, hard: bool) -> Tensor:
    c = z.shape[1]
    p = sm(z).detach()
    own = one_hot(p.argmax(dim=1), c) if hard else p
    target = beta * one_hot(y, c) + (1.0 - beta) * own
    return (-(target * log_sm(z)).sum(dim=1)).mean()


def ref_forward(z: Tensor, y: Tensor, t: Tensor) -> Tensor:
    p = torch.clamp(sm(z), min=1e-10, max=1.0)
    # (T^T p)_y = sum_k p_k T[k, y]
    noisy = torch.stack([(p[i] * t[:, y[i]]).sum() for i in range(z.shape[0])])
    return (-torch.log(noisy)).mean()


def ref_backward(z: Tensor, y: Tensor, t_inv: Tensor) -> Tensor:
    losses = -torch.log(sm(z))  # l(p) = (-log p_1, ..., -log p_C)
    return torch.stack([(t_inv[y[i]] * losses[i]).sum() for i in range(z.shape[0])]).mean()


def ref_peer(
    z: Tensor, y: Tensor, alpha: float, n1: Tensor, n2: Tensor, eps: float = 1e-8
) -> Tensor:
    # The official stable CE, -log(p_y + eps), in both terms.
    p = sm(z)
    ce = torch.stack([-torch.log(p[i, y[i]] + eps) for i in range(z.shape[0])]).mean()
    peer = torch.stack([-torch.log(p[n1[i], y[n2[i]]] + eps) for i in range(z.shape[0])]).mean()
    return ce - alpha * peer


def ref_dal(z: Tensor, y: Tensor, q: float, lam: float, c: int, hard: bool = False) -> Tensor:
    gce = ref_gce(z, y, q)
    p = sm(z)
    if hard:
        boot = ref_ce(z, p.detach().argmax(dim=1))
    else:
        boot = (-(p * torch.log(p + 1e-6)).sum(dim=1)).mean()
    return gce + lam * boot / (q * math.log(c))


def ref_elr_targets(t: Tensor, z: Tensor, beta: float) -> Tensor:
    p = torch.clamp(sm(z.detach()), 1e-4, 1 - 1e-4)
    return beta * t + (1 - beta) * p / p.sum(dim=1, keepdim=True)


def ref_elr(z: Tensor, y: Tensor, t: Tensor, lam: float) -> Tensor:
    p = torch.clamp(sm(z), 1e-4, 1 - 1e-4)
    return ref_ce(z, y) + lam * torch.log(1.0 - (t * p).sum(dim=1)).mean()


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def value_and_grad(fn: Callable[[Tensor], Tensor], z: list, dtype: torch.dtype) -> tuple:
    """Return (loss value, dloss/dz) for ``fn`` at logits ``z`` in ``dtype``."""
    zt = torch.tensor(z, dtype=dtype, requires_grad=True)
    loss = fn(zt)
    loss.backward()
    return loss.detach().double(), zt.grad.double()


def assert_matches_reference(
    module_fn: Callable[[Tensor], Tensor], ref_fn: Callable[[Tensor], Tensor], z: list
) -> None:
    """Module in float32 against the float64 reference: value and gradient."""
    v, g = value_and_grad(module_fn, z, torch.float32)
    rv, rg = value_and_grad(ref_fn, z, torch.float64)
    torch.testing.assert_close(v, rv, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g, rg, rtol=1e-4, atol=1e-6)
    # and the module itself in float64 agrees to ~machine precision
    v64, g64 = value_and_grad(module_fn, z, torch.float64)
    torch.testing.assert_close(v64, rv, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g64, rg, rtol=1e-10, atol=1e-12)


def lab(y: list) -> Tensor:
    return torch.tensor(y, dtype=torch.long)


# (id, module factory given C, reference given (z, y, C))
CASES: list[tuple[str, Callable[[int], torch.nn.Module], Callable]] = [
    ("ce", lambda c: CELoss(), lambda z, y, c: ref_ce(z, y)),
    ("mae", lambda c: MAELoss(), lambda z, y, c: ref_mae(z, y)),
    ("gce_q0.3", lambda c: GCELoss(q=0.3), lambda z, y, c: ref_gce(z, y, 0.3)),
    ("gce_q0.7", lambda c: GCELoss(), lambda z, y, c: ref_gce(z, y, 0.7)),
    ("gce_q1.5", lambda c: GCELoss(q=1.5), lambda z, y, c: ref_gce(z, y, 1.5)),
    ("tgce", lambda c: TruncatedGCELoss(q=0.7, k=0.5), lambda z, y, c: ref_tgce(z, y, 0.7, 0.5)),
    ("sce", lambda c: SCELoss(c, alpha=0.1, beta=1.0), lambda z, y, c: ref_sce(z, y, 0.1, 1.0)),
    ("sce_b", lambda c: SCELoss(c, alpha=6.0, beta=0.1), lambda z, y, c: ref_sce(z, y, 6.0, 0.1)),
    (
        "nce_rce",
        lambda c: NCERCELoss(c, alpha=10.0, beta=0.1),
        lambda z, y, c: ref_nce_rce(z, y, 10.0, 0.1),
    ),
    ("ls_pos", lambda c: LabelSmoothingLoss(c, 0.1), lambda z, y, c: ref_ls(z, y, 0.1)),
    ("ls_neg", lambda c: LabelSmoothingLoss(c, -0.4), lambda z, y, c: ref_ls(z, y, -0.4)),
    ("boot_soft", lambda c: BootstrapLoss(), lambda z, y, c: ref_bootstrap(z, y, 0.95, False)),
    (
        "boot_hard",
        lambda c: BootstrapLoss(beta=0.8, hard=True),
        lambda z, y, c: ref_bootstrap(z, y, 0.8, True),
    ),
]


@pytest.mark.parametrize("batch", sorted(BATCHES))
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_value_and_grad_match_reference(case: tuple, batch: str) -> None:
    _, make, ref = case
    z, y = BATCHES[batch]
    c = len(z[0])
    loss = make(c)
    assert_matches_reference(lambda zt: loss(zt, lab(y)), lambda zt: ref(zt, lab(y), c), z)


# --------------------------------------------------------------------------------------------
# Hand-worked values on uniform logits (p = 1/C exactly)
# --------------------------------------------------------------------------------------------


def test_hand_values_uniform_logits() -> None:
    z = torch.zeros(2, 3)
    y = lab([0, 2])
    # CE = -log(1/3) = ln 3 = 1.0986123
    assert CELoss()(z, y).item() == pytest.approx(1.0986123, abs=1e-6)
    # MAE = 1 - 1/3
    assert MAELoss()(z, y).item() == pytest.approx(2 / 3, abs=1e-6)
    # GCE(q=0.7) = (1 - (1/3)^0.7)/0.7 = (1 - exp(-0.7 ln 3))/0.7 = (1 - 0.4634631)/0.7 = 0.7664813
    assert GCELoss(0.7)(z, y).item() == pytest.approx(0.7664813, abs=1e-6)
    # SCE(0.1, 1) = 0.1 ln 3 + 9.2103404 * 2/3 = 0.1098612 + 6.1402269 = 6.2500882
    assert SCELoss(3, 0.1, 1.0)(z, y).item() == pytest.approx(6.2500882, abs=1e-5)
    # NCE = ln3 / (3 ln3) = 1/3; RCE as above; 1/3 + 6.1402269 = 6.4735603
    assert NCERCELoss(3)(z, y).item() == pytest.approx(6.4735603, abs=1e-5)
    # Label smoothing: every log p_k = -ln 3 and the target sums to 1, so the loss is ln 3 for
    # any epsilon; forward correction with a uniform-row T: (T^T p)_y = 1/3 -> ln 3.
    assert LabelSmoothingLoss(3, -0.5)(z, y).item() == pytest.approx(1.0986123, abs=1e-6)
    t = torch.full((3, 3), 1 / 3)
    assert ForwardCorrectionLoss(t)(z, y).item() == pytest.approx(1.0986123, abs=1e-6)


def test_hand_value_gce_q_above_one() -> None:
    # z = [ln 3, 0] -> p = [3/4, 1/4]; label 0, q = 1.5: (1 - 0.75^1.5)/1.5
    # 0.75^1.5 = 0.6495191 -> (0.3504809)/1.5 = 0.2336539
    z = torch.tensor([[math.log(3.0), 0.0]])
    assert GCELoss(1.5)(z, lab([0])).item() == pytest.approx(0.2336539, abs=1e-6)
    # q = 1 is MAE exactly, and q -> 0 approaches CE
    z3, y3 = torch.tensor(Z3), lab(Y3)
    assert GCELoss(1.0)(z3, y3).item() == pytest.approx(MAELoss()(z3, y3).item(), abs=1e-7)
    assert GCELoss(1e-4)(z3, y3).item() == pytest.approx(CELoss()(z3, y3).item(), rel=1e-3)


# --------------------------------------------------------------------------------------------
# Saturation: p near 0 and near 1
# --------------------------------------------------------------------------------------------

HUGE = [[300.0, -300.0, 0.0], [-250.0, 250.0, 10.0]]
HUGE_Y = [0, 0]  # sample 0: p_y ~ 1; sample 1: p_y underflows to 0


def _all_losses(c: int) -> list[torch.nn.Module]:
    t = torch.full((c, c), 0.1 / (c - 1))
    t.fill_diagonal_(0.9)
    dal = DALLoss(c, epochs=10)
    dal.set_epoch(9)
    dal_hard = DALLoss(c, epochs=10, bootstrap="hard")
    dal_hard.set_epoch(9)
    return [
        CELoss(),
        MAELoss(),
        GCELoss(0.3),
        GCELoss(1.5),
        TruncatedGCELoss(),
        SCELoss(c),
        NCERCELoss(c),
        LabelSmoothingLoss(c, 0.2),
        LabelSmoothingLoss(c, -0.2),
        BootstrapLoss(),
        BootstrapLoss(hard=True),
        ForwardCorrectionLoss(t),
        BackwardCorrectionLoss(t),
        PeerLoss(0.5),
        dal,
        dal_hard,
    ]


@pytest.mark.parametrize("c", [2, 3])
def test_all_losses_finite_for_huge_logits(c: int) -> None:
    z0 = torch.tensor([row[:c] for row in HUGE])
    y = lab(HUGE_Y)
    for loss in _all_losses(c):
        z = z0.clone().requires_grad_(True)
        value = loss(z, y)
        value.backward()
        assert torch.isfinite(value), loss
        assert torch.isfinite(z.grad).all(), loss
    elr = ELRLoss(4, c)
    z = z0.clone().requires_grad_(True)
    elr(z, y, torch.tensor([1, 3])).backward()
    assert torch.isfinite(z.grad).all()
    lim = LIMITLoss(c, "laplace", 1.0)
    z = z0.clone().requires_grad_(True)
    u = (-z0).clone().requires_grad_(True)
    lim(z, u, y).backward()
    assert torch.isfinite(z.grad).all() and torch.isfinite(u.grad).all()


def test_gce_clamp_when_p_underflows() -> None:
    # p_y = e^{-500}/... underflows to 0 in float32 -> clamped to 1e-6: loss (1 - 1e-6^q)/q and
    # zero gradient.
    for q in (0.3, 0.7, 1.5):
        z = torch.tensor([[-250.0, 250.0, 0.0]], requires_grad=True)
        value = GCELoss(q)(z, lab([0]))
        value.backward()
        assert value.item() == pytest.approx((1 - 1e-6**q) / q, rel=1e-6)
        assert torch.count_nonzero(z.grad) == 0
    # p_y -> 1: loss -> 0, finite
    z = torch.tensor([[250.0, -250.0, 0.0]])
    assert GCELoss(0.7)(z, lab([0])).item() == pytest.approx(0.0, abs=1e-7)


def test_truncated_gce_caps_and_prunes() -> None:
    q, k = 0.7, 0.5
    cap = (1 - k**q) / q
    # p_y = 1/3 <= k: capped value, zero gradient
    z = torch.zeros(1, 3, requires_grad=True)
    value = TruncatedGCELoss(q, k)(z, lab([1]))
    value.backward()
    assert value.item() == pytest.approx(cap, abs=1e-7)
    assert torch.count_nonzero(z.grad) == 0
    # p_y > k: same as GCE
    z3 = torch.tensor([[3.0, 0.0, 0.0]])
    assert TruncatedGCELoss(q, k)(z3, lab([0])).item() == pytest.approx(
        GCELoss(q)(z3, lab([0])).item(), abs=1e-7
    )


def test_sce_rce_clamp() -> None:
    # Away from the clamp RCE = -log(1e-4) (1 - p_y); with alpha = 0 we see RCE alone.
    z, y = torch.tensor(Z3), lab(Y3)
    p_y = torch.softmax(torch.tensor(Z3, dtype=torch.float64), 1)[torch.arange(3), y]
    expected = (-math.log(1e-4) * (1 - p_y)).mean().item()
    assert SCELoss(3, alpha=0.0, beta=1.0)(z, y).item() == pytest.approx(expected, rel=1e-6)
    # p_y ~ 1: each of the other C-1 entries is clamped up to 1e-6
    z = torch.tensor([[300.0, -300.0, -300.0]])
    value = SCELoss(3, alpha=0.0, beta=1.0)(z, lab([0])).item()
    assert value == pytest.approx(-math.log(1e-4) * 2e-6, rel=1e-5)


@pytest.mark.parametrize("c", [10, 100])
def test_rce_clamp_difference_to_the_sce_code_is_within_the_stated_bound(c: int) -> None:
    # The SCE authors clamp p at 1e-7, distnoisy at 1e-6: |difference| <= -log(1e-4)(C-1)9e-7,
    # reached when every non-label probability is below 1e-7.
    from distnoisy.losses._common import reverse_ce

    bound = -math.log(1e-4) * (c - 1) * 9e-7
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for scale in (0.0, 3.0, 10.0, 30.0):
        z = torch.randn(500, c, generator=g, dtype=torch.float64) * scale
        y = z.argmax(1)
        diff = (reverse_ce(z, y, p_floor=1e-6) - reverse_ce(z, y, p_floor=1e-7)).abs().max()
        worst = max(worst, float(diff))
    assert worst <= bound * (1 + 1e-12)
    assert worst == pytest.approx(bound, rel=1e-9)  # the saturated rows reach it


def test_forward_correction_clamp() -> None:
    # p_y underflows to 0, clamped to 1e-10; with T = I the loss is -log(1e-10) = 23.0258509
    z = torch.tensor([[-300.0, 300.0, 0.0]])
    value = ForwardCorrectionLoss(torch.eye(3))(z, lab([0]))
    assert value.item() == pytest.approx(23.0258509, rel=1e-6)


# --------------------------------------------------------------------------------------------
# Label smoothing, bootstrapping
# --------------------------------------------------------------------------------------------


def test_label_smoothing_zero_is_ce_and_range() -> None:
    z, y = torch.tensor(Z3), lab(Y3)
    assert LabelSmoothingLoss(3, 0.0)(z, y).item() == pytest.approx(CELoss()(z, y).item())
    LabelSmoothingLoss(3, -1.0)  # lower end is valid
    for bad in (1.0, 1.5, -1.01, float("nan")):
        with pytest.raises(ConfigError, match="epsilon"):
            LabelSmoothingLoss(3, bad)
    with pytest.raises(ConfigError, match="num_classes"):
        LabelSmoothingLoss(1, 0.1)


def test_negative_label_smoothing_can_go_negative() -> None:
    # Confident and correct: (1 - eps + eps/C) * ~0 + (eps/C) * sum_{k != y} 50 < 0 for eps < 0
    z = torch.tensor([[50.0, 0.0, 0.0]])
    assert LabelSmoothingLoss(3, -0.3)(z, lab([0])).item() < 0


def test_bootstrap_defaults_and_limits() -> None:
    assert BootstrapLoss().beta == 0.95
    assert BootstrapLoss(hard=True).beta == 0.8
    z, y = torch.tensor(Z3), lab(Y3)
    for hard in (False, True):
        assert BootstrapLoss(1.0, hard)(z, y).item() == pytest.approx(CELoss()(z, y).item())
    with pytest.raises(ConfigError, match="beta"):
        BootstrapLoss(1.2)


def test_bootstrap_soft_target_is_detached() -> None:
    # With the target detached the gradient is (p - target)/B; without, it would not be.
    z = torch.tensor(Z3, requires_grad=True)
    y = lab(Y3)
    BootstrapLoss(0.6)(z, y).backward()
    p = torch.softmax(torch.tensor(Z3), 1)
    target = 0.6 * torch.nn.functional.one_hot(y, 3) + 0.4 * p
    torch.testing.assert_close(z.grad, (p - target) / 3)


# --------------------------------------------------------------------------------------------
# Forward / backward correction and the T estimator
# --------------------------------------------------------------------------------------------

T3 = [[0.8, 0.15, 0.05], [0.1, 0.7, 0.2], [0.0, 0.3, 0.7]]


def test_forward_correction_identity_is_ce() -> None:
    z, y = torch.tensor(Z3), lab(Y3)
    fc = ForwardCorrectionLoss(torch.eye(3))
    assert fc(z, y).item() == pytest.approx(CELoss()(z, y).item(), rel=1e-6)


@pytest.mark.parametrize("batch", sorted(BATCHES))
def test_forward_correction_matches_reference(batch: str) -> None:
    z, y = BATCHES[batch]
    c = len(z[0])
    t = torch.tensor(T3, dtype=torch.float64) if c == 3 else torch.tensor([[0.7, 0.3], [0.2, 0.8]])
    fc = ForwardCorrectionLoss(t)
    t64 = t.double()
    assert_matches_reference(lambda zt: fc(zt, lab(y)), lambda zt: ref_forward(zt, lab(y), t64), z)


def test_backward_correction_hand_inverse() -> None:
    # Symmetric C = 2 noise e = 0.2: T^-1 = 1/(1 - 2e) [[1-e, -e], [-e, 1-e]] = [[4/3, -1/3], ...]
    e = 0.2
    t = torch.tensor([[1 - e, e], [e, 1 - e]], dtype=torch.float64)
    t_inv = torch.tensor([[1 - e, -e], [-e, 1 - e]], dtype=torch.float64) / (1 - 2 * e)
    bc = BackwardCorrectionLoss(t)
    z, y = BATCHES["C2"]
    assert_matches_reference(
        lambda zt: bc(zt, lab(y)), lambda zt: ref_backward(zt, lab(y), t_inv), z
    )
    # identity T: CE
    z3, y3 = torch.tensor(Z3), lab(Y3)
    assert BackwardCorrectionLoss(torch.eye(3))(z3, y3).item() == pytest.approx(
        CELoss()(z3, y3).item(), rel=1e-6
    )


def test_backward_correction_c3_reference() -> None:
    t64 = torch.tensor(T3, dtype=torch.float64)
    bc = BackwardCorrectionLoss(t64)
    t_inv = torch.linalg.inv(t64)
    assert_matches_reference(
        lambda zt: bc(zt, lab(Y3)), lambda zt: ref_backward(zt, lab(Y3), t_inv), Z3
    )


def test_transition_matrix_validation() -> None:
    with pytest.raises(ConfigError, match=r"row 1 sums to 0\.9"):
        ForwardCorrectionLoss(torch.tensor([[1.0, 0.0], [0.5, 0.4]]))
    with pytest.raises(ConfigError, match="row 0 has negative"):
        ForwardCorrectionLoss(torch.tensor([[1.2, -0.2], [0.5, 0.5]]))
    with pytest.raises(ConfigError, match="square"):
        ForwardCorrectionLoss(torch.ones(2, 3) / 3)
    with pytest.raises(ConfigError, match="non-finite"):
        BackwardCorrectionLoss(torch.tensor([[float("nan"), 1.0], [0.5, 0.5]]))
    # within 1e-4 is accepted
    ForwardCorrectionLoss(torch.tensor([[0.99995, 0.0], [0.5, 0.5]]))
    # singular: symmetric C = 2 noise at rate 1/2
    with pytest.raises(ConfigError, match="singular"):
        BackwardCorrectionLoss(torch.full((2, 2), 0.5))
    with pytest.raises(ConfigError, match="row 2 sums"):
        BackwardCorrectionLoss(torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0.5, 0.4]]))


def test_estimate_transition_matrix_constructed() -> None:
    # 100 samples, C = 3. For each class j: three "outliers" with p_j = 0.98 (exactly the top 3%,
    # discarded by the 97th-percentile cut) and one anchor; the other rows are uniform.
    anchors = [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.05, 0.15, 0.8]]
    rows = []
    for j in range(3):
        outlier = [0.01, 0.01, 0.01]
        outlier[j] = 0.98
        rows += [outlier] * 3 + [anchors[j]]
    rows += [[1 / 3, 1 / 3, 1 / 3]] * (100 - len(rows))
    probs = torch.tensor(rows)[torch.randperm(100, generator=torch.Generator().manual_seed(0))]
    t = estimate_transition_matrix(probs)
    torch.testing.assert_close(t, torch.tensor(anchors))
    # percentile = 100: the threshold is the maximum, so only the (tied) 0.98 outliers go
    torch.testing.assert_close(estimate_transition_matrix(probs, 100.0), torch.tensor(anchors))


def test_estimate_transition_matrix_matches_reference_code() -> None:
    # Patrini/LIMIT's algorithm in NumPy, without the in-place view mutation, then row-normalised.
    gen = np.random.default_rng(0)
    probs = gen.dirichlet([0.5] * 4, size=200)
    expected = np.zeros((4, 4))
    for i in range(4):
        col = probs[:, i].copy()
        thresh = np.percentile(col, 97, method="higher")
        col[col >= thresh] = 0.0
        expected[i] = probs[np.argmax(col)]
    expected /= expected.sum(axis=1, keepdims=True)
    t = estimate_transition_matrix(torch.tensor(probs, dtype=torch.float32))
    np.testing.assert_allclose(t.numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(t.sum(1).numpy(), 1.0, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Peer loss
# --------------------------------------------------------------------------------------------


def test_peer_loss_alpha_zero_is_ce() -> None:
    z, y = torch.tensor(Z3), lab(Y3)
    assert PeerLoss(0.0, eps=0.0)(z, y).item() == pytest.approx(CELoss()(z, y).item(), abs=1e-7)
    # The stable CE differs from CE only through eps (relative change ~ eps / p_y).
    assert PeerLoss(0.0)(z, y).item() == pytest.approx(CELoss()(z, y).item(), abs=1e-6)


def test_peer_term_is_bounded_by_the_stable_ce() -> None:
    # A confident wrong peer pairing: plain CE grows with the logit scale, stable CE saturates at
    # -log(eps) ~ 18.42, so -alpha * peer cannot run to minus infinity.
    z = torch.tensor([[1000.0, 0.0], [0.0, 1000.0]])
    y = lab([1, 0])  # both samples confidently wrong: CE ~ 1000 each
    assert PeerLoss(0.0, eps=0.0)(z, y).item() == pytest.approx(1000.0, rel=1e-6)
    assert PeerLoss(0.0)(z, y).item() == pytest.approx(-math.log(1e-8), rel=1e-6)


def test_peer_loss_fixed_generator_matches_hand_formula() -> None:
    g = torch.Generator().manual_seed(3)
    n1, n2 = torch.randperm(3, generator=g), torch.randperm(3, generator=g)
    peer = PeerLoss(0.7)
    assert_matches_reference(
        lambda zt: peer(zt, lab(Y3), generator=torch.Generator().manual_seed(3)),
        lambda zt: ref_peer(zt, lab(Y3), 0.7, n1, n2),
        Z3,
    )
    with pytest.raises(ConfigError, match="alpha"):
        PeerLoss(-0.1)


# --------------------------------------------------------------------------------------------
# ELR
# --------------------------------------------------------------------------------------------


def test_elr_targets_start_at_zero_and_sum_to_one_minus_beta() -> None:
    elr = ELRLoss(num_samples=10, num_classes=3, beta=0.7, lam=3.0)
    assert elr.targets.shape == (10, 3) and torch.count_nonzero(elr.targets) == 0
    index = torch.tensor([7, 2, 5])
    elr(torch.tensor(Z3), lab(Y3), index)
    torch.testing.assert_close(elr.targets[index].sum(1), torch.full((3,), 0.3))
    others = [i for i in range(10) if i not in (2, 5, 7)]
    assert torch.count_nonzero(elr.targets[others]) == 0
    # rows are stored by global index: row 7 holds sample 0's prediction
    p = torch.softmax(torch.tensor(Z3), 1)
    torch.testing.assert_close(elr.targets[7], 0.3 * p[0])
    # second visit: t <- beta t + (1 - beta) p_bar
    z2 = torch.tensor(Z3) * -0.5
    elr(z2, lab(Y3), index)
    expected = ref_elr_targets(0.3 * p.double(), z2.double(), 0.7)
    torch.testing.assert_close(elr.targets[index].double(), expected, rtol=1e-6, atol=1e-7)
    assert "targets" in elr.state_dict()


def test_elr_updates_targets_before_the_loss() -> None:
    elr = ELRLoss(3, 3, beta=0.7, lam=3.0)
    z, y = torch.tensor(Z3), lab(Y3)
    value = elr(z, y, torch.arange(3))
    t_after = ref_elr_targets(torch.zeros(3, 3, dtype=torch.float64), z.double(), 0.7)
    assert value.item() == pytest.approx(ref_elr(z.double(), y, t_after, 3.0).item(), rel=1e-6)
    # with the old (zero) targets the regulariser would vanish and the loss would be CE
    assert abs(value.item() - CELoss()(z, y).item()) > 0.1


def test_elr_module_equals_functional_pair() -> None:
    elr = ELRLoss(6, 3, beta=0.9, lam=7.0)
    index = torch.tensor([4, 0, 1])
    elr.targets[index] = torch.tensor([[0.2, 0.5, 0.1], [0.0, 0.0, 0.0], [0.3, 0.3, 0.3]])
    store = elr.targets.clone()
    z1 = torch.tensor(Z3, requires_grad=True)
    z2 = torch.tensor(Z3, requires_grad=True)
    v_mod = elr(z1, lab(Y3), index)
    new = elr_target_update(store[index], z2, 0.9)
    v_fun = elr_loss(z2, lab(Y3), new, 7.0)
    torch.testing.assert_close(v_mod, v_fun)
    torch.testing.assert_close(elr.targets[index], new)
    reg = elr_regularizer(z2.detach(), new)
    torch.testing.assert_close(v_fun.detach(), CELoss()(z2.detach(), lab(Y3)) + 7.0 * reg)
    v_mod.backward()
    v_fun.backward()
    torch.testing.assert_close(z1.grad, z2.grad)
    assert not new.requires_grad


def test_elr_grad_matches_reference_and_closed_form() -> None:
    beta, lam = 0.7, 3.0
    t_old = torch.tensor([[0.1, 0.4, 0.2], [0.3, 0.1, 0.1], [0.05, 0.05, 0.6]], dtype=torch.float64)
    y = lab(Y3)
    t_new = ref_elr_targets(t_old, torch.tensor(Z3, dtype=torch.float64), beta)

    def module_fn(zt: Tensor) -> Tensor:
        return elr_loss(zt, y, elr_target_update(t_old.to(zt.dtype), zt, beta), lam)

    assert_matches_reference(module_fn, lambda zt: ref_elr(zt, y, t_new, lam), Z3)

    # docs/methods.md#elr closed form: (p_c - [c = y])/B + lam p_c (s - t_c)/((1 - s) B)
    z = torch.tensor(Z3, dtype=torch.float64, requires_grad=True)
    module_fn(z).backward()
    p = sm(z.detach())
    assert ((p > 1e-4) & (p < 1 - 1e-4)).all()  # unsaturated, so the closed form applies
    s = (t_new * p).sum(1, keepdim=True)
    closed = (p - one_hot(y, 3)) / 3 + lam * p * (s - t_new) / ((1 - s) * 3)
    torch.testing.assert_close(z.grad, closed, rtol=1e-10, atol=1e-12)


def test_elr_clamp_saturation() -> None:
    # p = [1, ~0, ~0]: every entry is at a clamp bound, so the regulariser has zero gradient and
    # the gradient is the CE gradient alone; p_bar is the clamped vector renormalised.
    z = torch.tensor([[60.0, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    elr = ELRLoss(1, 3, beta=0.7, lam=3.0).double()
    value = elr(z, lab([1]), torch.tensor([0]))
    value.backward()
    clamped = torch.tensor([1 - 1e-4, 1e-4, 1e-4], dtype=torch.float64)
    torch.testing.assert_close(elr.targets[0], 0.3 * clamped / clamped.sum())
    ce_grad = sm(z.detach()) - one_hot(lab([1]), 3)
    torch.testing.assert_close(z.grad, ce_grad)
    s = float((elr.targets[0] * clamped).sum())  # the regulariser uses the un-renormalised clamp
    assert value.item() == pytest.approx(60.0 + 3.0 * math.log(1 - s), rel=1e-9)


def test_elr_config_errors() -> None:
    for kwargs in ({"beta": 1.0}, {"beta": -0.1}, {"lam": -1.0}):
        with pytest.raises(ConfigError):
            ELRLoss(5, 3, **kwargs)
    with pytest.raises(ConfigError, match="num_samples"):
        ELRLoss(0, 3)


# --------------------------------------------------------------------------------------------
# DAL
# --------------------------------------------------------------------------------------------


def test_dal_schedule_cifar_defaults() -> None:
    qs, qe, e = 0.6, 1.5, 150
    # t0 = (1 - 0.6) * 150 / 0.9 = 66.67
    assert dal_t0(qs, qe, e) == pytest.approx(200 / 3)
    # epoch 0
    assert dal_q(0, qs, qe, e) == pytest.approx(0.6)
    assert dal_lambda(0, qs, qe, e) == 0.0
    # epoch 66 = floor(t0): q = 0.6 + 0.9 * 66/150 = 0.996 < 1, lambda = 0
    assert dal_q(66, qs, qe, e) == pytest.approx(0.996)
    assert dal_lambda(66, qs, qe, e) == 0.0
    # epoch 67 = ceil(t0): q = 1.002, lambda = (67 - 200/3)/(150 - 200/3) = (1/3)/(250/3) = 0.004
    assert dal_q(67, qs, qe, e) == pytest.approx(1.002)
    assert dal_lambda(67, qs, qe, e) == pytest.approx(0.004)
    # last epoch 149: q = 0.6 + 0.9 * 149/150 = 1.494 (never 1.5); lambda = 247/250 = 0.988
    assert dal_q(149, qs, qe, e) == pytest.approx(1.494)
    assert dal_lambda(149, qs, qe, e) == pytest.approx(0.988)

    loss = DALLoss(10)
    assert (loss.q, loss.lam) == (pytest.approx(0.6), 0.0)
    loss.set_epoch(149)
    assert (loss.q, loss.lam) == (pytest.approx(1.494), pytest.approx(0.988))
    for bad in (-1, 150):
        with pytest.raises(ConfigError, match="epoch"):
            loss.set_epoch(bad)


def test_dal_schedule_edge_cases() -> None:
    # q_end <= 1: q never exceeds 1, so the bootstrapping never turns on (t0 >= E)
    assert all(dal_lambda(t, 0.4, 0.9, 10) == 0.0 for t in range(10))
    assert all(dal_lambda(t, 0.5, 1.0, 10) == 0.0 for t in range(10))
    # q_start > 1: t0 < 0, already on at epoch 0: t0 = -0.1*10/0.5 = -2, lambda_0 = 2/12
    assert dal_lambda(0, 1.1, 1.6, 10) == pytest.approx(2 / 12)
    # constant schedules
    assert dal_lambda(3, 0.7, 0.7, 10) == 0.0
    assert dal_lambda(3, 1.0, 1.0, 10) == 0.0
    assert dal_lambda(0, 1.2, 1.2, 10) == 1.0


@pytest.mark.parametrize("bootstrap", ["soft", "hard"])
@pytest.mark.parametrize("epoch", [0, 66, 67, 120, 149])
@pytest.mark.parametrize("batch", sorted(BATCHES))
def test_dal_value_and_grad_match_reference(bootstrap: str, epoch: int, batch: str) -> None:
    z, y = BATCHES[batch]
    c = len(z[0])
    loss = DALLoss(c, 0.6, 1.5, 150, bootstrap=bootstrap)
    loss.set_epoch(epoch)
    q, lam = dal_q(epoch, 0.6, 1.5, 150), dal_lambda(epoch, 0.6, 1.5, 150)
    assert_matches_reference(
        lambda zt: loss(zt, lab(y)),
        lambda zt: ref_dal(zt, lab(y), q, lam, c, hard=bootstrap == "hard"),
        z,
    )


def test_dal_entropy_is_not_detached() -> None:
    loss = DALLoss(3)
    loss.set_epoch(140)
    z = torch.tensor(Z3, dtype=torch.float64, requires_grad=True)
    loss(z, lab(Y3)).backward()
    # GCE gradient alone (what a detached entropy would give) differs from the full gradient
    zg = torch.tensor(Z3, dtype=torch.float64, requires_grad=True)
    ref_gce(zg, lab(Y3), loss.q).backward()
    assert (z.grad - zg.grad).abs().max() > 1e-3


def test_dal_config_errors() -> None:
    for kwargs in (
        {"q_start": 0.0},
        {"q_start": -0.5},
        {"q_start": 0.8, "q_end": 0.7},
        {"epochs": 0},
        {"bootstrap": "medium"},
    ):
        with pytest.raises(ConfigError):
            DALLoss(10, **kwargs)
    with pytest.raises(ConfigError, match="num_classes"):
        DALLoss(1)


def test_gce_config_errors() -> None:
    for q in (0.0, -0.7, float("inf")):
        with pytest.raises(ConfigError, match="q"):
            GCELoss(q)
    with pytest.raises(ConfigError, match="k"):
        TruncatedGCELoss(0.7, 1.0)
    with pytest.raises(ConfigError):
        SCELoss(3, alpha=0.0, beta=0.0)
    with pytest.raises(ConfigError):
        NCERCELoss(3, alpha=-1.0)


# --------------------------------------------------------------------------------------------
# LIMIT
# --------------------------------------------------------------------------------------------

U3 = [[0.3, 0.2, -0.4], [1.0, -0.6, 0.2], [0.0, 0.9, -1.1]]


def ref_limit_q_loss(u: Tensor, y: Tensor, p: Tensor, variant: str, l_wd: float) -> Tensor:
    r = sm(u)
    e = one_hot(y, u.shape[1])
    info = ((r - e) ** 2) if variant == "gaussian" else (r - e).abs()
    return info.sum(1).mean() + l_wd * ((p - r) ** 2).sum(1).mean()


@pytest.mark.parametrize("variant", ["gaussian", "laplace"])
def test_limit_gradients(variant: str) -> None:
    l_wd = 0.5
    loss = LIMITLoss(3, variant, grad_weight_decay=l_wd)
    grads = []
    for labels in (Y3, [1, 1, 0]):
        z = torch.tensor(Z3, dtype=torch.float64, requires_grad=True)
        u = torch.tensor(U3, dtype=torch.float64, requires_grad=True)
        value = loss(z, u, lab(labels))
        value.backward()
        # classifier: exactly (softmax(z) - softmax(u))/B
        expected = (sm(z.detach()) - sm(u.detach())) / 3
        torch.testing.assert_close(z.grad, expected, rtol=0, atol=1e-15)
        grads.append(z.grad.clone())
        # q-network: autograd of the q-loss formula
        u_ref = torch.tensor(U3, dtype=torch.float64, requires_grad=True)
        q_ref = ref_limit_q_loss(u_ref, lab(labels), sm(z.detach()), variant, l_wd)
        q_ref.backward()
        torch.testing.assert_close(u.grad, u_ref.grad, rtol=1e-10, atol=1e-14)
        # value: carrier CE + q-loss
        assert value.item() == pytest.approx((ref_ce(z.detach(), lab(labels)) + q_ref).item())
    # the classifier's gradient does not depend on the labels
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_limit_float32_and_terms() -> None:
    z = torch.tensor(Z3, requires_grad=True)
    u = torch.tensor(U3, requires_grad=True)
    carrier, q_loss = limit_terms(z, u, lab(Y3), "gaussian", 0.0)
    assert carrier.item() == pytest.approx(ref_ce(torch.tensor(Z3).double(), lab(Y3)).item())
    # carrier alone sends nothing to the q-network and g_hat/B to the classifier
    carrier.backward()
    assert u.grad is None
    torch.testing.assert_close(
        z.grad, (torch.softmax(z.detach(), 1) - torch.softmax(u.detach(), 1)) / 3
    )
    assert q_loss.requires_grad


def test_limit_scales_with_upstream_gradient() -> None:
    # A loss weight or AMP's loss scale multiplies the classifier gradient like every other one.
    z = torch.tensor(Z3, dtype=torch.float64, requires_grad=True)
    u = torch.tensor(U3, dtype=torch.float64, requires_grad=True)
    (4.0 * LIMITLoss(3)(z, u, lab(Y3))).backward()
    torch.testing.assert_close(z.grad, 4.0 * (sm(z.detach()) - sm(u.detach())) / 3)


def test_limit_and_elr_under_autocast() -> None:
    # bf16 logits with float32 softmax internals: gradients come back in the right dtype.
    net = torch.nn.Linear(4, 3)
    qnet = torch.nn.Linear(4, 3)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    y = lab([0, 1, 2, 1, 0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, u = net(x), qnet(x)
        assert z.dtype == torch.bfloat16
        loss = LIMITLoss(3, grad_weight_decay=1.0)(z, u, y)
        loss = loss + ELRLoss(5, 3)(z, y, torch.arange(5))
    loss.backward()
    for param in (*net.parameters(), *qnet.parameters()):
        assert param.grad is not None and param.grad.dtype == torch.float32
        assert torch.isfinite(param.grad).all()


def test_limit_config_errors() -> None:
    with pytest.raises(ConfigError, match="variant"):
        LIMITLoss(3, "cauchy")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="grad_weight_decay"):
        LIMITLoss(3, grad_weight_decay=-1.0)


# --------------------------------------------------------------------------------------------
# Registry and shapes
# --------------------------------------------------------------------------------------------


def test_registry_and_shape_errors() -> None:
    assert {
        "ce",
        "gce",
        "sce",
        "mae",
        "ls",
        "bootstrap",
        "forward",
        "peer",
        "elr",
        "dal",
        "limit",
    } <= set(LOSSES)
    with pytest.raises(ValueError, match="classes"):
        SCELoss(4)(torch.tensor(Z3), lab(Y3))
    with pytest.raises(ValueError, match="labels"):
        CELoss()(torch.tensor(Z3), lab([0, 1]))


def test_truncated_gce_with_paper_weights_by_hand() -> None:
    # Sample 0 kept: (1 - p^0.7)/0.7 with p = e^2/(e^2 + 2); sample 1 pruned: (1 - 0.5^0.7)/0.7.
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]], requires_grad=True)
    labels = torch.tensor([0, 1])
    p = math.exp(2) / (math.exp(2) + 2)
    expected = ((1 - p**0.7) / 0.7 + (1 - 0.5**0.7) / 0.7) / 2
    loss = TruncatedGCELoss(q=0.7, k=0.5)(logits, labels, torch.tensor([1.0, 0.0]))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert logits.grad[1].abs().max() == 0 and logits.grad[0].abs().max() > 0
