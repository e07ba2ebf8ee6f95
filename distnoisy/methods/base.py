"""The method interface and registry."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from distnoisy.core.method_params import MethodParams
from distnoisy.core.registry import Registry
from distnoisy.store import FieldSpec, Store

METHODS: Registry[type[Method]] = Registry("method")


@dataclass
class PrepareContext:
    """What a method may use in the driver, before training, to build its resources.

    Attributes
    ----------
    num_classes
        C.
    noise_transition
        The realised noise transition matrix (C x C, rows = clean class) when clean labels are
        known, else None.
    run_dir
        The run's output directory (for files a method wants to keep beside the run).
    train_reference
        ``train_reference(method_name) -> Path``: trains a reference run with the same data,
        noise, model and schedule but another method (e.g. ``"ce"``) into a sub-directory of
        ``run_dir`` and returns its output directory (holding ``sample_stats.parquet``).
    """

    num_classes: int
    noise_transition: list[list[float]] | None
    run_dir: Path
    train_reference: Callable[[str], Path] = field(repr=False)


@dataclass
class StepOutput:
    loss: torch.Tensor  # the scalar to backpropagate (mean over the local batch)


@dataclass
class StepInput:
    """One local batch and where it sits in training.

    ``step`` counts this phase's batches within the epoch (0-based), so the global iteration is
    ``epoch * steps_per_epoch + step``: a pure function of the position, identical after resume.
    """

    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor  # global sample indices (CPU)
    epoch: int
    step: int
    steps_per_epoch: int
    phase: str = "model"

    @property
    def iteration(self) -> int:
        return self.epoch * self.steps_per_epoch + self.step


@dataclass
class StepResult:
    """What one training step reports to the trainer.

    ``logits`` are detached per-sample logits on the *un-mixed* local batch; the trainer keeps
    the per-epoch loss history and training predictions from them.
    """

    loss: torch.Tensor  # detached 0-d tensor on the device: no host synchronisation per step
    logits: torch.Tensor


def full_precision(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 if autocast made it bf16 or fp16; float32 and float64 stay as they are.

    Losses are computed from these: a loss in bf16 would round away the small per-sample
    differences the noisy-label methods rely on.
    """
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def loss_region(t: torch.Tensor) -> contextlib.AbstractContextManager[Any]:
    """Autocast off on ``t``'s device, for a loss's arithmetic (a matmul in a loss, e.g. forward
    correction's ``p @ T``, would otherwise run in bf16/fp16); nothing when autocast is off."""
    kind = t.device.type
    if torch.is_autocast_enabled(kind):
        return torch.autocast(kind, enabled=False)
    return contextlib.nullcontext()


Networks = dict[str, nn.Module]
Optimizers = dict[str, torch.optim.Optimizer]


class Method(ABC):
    """Base class of a training method.

    Subclasses set ``Params`` (a dataclass of their ``method.*`` keys), implement :meth:`loss`,
    and may declare per-sample ``fields``, epoch hooks and a label-issue score.

    Parameters
    ----------
    params
        The method's parameter dataclass (``cfg.method``).
    num_samples, num_classes, epochs
        Training-set size N, number of classes C and the number of epochs E.
    resources
        What :meth:`prepare_resources` returned in the driver.
    seed
        The run's seed.
    """

    Params: ClassVar[type[MethodParams]] = MethodParams
    #: One line on how :meth:`label_issue_scores` ranks samples (written into the outputs).
    score_description: ClassVar[str] = "mean training loss on the given label over all epochs"

    def __init__(
        self,
        params: Any,
        *,
        num_samples: int,
        num_classes: int,
        epochs: int,
        resources: dict[str, Any] | None = None,
        seed: int = 0,
    ) -> None:
        self.params = params
        self.num_samples = num_samples
        self.num_classes = num_classes
        self.epochs = epochs
        self.seed = seed  # the run's seed, for methods that draw random numbers (mixup)
        self.resources = dict(resources or {})
        self.store: Store | None = None
        # The fp16 gradient scaler (a torch.amp.GradScaler), set by the trainer; None otherwise.
        self.grad_scaler: Any = None

    @classmethod  # noqa: B027 (an optional hook: no checks by default)
    def validate_params(cls, params: Any) -> None:
        """Raise :class:`~distnoisy.core.errors.ConfigError` for invalid ``method.*`` values.

        Called when the config is loaded, before anything runs.
        """

    @classmethod
    def prepare_resources(cls, params: Any, context: PrepareContext) -> dict[str, Any]:
        """Driver-side preparation (e.g. estimate a transition matrix from a reference run).

        The result must be JSON-able: it travels to every worker and is passed to the
        constructor as ``resources``. Default: nothing.
        """
        return {}

    def fields(self) -> dict[str, FieldSpec]:
        """Per-sample fields this method keeps in the store."""
        return {}

    def attach(self, store: Store) -> None:
        for name, spec in self.fields().items():
            store.declare(name, spec)
        self.store = store

    # -- networks: one ``model`` trained by one optimizer, unless a method needs more ----------
    def build_networks(self, build: Callable[..., nn.Module]) -> Networks:
        """The networks this method trains, each from ``build()`` (the ``model.*`` config).

        ``build(name=None, weights=None)`` builds registry model ``name`` instead, with the
        given local pretrained weights (``model.weights`` applies only to ``model.name``).

        The trainer moves them to the device, calls :meth:`setup`, then wraps each in DDP.
        """
        return {"model": build()}

    def setup(self, nets: Networks, device: torch.device) -> None:  # noqa: B027 (optional hook)
        """Build method-owned state that depends on the networks (e.g. EMA copies)."""

    def build_optimizers(
        self, nets: Networks, make: Callable[[Any], torch.optim.Optimizer]
    ) -> Optimizers:
        """Optimizers from ``make(params)`` (the ``train.*`` optimizer); one per network."""
        return {name: make(net.parameters()) for name, net in nets.items()}

    def phases(self) -> tuple[str, ...]:
        """The passes over the training data in one epoch, in order (ELR+: one per network)."""
        return ("model",)

    def train_step(self, batch: StepInput, nets: Networks, opts: Optimizers) -> StepResult:
        """Forward, loss, backward and optimizer step of one local batch.

        ``nets`` are the DDP-wrapped networks (the raw ones on a single process). The default
        trains ``nets["model"]`` on :meth:`loss`.
        """
        logits = nets["model"](batch.x)
        # Losses in float32 whatever the autocast precision of the forward pass.
        with loss_region(logits):
            out = self.loss(full_precision(logits), batch.y, batch.index)
        opt = opts["model"]
        opt.zero_grad(set_to_none=True)
        self.backward(out.loss)
        self.optimizer_step(opt)
        return StepResult(out.loss.detach(), logits.detach())

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, outside autocast and scaled by the fp16 gradient scaler if any.

        Steps that override :meth:`train_step` call this and :meth:`optimizer_step` instead of
        ``loss.backward()`` and ``opt.step()``, so that every precision works for them.
        """
        if self.grad_scaler is not None:
            loss = self.grad_scaler.scale(loss)
        kind = loss.device.type
        if torch.is_autocast_enabled(kind):
            with torch.autocast(kind, enabled=False):
                loss.backward()
        else:
            loss.backward()

    def optimizer_step(self, opt: torch.optim.Optimizer) -> None:
        """``opt.step()``; with the fp16 scaler, skipped when the gradients overflowed."""
        if self.grad_scaler is None:
            opt.step()
        else:
            self.grad_scaler.step(opt)

    def predict(self, nets: Networks, x: torch.Tensor) -> torch.Tensor:
        """Logits used for evaluation and final predictions (networks in eval mode)."""
        return nets["model"](x)

    def on_epoch_start(self, epoch: int) -> dict[str, float]:
        """Called before each epoch; returns values to log (e.g. a schedule)."""
        return {}

    def seek(self, phase: str, step: int) -> None:  # noqa: B027 (optional hook)
        """A run resumed mid-epoch: called after :meth:`on_epoch_start`, before the epoch's
        step ``step`` of ``phase`` (the batches before it were trained before the
        interruption). Methods that count steps themselves move their count here."""

    @abstractmethod
    def loss(self, logits: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> StepOutput:
        """The scalar loss of one local batch (``index`` = the samples' global indices); may
        stage per-sample writes in ``self.store``."""

    def label_issue_scores(
        self,
        given: np.ndarray,
        probs: np.ndarray,
        loss_history: np.ndarray,
        fields: Mapping[str, torch.Tensor],
    ) -> tuple[np.ndarray, np.ndarray]:
        """Score (higher = more likely mislabelled) and suggested label per training sample.

        Called on a block of rows (all of them, or one rank's part of a partitioned store):
        ``given``, ``probs`` (final predictions), ``loss_history`` and ``fields`` (every store
        field, e.g. ELR's targets) hold the same rows, in the same order.

        The default (docs/methods.md#label-issue-scores) is the mean over epochs of the per-sample
        training loss on the given label, with the final model's prediction as the suggestion.
        Epochs in which a
        sample was not drawn (``NaN``; shard-split streams drop a few per epoch) are skipped; a
        sample never drawn is scored by the final model's loss on its given label.
        """
        seen = np.isfinite(loss_history)
        total = np.where(seen, loss_history, 0.0).sum(axis=1)
        count = seen.sum(axis=1)
        final_loss = -np.log(np.clip(probs[np.arange(len(given)), given], 1e-12, None))
        score = np.where(count > 0, total / np.maximum(count, 1), final_loss)
        return score, probs.argmax(axis=1)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 (optional hook)
        """Restore what :meth:`state_dict` returned (methods with state override both)."""

    def rng_state_dict(self) -> dict[str, Any]:
        """This rank's own random generators (tensors and plain values), for exact resume.

        Unlike :meth:`state_dict` (identical on every rank, saved once), this is gathered from
        every rank: methods that seed a generator per rank return its state here. Generators
        keyed by the step's position or the sample (LIMIT's gradient noise) need nothing.
        """
        return {}

    def load_rng_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 (optional hook)
        """Restore what :meth:`rng_state_dict` returned on this rank."""
