"""``posttrain.finetune_epochs``: fine-tune the whole network on the kept samples.

Nothing is rewritten for it: the run's own training config goes through
:func:`distnoisy.train.train` (the same launcher, DDP path, checkpoints and outputs) with three
changes: ``data.exclude_file`` lists the removed samples (the training stream never yields
them, on any rank), ``train.init_weights`` is post-training's ``weights.pt`` (the run's
backbone with the refitted head) and ``train.epochs`` is ``finetune_epochs``. It is tracked as
an MLflow child of the source run and written to ``<posttrain output>/finetune``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from distnoisy.config import Config
from distnoisy.posttrain.config import PostTrainConfig

#: The removed samples, by global index, that the fine-tune excludes.
EXCLUDE_FILE = "finetune_exclude.npy"


def finetune_config(cfg: PostTrainConfig, run_config: Config, out_dir: Path, uri: str) -> Config:
    """The run's config with the fine-tune's changes (module docstring); validated."""
    from distnoisy.config import from_dict, to_dict

    p = cfg.posttrain
    data = to_dict(run_config)
    data.update(output_dir=str(out_dir / "finetune"), name=None, resume=False)
    data["data"]["exclude_file"] = str(out_dir / EXCLUDE_FILE)
    data["data"]["balanced_batches"] = 0  # the kept set is the epoch (a mask of its own)
    data["train"].update(init_weights=str(out_dir / "weights.pt"), epochs=p.finetune_epochs)
    if p.finetune_lr is not None:
        data["train"]["lr"] = p.finetune_lr
    data["train"]["milestones"] = [m for m in data["train"]["milestones"] if m < p.finetune_epochs]
    if p.num_workers is not None:
        data["scaling"]["num_workers"] = p.num_workers
    if p.launcher is not None:
        data["scaling"]["launcher"] = p.launcher
    data["tracking"].update(
        enabled=cfg.tracking.enabled,
        uri=uri,
        run_name=f"{Path(run_config.output_dir or 'run').name}-posttrain-finetune",
    )
    return from_dict(data)


def write_exclude(path: Path, removed: np.ndarray) -> None:
    """The removed global indices as an int64 ``.npy``, written atomically."""
    tmp = path.with_name(f".{path.name}.tmp.npy")
    np.save(tmp, np.sort(np.asarray(removed, dtype=np.int64)))
    os.replace(tmp, path)


def finetune(
    cfg: PostTrainConfig,
    run_config: Config,
    out_dir: Path,
    removed: np.ndarray,
    uri: str,
    parent_run_id: str | None,
) -> dict[str, Any]:
    """Train ``finetune_epochs`` epochs on the kept samples; the numbers for ``summary.json``."""
    from distnoisy.train import train

    write_exclude(out_dir / EXCLUDE_FILE, removed)
    ft_cfg = finetune_config(cfg, run_config, out_dir, uri)
    summary = train(ft_cfg, parent_run_id=parent_run_id, tags={"distnoisy.phase": "finetune"})
    last = (summary.get("history") or [{}])[-1]
    return {
        "epochs": cfg.posttrain.finetune_epochs,
        "kept": int(summary.get("num_train", 0)) - len(removed),
        "test_acc": summary.get("test_acc"),
        "val_acc_noisy": last.get("val_acc_noisy"),
        "output_dir": str(out_dir / "finetune"),
        "mlflow_run_id": summary.get("mlflow_run_id"),
    }
