"""Penultimate features and evaluation logits of a finished run's final weights, per split.

The analysis needs, for the training and test sets: the features the frequency score is
computed in, and the test predictions and confidences. This module computes them in the
calling process with the run's own model, weights, eval transform and method prediction
(ELR+ averages its two networks, LIMIT predicts with its classifier), rows in global index
order. Small sets only; the project's feature extraction (parallel on the run's launcher,
cached) replaces it where it is available (:func:`run_embeddings`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch

from distnoisy.errors import DataError
from distnoisy.runs import FinishedRun

EVAL_BATCH = 512


@dataclass(frozen=True)
class Embedding:
    """One split of one run: ``features`` (N, d), ``logits`` (N, C) and the split's labels and
    keys, row = global index."""

    features: np.ndarray
    logits: np.ndarray
    labels: np.ndarray
    keys: np.ndarray


def _networks(run: FinishedRun, num_classes: int, in_channels: int):
    """(method, networks in eval mode) of the run, with its final weights."""
    from distnoisy.loop import network_builder
    from distnoisy.methods import METHODS

    cfg = run.config
    res_path = run.path("method_resources.json")
    resources = json.loads(res_path.read_text()) if res_path.is_file() else {}
    method = METHODS.get(cfg.method.name)(
        cfg.method,
        num_samples=int(run.summary.get("num_train", 1)),
        num_classes=num_classes,
        epochs=cfg.train.epochs,
        resources=resources,
        seed=cfg.seed,
    )
    nets = method.build_networks(network_builder(cfg, num_classes, in_channels))
    state = run.weights()
    for name, net in nets.items():
        net.load_state_dict(state[name])
        net.eval()
    return method, nets


@torch.no_grad()
def run_embeddings(
    run: FinishedRun, splits: tuple[str, ...] = ("train", "test"), features: str = "model"
) -> dict:
    """``{split: Embedding}`` of the run's final weights.

    ``features="pixels"``: the features are the flattened, normalised input images instead of
    the network's (a feature space no training changes; meaningful for small images).

    Raises
    ------
    DataError
        If the run's data set has no ``test`` split.
    """
    from distnoisy.data.prepare import prepare_data
    from distnoisy.data.shards import read_labels, read_manifest
    from distnoisy.data.stream import EvalStream, make_transform

    spec = prepare_data(run.config)  # the cached shards: nothing is rewritten
    method, nets = _networks(run, spec.num_classes, spec.in_channels)
    feature_net = next(iter(nets.values()))
    transform = make_transform(
        spec.eval_transform, spec.mean, spec.std, size=run.config.data.image_size
    )
    dirs = {"train": spec.train_dir, "test": spec.test_dir, "val": spec.val_dir}
    out: dict[str, Embedding] = {}
    for split in splits:
        if dirs.get(split) is None:
            raise DataError(f"run {run.run_dir}: its data set has no {split} split to analyse")
        manifest = read_manifest(dirs[split])
        labels, clean, keys = read_labels(manifest)
        stream = EvalStream(
            manifest, rank=0, world_size=1, batch_size=EVAL_BATCH, transform=transform
        )
        feats, logits, index = [], [], []
        for batch in stream.batches():
            x = batch["image"]
            f = x.flatten(1) if features == "pixels" else feature_net.forward_features(x)
            feats.append(f.float())
            logits.append(method.predict(nets, x).float())
            index.append(batch["index"])
        order = torch.cat(index).argsort()
        out[split] = Embedding(
            features=torch.cat(feats)[order].numpy(),
            logits=torch.cat(logits)[order].numpy(),
            labels=np.asarray(clean if clean is not None else labels, dtype=np.int64),
            keys=np.asarray(keys),
        )
    return out
