"""LIMIT (Harutyunyan et al., ICML 2020): the classifier learns from a *predicted* gradient.

A q-network sees only the input and outputs logits ``u``; ``ĝ = sg(p) - softmax(u)`` replaces the
gradient of the loss with respect to the classifier's logits, so the classifier never receives a
label-dependent gradient. The q-network is trained on the labels with a bounded loss.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx

from distnoisy.core.errors import ConfigError
from distnoisy.losses._common import check_inputs, check_num_classes, check_range

LimitVariant = Literal["gaussian", "laplace"]


class _PredictedGradCarrier(torch.autograd.Function):
    """Carrier whose value is mean CE(z, ỹ) and whose gradient w.r.t. z is ``upstream · ĝ / B``.

    The official code (``modules/nn_utils.py::GradReplacement``) is an identity op on the logits
    whose backward emits ``ĝ`` and ignores the incoming gradient of the CE computed after it. This
    is the same thing fused with that CE, with two deliberate differences:

    - ``ĝ`` is divided by ``B`` (distnoisy's mean reduction, docs/methods.md#limit);
    - the incoming scalar gradient multiplies ``ĝ`` instead of being dropped, so scaling the loss
      (AMP's ``GradScaler``, gradient accumulation, a loss weight) scales the classifier's
      gradient like every other gradient. For a plain ``loss.backward()`` the upstream is 1 and
      the gradient is exactly ``ĝ / B``. The labels never reach the backward pass.

    ``ĝ``'s producer (the q-network path) gets no gradient from here: ``ĝ`` enters detached and
    its gradient is ``None``.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, logits: Tensor, g_hat: Tensor, labels: Tensor) -> Tensor:
        ctx.save_for_backward(g_hat)
        ctx.logits_dtype = logits.dtype
        return F.cross_entropy(logits, labels)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, None, None]:
        (g_hat,) = ctx.saved_tensors
        # g_hat may be float32 while the logits are fp16/bf16 under autocast.
        grad = grad_output * g_hat / g_hat.shape[0]
        return grad.to(ctx.logits_dtype), None, None


def limit_terms(
    logits: Tensor,
    q_logits: Tensor,
    labels: Tensor,
    variant: LimitVariant = "gaussian",
    grad_weight_decay: float = 0.0,
    g_noise: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    r"""The two parts of the LIMIT objective: ``(carrier, q_loss)``.

    - ``carrier``: value ``mean_i CE(z_i, ỹ_i)`` (a logged metric only); its gradient w.r.t.
      ``logits`` is ``ĝ / B`` with ``ĝ = sg(softmax(z)) - sg(softmax(u))``, independent of the
      labels, and it sends no gradient to ``q_logits``.
    - ``q_loss``: ``mean_i Σ_k (r - e_ỹ)²`` (gaussian) or ``mean_i Σ_k |r - e_ỹ|`` (laplace),
      plus ``L · mean_i Σ_k (sg(p) - r)²``, with ``r = softmax(u)``. It trains only the q-network
      (``p`` is detached).

    Parameters
    ----------
    logits, q_logits
        ``[B, C]`` classifier logits ``z`` and q-network logits ``u``.
    labels
        ``[B]`` noisy labels (used only by ``q_loss`` and the carrier's value).
    variant
        ``"gaussian"`` (LIMIT_G) or ``"laplace"`` (LIMIT_L).
    grad_weight_decay
        ``L >= 0``.
    g_noise
        Optional ``[B, C]`` noise added to ``ĝ`` in the classifier's backward pass only (the
        official ``sample_from_q``: a draw from the q-distribution around ``ĝ``, see
        :func:`sample_grad_noise`). The q-loss is unchanged.
    """
    check_inputs(logits, labels)
    if q_logits.shape != logits.shape:
        raise ValueError(
            f"q_logits {tuple(q_logits.shape)} must have the logits' shape {tuple(logits.shape)}"
        )
    labels = labels.long()
    p = F.softmax(logits.detach(), dim=1)  # sg(p): the q-terms must not move the classifier
    r = F.softmax(q_logits, dim=1)
    g_hat = p - r.detach().to(p.dtype)
    if g_noise is not None:
        g_hat = g_hat + g_noise.detach().to(g_hat.dtype)
    carrier = _PredictedGradCarrier.apply(logits, g_hat, labels)

    one_hot = F.one_hot(labels, logits.shape[1]).to(r.dtype)
    if variant == "gaussian":
        info = ((r - one_hot) ** 2).sum(dim=1).mean()
    elif variant == "laplace":
        info = (r - one_hot).abs().sum(dim=1).mean()
    else:
        raise ValueError(f"variant must be 'gaussian' or 'laplace', got {variant!r}")
    q_loss = info + grad_weight_decay * ((p.to(r.dtype) - r) ** 2).sum(dim=1).mean()
    return carrier, q_loss


def sample_grad_noise(
    shape: torch.Size | tuple[int, ...],
    variant: LimitVariant,
    lamb: float,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Noise of the official ``sample_from_q`` (docs/methods.md#limit): Gaussian with std
    ``sqrt(1 / (2·lamb))`` or Laplace with scale ``1 / lamb``."""
    if lamb <= 0:
        raise ConfigError(f"lamb must be > 0, got {lamb}")
    if variant == "gaussian":
        return torch.randn(shape, generator=generator).mul_((1.0 / (2.0 * lamb)) ** 0.5).to(device)
    u = torch.rand(shape, generator=generator) - 0.5  # inverse CDF of Laplace(0, 1/lamb)
    return (-(1.0 / lamb) * u.sign() * torch.log1p(-2.0 * u.abs())).to(device)


class LIMITLoss(nn.Module):
    r"""LIMIT objective for a classifier and its q-network, mean over the batch.

    Called as ``loss(logits, q_logits, labels)``; returns ``carrier + q_loss`` (see
    :func:`limit_terms`). After ``backward()``:

    - the gradient w.r.t. the classifier logits ``z`` is exactly ``(softmax(z) - softmax(u)) / B``
      (the predicted gradient ``ĝ = sg(p) - r``, mean-reduced), and does not depend on the labels;
    - the gradient w.r.t. the q-network logits ``u`` is that of
      ``mean_i[ Σ_k (r - e_ỹ)² + L Σ_k (sg(p) - r)² ]`` (gaussian) or
      ``mean_i[ Σ_k |r - e_ỹ| + L Σ_k (sg(p) - r)² ]`` (laplace), with ``r = softmax(u)``.

    The returned value is the carrier CE of the classifier (a metric: it is *not* what the
    classifier minimises) plus the q-network's loss. Use :func:`limit_terms` to log them apart.
    See docs/methods.md#limit: the classifier never sees a label-dependent gradient; ``p`` is
    detached in ``ĝ`` and in the ``L`` term; ``ĝ`` is averaged over the batch instead of the
    official per-sample unscaled ``ĝ``; the q-loss sums over classes and averages over the batch.

    Parameters
    ----------
    num_classes
        ``C`` (≥ 2).
    variant
        ``"gaussian"`` (LIMIT_G: squared error, i.e. Brier loss for q) or ``"laplace"``
        (LIMIT_L: absolute error, ``Σ_k |r - e_ỹ| = 2(1 - r_ỹ)``). Both were run in the paper.
    grad_weight_decay
        ``L`` (the official ``-L`` flag), default 0.0; valid ``L >= 0``. Official grids: CIFAR-10
        {0, 0.1, 0.3, 1, 3, 10, 30}, CIFAR-100 {0.1, ..., 30}; the code's docstring advises
        0.03-10 (docs/methods.md#limit).

    Notes
    -----
    The optional noise on ``ĝ`` (official ``sample_from_q``, off by default) is the ``g_noise``
    argument of :func:`limit_terms` with :func:`sample_grad_noise`.
    """

    def __init__(
        self,
        num_classes: int,
        variant: LimitVariant = "gaussian",
        grad_weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_classes = check_num_classes(num_classes)
        if variant not in ("gaussian", "laplace"):
            raise ConfigError(f"variant must be 'gaussian' or 'laplace', got {variant!r}")
        self.variant: LimitVariant = variant
        self.grad_weight_decay = check_range("grad_weight_decay", grad_weight_decay, low=0.0)

    def forward(self, logits: Tensor, q_logits: Tensor, labels: Tensor) -> Tensor:
        """Return ``carrier + q_loss`` for classifier ``logits`` and q-network ``q_logits``."""
        check_inputs(logits, labels, self.num_classes)
        carrier, q_loss = limit_terms(
            logits, q_logits, labels, self.variant, self.grad_weight_decay
        )
        return carrier + q_loss

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, variant={self.variant!r}, "
            f"grad_weight_decay={self.grad_weight_decay:g}"
        )
