"""Cross-entropy on the given (noisy) labels: the baseline every method is compared with."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distnoisy.methods.base import METHODS, Method, StepOutput


@METHODS.register("ce")
class CrossEntropy(Method):
    """Plain CE, mean over the batch. Label-issue score: mean loss history
    (docs/methods.md#label-issue-scores)."""

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> StepOutput:
        return StepOutput(F.cross_entropy(logits, labels))
