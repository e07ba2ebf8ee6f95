"""ELR: early-learning regularisation (Liu et al., NeurIPS 2020), docs/methods.md#elr.

The per-sample targets t_i (N x C, zeros at start) live in the shared store as ``elr_target``,
so a sample's target is the same whichever worker visits it and is saved with checkpoints.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from distnoisy.core.errors import ConfigError
from distnoisy.core.method_params import MethodParams
from distnoisy.losses.elr import elr_loss, elr_target_update
from distnoisy.methods.base import METHODS, Method, StepOutput
from distnoisy.store import FieldSpec


@dataclass
class ELRParams(MethodParams):
    # Temporal-ensembling momentum of the targets (official CIFAR-10 sym: 0.7; README: robust).
    beta: float = 0.7
    # Regulariser weight (official CIFAR-10 sym: 3; needs tuning per noise rate).
    lam: float = 3.0


@METHODS.register("elr")
class ELR(Method):
    """Loss = CE(z, y) + lam * log(1 - <t, clamp(p)>), with t updated before the loss.

    Label-issue score: ``1 - t_i[given label]`` (target disagreement); suggested label:
    ``argmax t_i``.
    """

    Params = ELRParams
    score_description = "1 - ELR target probability of the given label"

    @classmethod
    def validate_params(cls, params: Any) -> None:
        if not 0.0 <= params.beta < 1.0:
            raise ConfigError(f"method.beta={params.beta} must be in [0, 1)")
        if params.lam < 0:
            raise ConfigError(f"method.lam={params.lam} must be >= 0")

    def fields(self) -> dict[str, FieldSpec]:
        return {"elr_target": FieldSpec(shape=(self.num_classes,), lowp=True)}

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> StepOutput:
        assert self.store is not None
        old = self.store.get("elr_target", index).to(logits.device)
        # Update before the loss (docs/methods.md#elr): the loss sees the new target.
        new = elr_target_update(old, logits, self.params.beta)
        self.store.stage("elr_target", index, new)
        return StepOutput(elr_loss(logits, labels, new, self.params.lam))

    def label_issue_scores(
        self,
        given: np.ndarray,
        probs: np.ndarray,
        loss_history: np.ndarray,
        fields: Mapping[str, torch.Tensor],
    ) -> tuple[np.ndarray, np.ndarray]:
        targets = fields["elr_target"].float().numpy()
        score = 1.0 - targets[np.arange(len(given)), given]
        return score, targets.argmax(axis=1)
