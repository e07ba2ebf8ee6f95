"""The base of every method that is one loss module on ``(logits, labels)`` with no per-sample
state (GCE, DAL, MAE, SCE, NCE+RCE, LS, bootstrapping, forward/backward correction, peer loss):
"build the loss once, call it every step"."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from distnoisy.core.errors import ConfigError
from distnoisy.methods.base import Method, StepOutput
from distnoisy.store import Store


@contextmanager
def param_errors(method: str) -> Iterator[None]:
    """Re-raise a loss module's :class:`ConfigError` with the method's name in front.

    The loss classes name the bad argument (``"q must be in (0, inf), got 0"``); at config-load
    time the user also needs to know which ``method.name`` the ``method.*`` key belongs to.
    """
    try:
        yield
    except ConfigError as err:
        raise ConfigError(f"invalid value for method {method!r}: {err}") from None


class LossMethod(Method):
    """A method that is one loss module applied to the local batch, with no per-sample state.

    Subclasses implement :meth:`build_loss` (from ``self.params``, ``self.num_classes``,
    ``self.epochs`` and ``self.resources``) and :meth:`check_params` (config-load-time checks,
    usually by building the loss module once with placeholder sizes: the loss classes validate
    their arguments). :meth:`loss` returns ``StepOutput(criterion(logits, labels))``, the mean
    over the local batch; DDP averages it across ranks. The label-issue score is the base
    default (mean training CE on the given label over epochs, docs/methods.md#label-issue-scores).
    """

    def __init__(self, params: Any, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        with param_errors(params.name):
            self.criterion: nn.Module | None = self.build_loss()

    @classmethod
    def validate_params(cls, params: Any) -> None:
        with param_errors(params.name):
            cls.check_params(params)

    @classmethod
    def check_params(cls, params: Any) -> None:
        """Raise :class:`ConfigError` for invalid ``method.*`` values (no sizes known yet)."""

    @abstractmethod
    def build_loss(self) -> nn.Module | None:
        """The loss module for this run (``None`` only when resources are still missing)."""

    def require_criterion(self) -> nn.Module:
        """The loss module; subclasses that may lack one override this to explain why."""
        assert self.criterion is not None
        return self.criterion

    def attach(self, store: Store) -> None:
        # Called by the worker before training: the last moment to fail with a clear message
        # (the driver's dry build constructs methods without their resources).
        self.require_criterion()
        super().attach(store)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> StepOutput:
        criterion = self.require_criterion()
        # Buffers (e.g. a transition matrix) must follow the logits to the GPU; .to() is a no-op
        # once they are there.
        criterion.to(logits.device)
        return StepOutput(criterion(logits, labels))
