"""The network a finished run predicts with, as one module (what its MLflow model holds)."""

from __future__ import annotations

import torch
from torch import nn


class Predictor(nn.Module):
    """The mean logits of a method's predicting networks (one for most methods, two for ELR+).

    Parameters
    ----------
    networks
        The trained networks, each mapping ``(B, C_in, H, W)`` images (after the run's eval
        transform, i.e. normalised with its mean and std) to ``(B, num_classes)`` logits.
    """

    def __init__(self, networks: list[nn.Module]) -> None:
        super().__init__()
        if not networks:
            raise ValueError("a Predictor needs at least one network")
        self.networks = nn.ModuleList(networks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the ``(B, num_classes)`` logits: the mean over the networks."""
        return torch.stack([net(x) for net in self.networks]).mean(0)
