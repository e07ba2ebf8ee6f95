"""What the analysis reads of a finished run's final weights, per split, by global index.

The features the frequency score is computed in and the logits of the method's prediction
(ELR+ averages its two networks, LIMIT predicts with its classifier) come from
:func:`distnoisy.finished.features.extract_features`: computed on the run's own launcher
and workers, cached in the run directory. The alternative feature space ``pixels`` (the
normalised input images, which no training changes) is read here, in the calling process.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from distnoisy.core.errors import DataError
from distnoisy.finished.runs import FinishedRun

EVAL_BATCH = 512


@dataclass(frozen=True)
class Embedding:
    """One split of one run: ``features`` (N, d), ``logits`` (N, C) and the split's labels and
    keys, row = global index. Features and logits stay memory-mapped from the run's feature
    cache (read as needed, never copied whole); the training split's keys are not kept (empty:
    nothing reads them, and they cost ~100 bytes a sample)."""

    features: np.ndarray
    logits: np.ndarray
    labels: np.ndarray
    keys: np.ndarray


@torch.no_grad()
def _pixels(set_dir: str, transform: object) -> np.ndarray:
    """The flattened eval-transformed images of a shard set, by global index."""
    from distnoisy.data.shards import read_manifest
    from distnoisy.data.stream import EvalStream

    stream = EvalStream(
        read_manifest(set_dir), rank=0, world_size=1, batch_size=EVAL_BATCH, transform=transform
    )
    rows, index = [], []
    for batch in stream.batches():
        rows.append(batch["image"].flatten(1).float())
        index.append(batch["index"])
    return torch.cat(rows)[torch.cat(index).argsort()].numpy()


def run_embeddings(
    run: FinishedRun, splits: tuple[str, ...] = ("train", "test"), features: str = "model"
) -> dict[str, Embedding]:
    """``{split: Embedding}`` of the run's final weights.

    ``features="pixels"``: the features are the flattened, normalised input images instead of
    the network's (a feature space no training changes; meaningful for small images).

    Raises
    ------
    DataError
        If the run's data set has no such split.
    """
    from distnoisy.data.prepare import prepare_data
    from distnoisy.data.shards import read_labels, read_manifest
    from distnoisy.data.stream import make_transform
    from distnoisy.finished.features import extract_features

    spec = prepare_data(run.config)  # the cached shards: nothing is rewritten
    dirs = {"train": spec.train_dir, "test": spec.test_dir, "val": spec.val_dir}
    for split in splits:
        if dirs.get(split) is None:
            raise DataError(f"run {run.run_dir}: its data set has no {split} split to analyse")
    extracted = extract_features(run, splits)
    transform = make_transform(
        spec.eval_transform, spec.mean, spec.std, size=run.config.data.image_size
    )
    out: dict[str, Embedding] = {}
    for split in splits:
        labels, clean, keys = read_labels(read_manifest(dirs[split]))
        feats = (
            _pixels(dirs[split], transform) if features == "pixels" else extracted[split].features
        )
        out[split] = Embedding(
            features=feats,
            logits=extracted[split].logits,
            labels=np.asarray(clean if clean is not None else labels, dtype=np.int64),
            keys=np.asarray(keys) if split != "train" else np.zeros(0, dtype=object),
        )
    return out
