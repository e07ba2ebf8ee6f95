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
from distnoisy.posttrain.config import FINETUNE_LR_SCALE, PostTrainConfig

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
    data["train"]["lr"] = (
        p.finetune_lr if p.finetune_lr is not None else FINETUNE_LR_SCALE * run_config.train.lr
    )
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


def select_epoch(history: list[dict[str, Any]], key: str, head_val: float | None) -> dict[str, Any]:
    """The fine-tune's result as the run selects its own: the epoch with the best ``key``
    (``val_acc`` or ``val_acc_noisy``; the first on ties); epoch 0 stands for the post-trained
    head before any fine-tuning (validation accuracy ``head_val``), kept when no epoch beats it.

    Returns ``epoch`` (1-based; 0: the head), and ``test_acc``, ``val_acc``, ``val_acc_noisy``
    of that epoch (``None`` for epoch 0, whose figures are the rounds').
    """
    vals = [h.get(key) for h in history]
    scored = [(v, i) for i, v in enumerate(vals) if v is not None and np.isfinite(v)]
    if not scored:  # no validation set: the last epoch
        best = len(history) - 1
    else:
        top = max(v for v, _ in scored)
        best = next(i for v, i in scored if v == top)
        if head_val is not None and top <= head_val:
            return {"epoch": 0, "test_acc": None, "val_acc": None, "val_acc_noisy": None}
    row = history[best] if history else {}
    return {
        "epoch": best + 1,
        "test_acc": row.get("test_acc"),
        "val_acc": row.get("val_acc"),
        "val_acc_noisy": row.get("val_acc_noisy"),
    }


def finetune(
    cfg: PostTrainConfig,
    run_config: Config,
    out_dir: Path,
    removed: np.ndarray,
    uri: str,
    parent_run_id: str | None,
    select_key: str = "val_acc_noisy",
    head_val: float | None = None,
) -> dict[str, Any]:
    """Train ``finetune_epochs`` epochs on the kept samples; the numbers for ``summary.json``:
    the last epoch's (``*_last``) and the epoch selected on ``select_key``
    (:func:`select_epoch`; ``selected_epoch`` 0 = the post-trained head was better)."""
    from distnoisy.train import train

    write_exclude(out_dir / EXCLUDE_FILE, removed)
    ft_cfg = finetune_config(cfg, run_config, out_dir, uri)
    summary = train(ft_cfg, parent_run_id=parent_run_id, tags={"distnoisy.phase": "finetune"})
    history = summary.get("history") or [{}]
    last = history[-1]
    chosen = select_epoch(history, select_key, head_val)
    return {
        "epochs": cfg.posttrain.finetune_epochs,
        "kept": int(summary.get("num_train", 0)) - len(removed),
        "selected_on": select_key,
        "selected_epoch": chosen["epoch"],
        "test_acc": chosen["test_acc"],
        "val_acc": chosen["val_acc"],
        "val_acc_noisy": chosen["val_acc_noisy"],
        "test_acc_last": summary.get("test_acc"),
        "val_acc_last": last.get("val_acc"),
        "val_acc_noisy_last": last.get("val_acc_noisy"),
        "history": [
            {k: h.get(k) for k in ("epoch", "test_acc", "val_acc", "val_acc_noisy")}
            for h in history
        ],
        "output_dir": str(out_dir / "finetune"),
        "mlflow_run_id": summary.get("mlflow_run_id"),
    }
