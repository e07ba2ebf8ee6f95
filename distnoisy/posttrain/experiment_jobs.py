"""The work of the post-training experiment on one grid run: train it (or find it trained),
post-train it in each variant, and run the references on the same features (cleanlab's
recipe, the perfect removal).

Every post-training writes ``<run>/posttrain-<variant>/`` and is reused when its
``config.yaml`` says it was made with the same config (a changed default or override redoes
it); cleanlab's recipe writes ``<run>/posttrain-cleanlab/summary.json`` and the perfect removal
``<run>/posttrain-perfect/summary.json``, each reused when its settings (weights file, penalty,
folds) are the same. Nothing is tracked in MLflow (the grid runs are not either: the result
page is the record).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Callable

    from distnoisy.posttrain.rounds import RoundsInput

log = logging.getLogger("distnoisy.posttrain.experiment")

#: The summary fields the page reads (``rounds`` is kept for the per-seed table).
KEEP = (
    "test_acc_before",
    "test_acc_at_best_val",
    "best_val_epoch",
    "test_acc_refit_only",
    "test_acc",
    "val_acc_noisy",
    "val_acc_noisy_before",
    "removed",
    "removed_fraction",
    "precision_removed",
    "recall_removed",
    "best_round",
    "auroc",
    "precision_at_k",
    "precision_first_20pct",
    "weights",
    "mu",
    "weight_decay",
    "selected_on",
    "test_acc_finetuned",
    "val_acc_finetuned",
    "val_acc_noisy_finetuned",
    "finetune",
    "rounds",
    "wall_s",
)


@dataclass(frozen=True)
class Variant:
    """One post-training of every run: ``<run>/posttrain-<name>`` with these overrides."""

    name: str
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class RunJob:
    """Everything one grid run gets (plain values: it travels to a spawned worker)."""

    root: str
    dataset: str
    noise: str
    method: str
    seed: int
    variants: tuple[Variant, ...]
    #: Run cleanlab's recipe on the features of this variant (None: not at all).
    peer_of: str | None = "default"
    force: bool = False
    extra_train: tuple[str, ...] = field(default_factory=tuple)
    #: Train and post-train nothing: only what is finished is read.
    reuse_only: bool = False

    @property
    def key(self) -> tuple[str, str, str, int]:
        return (self.dataset, self.noise, self.method, self.seed)


def _config(run: Path, variant: Variant, out: Path) -> Any:
    from distnoisy.posttrain.config import load

    return load([f"run={run}", f"output_dir={out}", "tracking.enabled=false", *variant.overrides])


def _same_config(out: Path, cfg: Any) -> bool:
    from omegaconf import OmegaConf

    saved = out / "config.yaml"
    return saved.is_file() and saved.read_text() == OmegaConf.to_yaml(OmegaConf.structured(cfg))


def posttrain_or_reuse(
    run: Path, variant: Variant, force: bool = False, reuse_only: bool = False
) -> dict[str, Any] | None:
    """The summary of ``run``'s post-training in ``variant``, made now unless a finished one
    with the same config exists (``force``: always made now; ``reuse_only``: None instead)."""
    from distnoisy.posttrain.run import posttrain

    out = run / f"posttrain-{variant.name}"
    cfg = _config(run, variant, out)
    done = out / "summary.json"
    if done.is_file() and _same_config(out, cfg) and not force:
        summary = json.loads(done.read_text())
    elif reuse_only:
        return None
    else:
        shutil.rmtree(out, ignore_errors=True)  # an older config's outputs (and fine-tune)
        log.info("post-training %s (%s)", run, variant.name)
        summary = posttrain(cfg)
    return {k: summary.get(k) for k in KEEP}


def peer_or_reuse(
    run: Path, variant: Variant, mu: float, force: bool = False, reuse_only: bool = False
) -> dict[str, Any] | None:
    """cleanlab's recipe on the features ``variant`` post-trained on, with its penalty ``mu``
    (:func:`distnoisy.posttrain.peer.cleanlab_recipe`); reused when its settings match
    (``reuse_only``: None when they do not)."""
    from distnoisy.posttrain.peer import cleanlab_recipe, require_cleanlab

    require_cleanlab()
    recipe = {"folds": 5, "fold_seed": 0, "filter_by": "prune_by_noise_rate"}

    def compute(inp: RoundsInput, refit: np.ndarray, iters: int) -> dict[str, Any]:
        return cleanlab_recipe(
            inp,
            mu,
            refit,
            iters,
            folds=recipe["folds"],
            seed=recipe["fold_seed"],
            filter_by=recipe["filter_by"],
        )

    return _reference_or_reuse(
        run, variant, "cleanlab", {"mu": mu, **recipe}, compute, force, reuse_only
    )


def perfect_or_reuse(
    run: Path, variant: Variant, mu: float, force: bool = False, reuse_only: bool = False
) -> dict[str, Any] | None:
    """The perfect removal on the features ``variant`` post-trained on
    (:func:`distnoisy.posttrain.peer.perfect_removal`), reused as :func:`peer_or_reuse`."""
    from distnoisy.posttrain.peer import perfect_removal

    def compute(inp: RoundsInput, refit: np.ndarray, iters: int) -> dict[str, Any]:
        return perfect_removal(inp, mu, refit, iters)

    return _reference_or_reuse(run, variant, "perfect", {"mu": mu}, compute, force, reuse_only)


def _reference_or_reuse(
    run: Path,
    variant: Variant,
    name: str,
    settings: dict[str, Any],
    compute: Callable[[RoundsInput, np.ndarray, int], dict[str, Any]],
    force: bool,
    reuse_only: bool,
) -> dict[str, Any] | None:
    """``<run>/posttrain-<name>/summary.json`` of a reference removal on ``variant``'s
    features: ``compute(inp, round 0's head, refit iterations)``, made now unless a summary
    with the same ``settings`` (and weights file) exists."""
    from distnoisy.finished.features import WEIGHTS, file_digest
    from distnoisy.posttrain import outputs
    from distnoisy.posttrain.refit import fit_head
    from distnoisy.posttrain.run import build_input, check, job_ranks

    out = run / f"posttrain-{name}"
    cfg = _config(run, variant, out)
    prep = check(cfg)
    settings = {
        "weights": prep.weights,
        "weights_digest": file_digest(run / WEIGHTS[prep.weights]),
        **settings,
    }
    done = out / "summary.json"
    if done.is_file() and not force:
        summary = json.loads(done.read_text())
        if summary.get("settings") == settings:
            return summary
    if reuse_only:
        return None
    log.info("%s removal on %s", name, run)
    with job_ranks(prep, cfg) as ranks:  # started only if the features are not cached
        inp, _ = build_input(prep, cfg, ranks)
    mu = settings["mu"]
    refit = fit_head(inp.theta, inp.train, inp.given, mu, cfg.posttrain.refit_iters)
    res = compute(inp, refit, cfg.posttrain.refit_iters)
    removed = res.pop("removed_index", None)
    out.mkdir(parents=True, exist_ok=True)
    if removed is not None:
        outputs.write_array(out / "removed.npy", np.asarray(removed, np.int64))
    summary = {**res, "settings": settings}
    outputs.write_json(out / "summary.json", summary)
    return summary


def run_job(job: RunJob, wait: bool = False) -> dict[str, Any] | None:
    """Train (or find) the run, then post-train it in every variant and run the peer; None
    when another command is training the run right now (``wait=False``). With
    ``job.reuse_only``, ``{"missing": what}`` when the run or its default post-training is not
    finished; other variants (and the peer) not finished are left out."""
    import torch

    from distnoisy.driver.grid import is_finished, run_args, train_or_reuse

    torch.set_num_threads(1)
    if not logging.getLogger().handlers:  # a spawned worker: progress lines like the driver's
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        log.setLevel(logging.INFO)
        logging.getLogger("distnoisy.driver.grid").setLevel(logging.INFO)
    if job.reuse_only and not is_finished(Path(job.root), *job.key):
        return {"missing": "run not trained"}
    run = train_or_reuse(Path(job.root), *job.key, job.extra_train, wait=wait)
    if run is None:
        return None
    summary = json.loads((run / "summary.json").read_text())
    out: dict[str, Any] = {
        "run": {
            k: summary.get(k)
            for k in ("test_acc", "test_acc_at_best_val", "best_val_epoch", "memorized")
        },
        "args": run_args(*job.key),
    }
    for variant in job.variants:
        done = posttrain_or_reuse(run, variant, job.force, job.reuse_only)
        if done is not None:
            out[variant.name] = done
    if "default" not in out:
        return {"missing": "not post-trained"}
    # the references, on the features of the variant the peer is compared with (the perfect
    # removal needs no cleanlab: it runs with --no-peer too, on the default variant)
    base = next(v for v in job.variants if v.name == (job.peer_of or "default"))
    if base.name not in out:  # --reuse-only: that variant is not finished
        return out
    references = {"perfect": perfect_or_reuse}
    if job.peer_of is not None:
        references["cleanlab"] = peer_or_reuse
    for name, make in references.items():
        ref = make(run, base, out[base.name]["mu"], job.force, job.reuse_only)
        if ref is not None:
            out[name] = ref
    return out
