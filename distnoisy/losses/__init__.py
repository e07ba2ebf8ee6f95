"""Losses for learning with noisy labels, as plain ``torch.nn.Module``\\ s (mean over the batch).

Every module takes logits ``[B, C]`` and integer labels ``[B]`` (``ELRLoss`` also the samples'
global indices, ``LIMITLoss`` also the q-network's logits). The math, defaults and sources are in
each class's docstring and in docs/methods.md. Invalid hyperparameters raise
:class:`~distnoisy.core.errors.ConfigError` at construction.

``LOSSES`` maps the ``method.name`` of the config to the class that implements its loss.
"""

from __future__ import annotations

from torch import nn

from distnoisy.losses.apl import NCERCELoss, nce_per_sample
from distnoisy.losses.bootstrap import BootstrapLoss
from distnoisy.losses.ce import CELoss
from distnoisy.losses.correction import (
    BackwardCorrectionLoss,
    ForwardCorrectionLoss,
    check_transition_matrix,
    estimate_transition_matrix,
)
from distnoisy.losses.dal import DALLoss, dal_lambda, dal_q, dal_t0
from distnoisy.losses.elr import ELRLoss, elr_loss, elr_regularizer, elr_target_update
from distnoisy.losses.gce import GCELoss, TruncatedGCELoss, gce_per_sample
from distnoisy.losses.label_smoothing import LabelSmoothingLoss
from distnoisy.losses.limit import LIMITLoss, limit_terms, sample_grad_noise
from distnoisy.losses.mae import MAELoss
from distnoisy.losses.peer import PeerLoss
from distnoisy.losses.sce import SCELoss

LOSSES: dict[str, type[nn.Module]] = {
    "ce": CELoss,
    "mae": MAELoss,
    "gce": GCELoss,
    "tgce": TruncatedGCELoss,
    "sce": SCELoss,
    "nce_rce": NCERCELoss,
    "ls": LabelSmoothingLoss,
    "bootstrap": BootstrapLoss,
    "forward": ForwardCorrectionLoss,
    "backward": BackwardCorrectionLoss,
    "peer": PeerLoss,
    "elr": ELRLoss,
    "dal": DALLoss,
    "limit": LIMITLoss,
}

__all__ = [
    "LOSSES",
    "BackwardCorrectionLoss",
    "BootstrapLoss",
    "CELoss",
    "DALLoss",
    "ELRLoss",
    "ForwardCorrectionLoss",
    "GCELoss",
    "LIMITLoss",
    "LabelSmoothingLoss",
    "MAELoss",
    "NCERCELoss",
    "PeerLoss",
    "SCELoss",
    "TruncatedGCELoss",
    "check_transition_matrix",
    "dal_lambda",
    "dal_q",
    "dal_t0",
    "elr_loss",
    "elr_regularizer",
    "elr_target_update",
    "estimate_transition_matrix",
    "gce_per_sample",
    "limit_terms",
    "nce_per_sample",
    "sample_grad_noise",
]
