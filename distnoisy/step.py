"""One training step with its per-sample bookkeeping: :func:`train_step`, the hot path.

Nothing here waits for the device: the step's loss and its count of correct predictions come
back as device tensors, which the trainer adds up and reads once per epoch. (The store's own
staging still copies the step's rows to the CPU; see :mod:`distnoisy.store`.) Only torch is
imported: the GPU benchmark runs this module on machines without the rest of the stack.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F

from distnoisy.methods import Method
from distnoisy.methods.base import Networks, Optimizers, StepInput
from distnoisy.store import FieldSpec, SampleStore


def train_step(
    method: Method,
    nets: Networks,
    opts: Optimizers,
    store: SampleStore,
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
        The forward passes' autocast context (:meth:`distnoisy.accel.Precision.autocast`);
        None = full precision.

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
        store.stage("train_pred", batch.index, pred)
        store.flush()
        return result.loss, (pred == batch.y).sum()


def declare_run_fields(store: SampleStore, epochs: int, num_classes: int) -> None:
    """The per-sample fields every run keeps, whatever the method.

    - ``loss_hist`` (N x epochs, NaN where not visited): the cross-entropy of the training
      logits on the given label, per epoch;
    - ``pred_hist`` (N x epochs, int16, -1 where not visited): the training prediction per
      epoch, so "first epoch a wrong label was predicted" and forgetting events are derivable;
    - ``train_pred`` (N, -1 where never visited): the latest training prediction;
    - ``final_prob`` (N x C): softmax of the final weights on the un-augmented training set.
    """
    store.declare("loss_hist", FieldSpec(shape=(epochs,), fill=float("nan")))
    store.declare("pred_hist", FieldSpec(shape=(epochs,), dtype=torch.int16, fill=-1))
    store.declare("train_pred", FieldSpec(dtype=torch.int64, fill=-1))
    store.declare("final_prob", FieldSpec(shape=(num_classes,)))
