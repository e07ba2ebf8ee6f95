"""One training step with its per-sample bookkeeping: :func:`train_step`, the hot path.

Nothing here waits for the device: the step's loss and its count of correct predictions come
back as device tensors, which the trainer adds up and reads once per epoch. (The replicated
store's staging still copies the step's rows to the CPU; the partitioned store copies them
on its communication thread; see :mod:`distnoisy.store`.) On import it loads torch, numpy and
distnoisy's core, collectives, methods, losses and store, but no Ray, MLflow, OmegaConf,
WebDataset or data loader: the GPU benchmark (:mod:`distnoisy.bench.gpu`) runs the step on a
machine with only torch, torchvision, numpy and pillow.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F

from distnoisy.methods import Method
from distnoisy.methods.base import Networks, Optimizers, StepInput
from distnoisy.store import FieldSpec, Store


def train_step(
    method: Method,
    nets: Networks,
    opts: Optimizers,
    store: Store,
    batch: StepInput,
    autocast: contextlib.AbstractContextManager[Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step and its per-sample bookkeeping (a collective: ``store.flush``).

    Parameters
    ----------
    method, nets, opts, store
        The method, its (DDP-wrapped) networks and optimizers, and the per-sample store.
    batch
        The local batch (inputs and labels on the training device, indices on the CPU).
    autocast
        The forward passes' autocast context
        (:meth:`distnoisy.engine.precision.Precision.autocast`); None = full precision.

    Returns
    -------
    loss, correct
        The batch loss (float32, or float64 for float64 networks) and the number of training
        predictions equal to the given labels (int64): 0-d tensors on the training device, not
        synchronised.
    """
    with autocast if autocast is not None else contextlib.nullcontext():
        result = method.train_step(batch, nets, opts)
    if method.grad_scaler is not None:
        method.grad_scaler.update()
    with torch.no_grad():
        logits = result.logits.float()
        ce = F.cross_entropy(logits, batch.y, reduction="none")
        pred = logits.argmax(1)
        store.stage("loss_hist", batch.index, ce, column=batch.epoch)
        store.stage("pred_hist", batch.index, pred.to(torch.int16), column=batch.epoch)
        store.stage("margin_hist", batch.index, margins(logits, batch.y), column=batch.epoch)
        store.stage("train_pred", batch.index, pred)
        store.flush()
        return result.loss, (pred == batch.y).sum()


def run_field_specs(epochs: int, num_classes: int) -> dict[str, FieldSpec]:
    """The per-sample fields every run keeps, whatever the method.

    - ``loss_hist`` (N x epochs, NaN where not visited): the cross-entropy of the training
      logits on the given label, per epoch;
    - ``pred_hist`` (N x epochs, int16, -1 where not visited): the training prediction per
      epoch, so "first epoch memorized" and forgetting events are one call away
      (:mod:`distnoisy.store.history`);
    - ``margin_hist`` (N x epochs, NaN where not visited): the given label's logit minus the
      largest other logit, per epoch (area under the margin);
    - ``train_pred`` (N, -1 where never visited): the latest training prediction;
    - ``final_prob`` (N x C): softmax of the final weights on the un-augmented training set.

    The float fields may be stored in float16/bfloat16 (``store.dtype``).
    """
    return {
        "loss_hist": FieldSpec(shape=(epochs,), fill=float("nan"), lowp=True),
        "pred_hist": FieldSpec(shape=(epochs,), dtype=torch.int16, fill=-1),
        "margin_hist": FieldSpec(shape=(epochs,), fill=float("nan"), lowp=True),
        "train_pred": FieldSpec(dtype=torch.int64, fill=-1),
        "final_prob": FieldSpec(shape=(num_classes,), lowp=True),
    }


def declare_run_fields(store: Store, epochs: int, num_classes: int) -> None:
    """Declare :func:`run_field_specs` in ``store``."""
    for name, spec in run_field_specs(epochs, num_classes).items():
        store.declare(name, spec)


def margins(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Logit of the given label minus the largest other logit, per row."""
    given = logits.gather(1, labels[:, None])[:, 0]
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return given - others.max(1).values
