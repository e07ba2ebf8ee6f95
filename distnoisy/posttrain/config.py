"""Post-training configuration: OmegaConf structured dataclasses, closed and validated.

``python -m distnoisy.posttrain run=<dir | MLflow id> [--config FILE] [key=value ...]``; later
sources win (defaults < YAML files < overrides). Unknown keys and bad values are one
:class:`~distnoisy.core.errors.ConfigError` line before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from distnoisy.core.errors import ConfigError

SCORES = ("influence", "self_influence", "grad_norm", "loss_history")
HESSIANS = ("auto", "exact", "ekfac", "kfac")
WEIGHTS = ("auto", "final", "best")
SELECT_ON = ("val", "val_noisy")
#: The fine-tune's learning rate relative to the run's, unless posttrain.finetune_lr is set.
FINETUNE_LR_SCALE = 0.1


@dataclass
class PostTrainParams:
    # Ranking of the kept samples: grad_norm (||g||, the head gradient's norm), influence
    # (||H^-1 g|| / n), self_influence (g^T H^-1 g), loss_history (mean training loss from the
    # run's store). grad_norm by measurement: the highest post-trained test accuracy on
    # Fashion-MNIST (docs/results/posttrain.md), and no Hessian to build.
    score: str = "grad_norm"
    # The head Hessian: exact, ekfac, kfac, or auto (exact up to 4096 head parameters).
    hessian: str = "auto"
    # Share of the training set removed per round, in (0, 1).
    fraction_per_round: float = 0.05
    # Removal budget: at most this share of the training set, in (0, 1).
    max_removed: float = 0.5
    # Remove within each given class in proportion to its kept size.
    class_balanced: bool = True
    # Stop after this many rounds without a better validation accuracy (select_on). A small
    # validation set moves in steps of one image: on 12 Fashion-MNIST runs (CE and GCE, both
    # noises, 3 seeds) 2 stopped short of the budget's best validation round in 5, 4 in 1.
    patience: int = 4
    # What the rounds (and the fine-tune's epoch) are selected on: val, the validation set's
    # own labels, the ones the run's early stopping selected its epoch with; or val_noisy, the
    # validation labels corrupted like the training labels (synthetic noise only; without it
    # the same as val).
    select_on: str = "val"
    # L2 strength of the head refit, relative to the mean squared feature norm (scale-free).
    weight_decay: float = 1e-3
    # L-BFGS iterations per refit.
    refit_iters: int = 100
    # Features from the run's final weights, its best-by-validation ones, or auto: the
    # best-by-validation weights when the run kept them (it had a validation set), else final.
    weights: str = "auto"
    # Cached feature precision: float32 or float16.
    feature_dtype: str = "float32"
    # Feature extraction ranks and launcher; None = the run's scaling.* settings.
    num_workers: int | None = None
    launcher: str | None = None
    # After the rounds, fine-tune the whole network for this many epochs on the kept samples
    # through the normal training loop (the run's config, data.exclude_file = the removed set,
    # train.init_weights = the post-trained weights); 0 = no fine-tuning.
    finetune_epochs: int = 0
    # Learning rate of the fine-tune; None = FINETUNE_LR_SCALE x the run's train.lr (it
    # continues from trained weights).
    finetune_lr: float | None = None


#: The score a post-training uses unless posttrain.score says otherwise.
DEFAULT_SCORE = PostTrainParams.score


@dataclass
class DataCheck:
    # The dataset the run must have been trained on; None = accept the run's.
    name: str | None = None
    # Where the run's data lives now, if it moved (None = where the run read it).
    root: str | None = None


@dataclass
class PostTrainTracking:
    enabled: bool = True
    # None = the source run's tracking URI (from its run.json).
    uri: str | None = None


@dataclass
class PostTrainConfig:
    # The finished run: its output directory or MLflow run id (required).
    run: str = ""
    # None = <run dir>/posttrain-<score>
    output_dir: str | None = None
    posttrain: PostTrainParams = field(default_factory=PostTrainParams)
    data: DataCheck = field(default_factory=DataCheck)
    tracking: PostTrainTracking = field(default_factory=PostTrainTracking)


def validate(cfg: PostTrainConfig) -> None:
    """Value checks the types cannot express; one line each."""
    p = cfg.posttrain
    choices = (
        ("score", p.score, SCORES),
        ("hessian", p.hessian, HESSIANS),
        ("weights", p.weights, WEIGHTS),
        ("feature_dtype", p.feature_dtype, ("float32", "float16")),
        ("select_on", p.select_on, SELECT_ON),
    )
    for key, value, valid in choices:
        if value not in valid:
            raise ConfigError(
                f"invalid posttrain.{key}={value!r}; valid choices: {', '.join(valid)}"
            )
    if p.launcher is not None and p.launcher not in ("ray", "local"):
        raise ConfigError(f"invalid posttrain.launcher={p.launcher!r}; valid choices: ray, local")
    checks = [
        (bool(cfg.run), "run= is required: a run's output directory or MLflow run id"),
        (
            0.0 < p.fraction_per_round < 1.0,
            f"posttrain.fraction_per_round={p.fraction_per_round} must be in (0, 1), e.g. 0.05",
        ),
        (
            0.0 < p.max_removed < 1.0,
            f"posttrain.max_removed={p.max_removed} must be in (0, 1), e.g. 0.5",
        ),
        (p.patience >= 1, "posttrain.patience must be >= 1"),
        (p.weight_decay > 0, "posttrain.weight_decay must be > 0 (it makes the refit unique)"),
        (p.refit_iters >= 1, "posttrain.refit_iters must be >= 1"),
        (p.num_workers is None or p.num_workers >= 1, "posttrain.num_workers must be >= 1"),
        (
            p.finetune_epochs >= 0,
            f"posttrain.finetune_epochs={p.finetune_epochs} must be >= 0 (0 = no fine-tuning)",
        ),
        (
            p.finetune_lr is None or p.finetune_lr > 0,
            f"posttrain.finetune_lr={p.finetune_lr} must be > 0 (or unset: a tenth of the "
            "run's lr)",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def load(argv: list[str]) -> PostTrainConfig:
    """The validated config from ``--config FILE`` arguments and ``key=value`` overrides."""
    from distnoisy.config import _explain, _load_yaml, split_argv

    files, overrides = split_argv(list(argv))
    try:
        sources = [_load_yaml(f) for f in files] + [OmegaConf.from_dotlist(overrides)]
        merged = OmegaConf.merge(OmegaConf.structured(PostTrainConfig()), *sources)
        cfg: PostTrainConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        raise _explain(e, PostTrainConfig()) from None  # type: ignore[arg-type]
    # A run id of digits only (e.g. 0123...) would be read as an integer: keep the text.
    raw = [o.split("=", 1)[1] for o in overrides if o.startswith("run=")]
    if raw:
        cfg.run = raw[-1]
    validate(cfg)
    return cfg


def save(cfg: PostTrainConfig, path: Path) -> None:
    """The resolved config as YAML, written atomically."""
    import os

    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    os.replace(tmp, path)
