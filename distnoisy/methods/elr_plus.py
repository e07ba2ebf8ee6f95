"""ELR+: two networks, mixup, weight averaging and ELR targets (docs/methods.md#elr-two-networks).

Each epoch trains ``net1`` for a whole pass over the data, then ``net2`` (the order of the
official trainer). A step of network k:

1. ``ℓ ~ Beta(α, α)``, ``ℓ ← max(ℓ, 1 - ℓ)``, one per batch, and a pairing ``π`` of the batch;
2. ``t^k_i ← β t^k_i + (1 - β) softmax(f̃^other(x_i))``: the *other* network's EMA copy on the
   *un-mixed* batch (train mode, no clamp), before the loss;
3. loss on the mixed batch with ``Y_mix`` and ``q = ℓ t^k + (1 - ℓ) t^k_π``
   (:func:`~distnoisy.losses.elr_plus.elr_plus_loss`; on C = 100, ``Y' = normalise(Y_mix ⊙ q)``);
4. SGD step on network k, then ``θ̃^k ← a_t θ̃^k + (1 - a_t) θ^k``.

Prediction is the mean of the two networks' logits. The two target arrays are the store fields
``elr_target_net1``/``elr_target_net2``; the EMA weights are checkpointed with the method.

Distributed: ``ℓ`` and ``π`` come from a generator seeded by (run seed, network, iteration), so
every rank draws the same. ``method.mixup_pairs=global`` (default) pairs samples across the
whole global batch in a canonical order (sorted by sample index), exactly as one process with
the global batch does, so 1 and N workers train identically; it gathers the batch's inputs
(one all-gather per step). ``local`` pairs within each rank's batch (no input traffic: use it
for large images on many workers).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from distnoisy.core.errors import ConfigError
from distnoisy.core.method_params import MethodParams
from distnoisy.engine import collectives
from distnoisy.losses.elr_plus import (
    elr_plus_loss,
    elr_plus_target_update,
    ema_decay,
    ema_update,
    mix,
    mixup_coefficient,
    sigmoid_rampup,
)
from distnoisy.methods.base import (
    METHODS,
    Method,
    Networks,
    Optimizers,
    StepInput,
    StepOutput,
    StepResult,
    full_precision,
    loss_region,
)
from distnoisy.store import FieldSpec

NETWORKS = ("net1", "net2")
REWEIGHT = ("auto", "always", "never")
PAIRINGS = ("global", "local")


@dataclass
class ELRPlusParams(MethodParams):
    # Official CIFAR-10 symmetric-noise values (docs/methods.md#elr-two-networks); Clothing1M:
    # ema_alpha 0.9999, ema_ramp false; CIFAR-100: beta 0.9, lam 7, coef_step 40000.
    beta: float = 0.7
    lam: float = 3.0
    mixup_alpha: float = 1.0
    ema_alpha: float = 0.997
    # true: a_t = ema_alpha * sigmoid_rampup(t + 1, ema_step); false: min(1 - 1/(t + 1), ema_alpha)
    ema_ramp: bool = True
    ema_step: int = 40000
    # λ ramp length in iterations (0 = no ramp).
    coef_step: int = 0
    # Re-weight the mixed one-hot labels by the targets: auto = only when C == 100 (official).
    target_reweight: str = "auto"
    # Mixup partners from the whole global batch (exact for any worker count) or per rank.
    mixup_pairs: str = "global"


def _other(net: str) -> str:
    return NETWORKS[1 - NETWORKS.index(net)]


@METHODS.register("elr_plus")
class ELRPlus(Method):
    """Two networks with mixup, EMA copies and ELR targets from the other network's EMA.

    Label-issue score: ``1 - (t¹_i + t²_i)/2`` at the given label; suggested label: the argmax
    of the mean target.
    """

    Params = ELRPlusParams
    score_description = "1 - mean of the two ELR+ targets at the given label"

    def __init__(self, params: Any, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.ema: dict[str, nn.Module] = {}
        mode = params.target_reweight
        self.reweight = self.num_classes == 100 if mode == "auto" else mode == "always"

    @classmethod
    def validate_params(cls, params: Any) -> None:
        p = params
        if p.mixup_alpha <= 0:
            raise ConfigError(
                f"method.mixup_alpha={p.mixup_alpha} must be > 0: ELR+ always mixes "
                "(ℓ ~ Beta(α, α)); the official value is 1 (1.5 on WebVision). For ELR without "
                "mixup use method.name=elr"
            )
        if not 0.0 <= p.beta < 1.0:
            raise ConfigError(f"method.beta={p.beta} must be in [0, 1)")
        if p.lam < 0:
            raise ConfigError(f"method.lam={p.lam} must be >= 0")
        if not 0.0 <= p.ema_alpha < 1.0:
            raise ConfigError(f"method.ema_alpha={p.ema_alpha} must be in [0, 1)")
        for key in ("ema_step", "coef_step"):
            if getattr(p, key) < 0:
                raise ConfigError(f"method.{key}={getattr(p, key)} must be >= 0")
        if p.target_reweight not in REWEIGHT:
            raise ConfigError(
                f"method.target_reweight={p.target_reweight!r} must be one of {', '.join(REWEIGHT)}"
            )
        if p.mixup_pairs not in PAIRINGS:
            raise ConfigError(
                f"method.mixup_pairs={p.mixup_pairs!r} must be one of {', '.join(PAIRINGS)}"
            )

    # -- networks ---------------------------------------------------------------------------
    def fields(self) -> dict[str, FieldSpec]:
        return {
            f"elr_target_{k}": FieldSpec(shape=(self.num_classes,), lowp=True) for k in NETWORKS
        }

    def build_networks(self, build: Callable[..., nn.Module]) -> Networks:
        return {k: build() for k in NETWORKS}

    def setup(self, nets: Networks, device: torch.device) -> None:
        # EMA copies start as copies of the live networks: the official independently
        # initialised EMAs converge to these within a few hundred steps
        # (docs/methods.md#elr-two-networks).
        self.ema = {k: copy.deepcopy(nets[k]).requires_grad_(False) for k in NETWORKS}

    def phases(self) -> tuple[str, ...]:
        return NETWORKS

    def predict(self, nets: Networks, x: torch.Tensor) -> torch.Tensor:
        return (nets["net1"](x) + nets["net2"](x)) / 2

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> StepOutput:
        raise TypeError("ELR+ trains two networks through train_step, not a single loss")

    # -- one step -----------------------------------------------------------------------------
    def _rng(self, batch: StepInput, purpose: int, rank: int | None = None) -> np.random.Generator:
        """Generator for ``purpose`` (0: ℓ, 1: pairing) of this step; with ``rank``, per rank."""
        key = [self.seed, NETWORKS.index(batch.phase), batch.iteration, purpose]
        return np.random.default_rng(key if rank is None else [*key, rank])

    @staticmethod
    def _partners(index: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """Row of each row's mixup partner: ``π`` drawn over the batch in sample-index order,
        so the pairing does not depend on how the batch is split over ranks."""
        order = torch.argsort(index)
        perm = torch.from_numpy(rng.permutation(len(index)))
        position = torch.empty_like(order)
        position[order] = torch.arange(len(order))
        return order[perm[position]]

    def train_step(self, batch: StepInput, nets: Networks, opts: Optimizers) -> StepResult:
        assert self.store is not None
        p = self.params
        k, other = batch.phase, _other(batch.phase)
        field = f"elr_target_{k}"
        x, y, index = batch.x, batch.y, batch.index
        # The ramps count steps from 1, as the official trainer does (its step number is
        # incremented before use): at the first step the λ ramp is sigmoid_rampup(1, coef_step)
        # and the EMA coefficient is min(1 - 1/2, α) = 0.5 or α·sigmoid_rampup(2, ema_step).
        # The mixup generator stays keyed on the 0-based batch.iteration.
        t = batch.iteration + 1

        with torch.no_grad():
            # Targets from the other network's EMA on the un-mixed batch, before the loss.
            ema_logits = full_precision(self.ema[other](x))
            old = self.store.get(field, index).to(x.device)
            with loss_region(ema_logits):
                targets = elr_plus_target_update(old, ema_logits, p.beta)
        self.store.stage(field, index, targets)

        one_hot = F.one_hot(y, self.num_classes).to(targets.dtype)
        pooled = p.mixup_pairs == "global" and collectives.world_size() > 1
        lam = mixup_coefficient(p.mixup_alpha, self._rng(batch, 0))
        if pooled:
            # Gather the global batch (inputs, labels, new targets in one message); this rank's
            # rows start at rank * local batch size.
            c = self.num_classes
            packed = torch.cat([x.flatten(1).float(), one_hot.float(), targets.float()], dim=1)
            packed = collectives.all_gather_cat(packed)
            all_x = packed[:, : -2 * c].reshape(-1, *x.shape[1:]).to(x.dtype)
            all_y, all_t = packed[:, -2 * c : -c], packed[:, -c:]
            all_index = collectives.all_gather_cat(index.to(x.device)).cpu()
            rows = self._partners(all_index, self._rng(batch, 1))
            start = collectives.rank() * len(index)
            partner = rows[start : start + len(index)].to(x.device)
        else:
            rank = None if collectives.world_size() == 1 else collectives.rank()
            rows = self._partners(index, self._rng(batch, 1, rank))
            partner = rows.to(x.device)
            all_x, all_y, all_t = x, one_hot, targets
        x_mix = mix(x, all_x[partner], lam)
        y_mix = mix(one_hot, all_y[partner], lam)
        q_mix = mix(targets, all_t[partner], lam)

        logits = nets[k](x_mix)
        ramp = sigmoid_rampup(t, p.coef_step)
        with loss_region(logits):
            loss = elr_plus_loss(
                full_precision(logits), y_mix, q_mix, p.lam, ramp=ramp, reweight=self.reweight
            )
        opt = opts[k]
        opt.zero_grad(set_to_none=True)
        self.backward(loss)
        self.optimizer_step(opt)
        ema_update(self.ema[k], nets[k], ema_decay(t, p.ema_alpha, p.ema_ramp, p.ema_step))
        # Per-sample statistics (loss history, training predictions) on the un-mixed batch.
        return StepResult(loss.detach(), ema_logits.detach())

    # -- outputs and state ----------------------------------------------------------------------
    def label_issue_scores(
        self,
        given: np.ndarray,
        probs: np.ndarray,
        loss_history: np.ndarray,
        fields: Mapping[str, torch.Tensor],
    ) -> tuple[np.ndarray, np.ndarray]:
        mean = (fields["elr_target_net1"].float() + fields["elr_target_net2"].float()).numpy() / 2
        return 1.0 - mean[np.arange(len(given)), given], mean.argmax(axis=1)

    def state_dict(self) -> dict[str, Any]:
        return {"ema": {k: net.state_dict() for k, net in self.ema.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, sd in state["ema"].items():
            self.ema[k].load_state_dict(sd)
