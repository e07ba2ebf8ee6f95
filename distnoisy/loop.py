"""The per-worker building blocks of training: plain torch + torch.distributed, no Ray.

A launcher (Ray Train, or the in-process/multiprocess local launcher) calls :func:`run_worker`
on every rank with a :class:`WorkerContext` that supplies ``report`` (metrics + optional
checkpoint, once per epoch on every rank) and ``restore`` (the latest checkpoint, if any);
:class:`distnoisy.trainer.Trainer` runs the recipe from the pieces here: one training step,
prediction and accuracy passes, the bad-sample and class-mix checks, the run's outputs.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from distnoisy import dist
from distnoisy.config import Config
from distnoisy.data.mixing import (
    POOR_MIX,
    expected_distinct_classes,
    poor_mix_message,
)
from distnoisy.data.prepare import DataSpec
from distnoisy.methods import Method
from distnoisy.methods.base import Networks
from distnoisy.models import build_model

# Re-exported for callers: the hot path lives in distnoisy.step (torch-only imports).
from distnoisy.step import declare_run_fields, run_field_specs, train_step  # noqa: F401

log = logging.getLogger(__name__)

# Skipped samples listed by name in summary.json (all are counted).
MAX_LISTED_BAD = 1000
OUTPUTS_DIR = "outputs"


@dataclass
class WorkerContext:
    """What a launcher gives the loop.

    ``report(metrics, checkpoint_dir)`` is called by every rank once per epoch, each with its
    own directory or None (rank 0 always passes one); the launcher merges the ranks'
    directories into one checkpoint. ``restore()`` is a context manager yielding the latest
    checkpoint directory (merged) or None.
    """

    rank: int
    world_size: int
    device: torch.device
    report: Callable[[dict[str, float], Path | None], None]
    restore: Callable[[], contextlib.AbstractContextManager[Path | None]]


@contextlib.contextmanager
def no_checkpoint() -> Iterator[Path | None]:
    yield None


def training_labels(spec: DataSpec) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """Given labels, clean labels (or None) and keys of the training set, by global index."""
    from distnoisy.data.noise import load_label_file
    from distnoisy.data.shards import read_labels, read_manifest

    # Clean labels may be known for a subset only (-1 elsewhere), e.g. Clothing1M's overlap.
    labels, clean, keys = read_labels(read_manifest(spec.train_dir), partial_clean=True)
    if spec.label_file is not None:
        lf = load_label_file(spec.label_file, spec.num_train, spec.num_classes)
        labels = lf.labels
        if lf.clean_labels is not None:
            clean = lf.clean_labels
    return np.asarray(labels, dtype=np.int64), clean, list(keys)


def network_builder(cfg: Config, num_classes: int, in_channels: int) -> Callable[..., nn.Module]:
    """``build(name=None, weights=None)``: ``model.name`` with ``model.weights`` by default."""

    def build(name: str | None = None, weights: str | None = None) -> nn.Module:
        if name is None:
            name, weights = cfg.model.name, cfg.model.weights
        return build_model(name, num_classes, in_channels, weights)

    return build


def make_optimizer(cfg: Config, params: Any) -> torch.optim.Optimizer:
    """The ``train.optimizer`` (SGD with momentum, or Adam) over ``params``."""
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)


def make_scheduler(cfg: Config, opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """The ``train.scheduler`` of ``opt``, stepped once per epoch (constant by default)."""
    t = cfg.train
    if t.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t.epochs)
    if t.scheduler == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(
            opt, milestones=list(t.milestones), gamma=t.gamma
        )
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


@torch.no_grad()
def predict(
    method: Method, nets: Networks, stream: Any, device: torch.device
) -> tuple[Tensor, ...]:
    """(index, probs) of this rank's share of an eval stream, from the method's prediction."""
    for net in nets.values():
        net.eval()
    idx, probs = [], []
    for batch in stream.batches():
        logits = method.predict(nets, batch["image"].to(device, non_blocking=True))
        idx.append(batch["index"])
        probs.append(torch.softmax(logits.float(), dim=1).cpu())
    for net in nets.values():
        net.train()
    if not idx:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, 0)
    return torch.cat(idx), torch.cat(probs)


def accuracies(
    method: Method, nets: Networks, stream: Any, labels: list[Tensor], device: torch.device
) -> list[float]:
    """Accuracy against each label vector, from one prediction pass (all ranks)."""
    index, probs = predict(method, nets, stream, device)
    pred = probs.argmax(1) if len(index) else torch.zeros(0, dtype=torch.long)
    counts = [float((pred == lab[index]).sum()) for lab in labels] + [float(len(index))]
    totals = dist.all_reduce_sum(torch.tensor(counts, device=device))
    n = totals[-1]
    return [float(t / n) if n > 0 else float("nan") for t in totals[:-1]]


def check_bad_samples(stream: Any, n: int, cfg: Config, comm_device: torch.device) -> int:
    """Unusable training samples met so far (all ranks); abort past ``data.max_bad_fraction``.

    Each sample counts once however many ranks or passes met it, and a truncated shard counts
    every sample it lost (:func:`distnoisy.data.stream.count_bad`): those are never trained on.
    Every rank gathers the same records and gets the same total, so every rank raises together
    (no rank left waiting in a collective).
    """
    from distnoisy.data.stream import count_bad, samples_lost

    del comm_device  # the records are gathered as objects (kept for the trainer's call)
    records = [
        ("train", k, r) for part in dist.all_gather_object(stream.bad_samples) for k, r in part
    ]
    total = count_bad(records)
    limit = cfg.data.max_bad_fraction * n
    if total > limit:
        from distnoisy.errors import DataError

        # The records that lost the most samples first: a truncated shard before a bad image.
        named = sorted(
            dict.fromkeys((k, r) for _, k, r in records), key=lambda kr: -samples_lost(kr[1])
        )
        first = "; ".join(f"{k}: {r}" for k, r in named[:3])
        raise DataError(
            f"{total} unusable training samples, more than data.max_bad_fraction="
            f"{cfg.data.max_bad_fraction:g} of {n}; first: {first}. "
            "Repair or re-convert the data, or raise data.max_bad_fraction"
        )
    return total


def check_class_mix(
    mean_distinct: float, class_counts: np.ndarray, batch_size: int, cfg: Config, *, warn: bool
) -> float:
    """``batch_class_mix`` of an epoch's batches; warns (once) when the stream cannot mix."""
    expected = expected_distinct_classes(class_counts, batch_size)
    if warn and mean_distinct < POOR_MIX * expected:
        log.warning(
            poor_mix_message(
                mean_distinct,
                expected,
                batch_size=batch_size,
                open_shards=cfg.data.open_shards,
                buffer=cfg.data.shuffle_buffer,
            )
        )
    return mean_distinct / expected


def gather_bad_samples(*named: tuple[str, Any]) -> list[dict[str, str]]:
    """Distinct skipped samples of every rank's streams (a collective: call on all ranks).

    One entry per ``(set, key, reason)``; count them with :func:`count_bad_samples`.
    """
    local = [
        {"set": name, "key": key, "reason": reason}
        for name, stream in named
        if stream is not None
        for key, reason in stream.bad_samples
    ]
    seen: dict[tuple[str, str, str], None] = {}
    for part in dist.all_gather_object(local):
        for item in part:  # type: ignore[attr-defined]
            seen.setdefault((item["set"], item["key"], item["reason"]), None)
    return [{"set": a, "key": b, "reason": c} for a, b, c in seen]


def count_bad_samples(bad_list: list[dict[str, str]]) -> int:
    """Distinct bad samples of a :func:`gather_bad_samples` list: each ``(set, key)`` once
    (the training stream and the final pass over the training set meet the same corrupt
    image), a truncated shard as the number of samples it lost."""
    from distnoisy.data.stream import count_bad

    return count_bad((b["set"], b["key"], b["reason"]) for b in bad_list)
