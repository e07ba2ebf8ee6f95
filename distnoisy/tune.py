"""``python -m distnoisy.tune SPACE.yaml [key=value ...] [--out DIR] [--resume]``: a Ray Tune sweep.

Every trial is an ordinary distnoisy training run (:func:`distnoisy.train.train`: Ray Train
inside a Tune function trainable, the pattern Ray recommends for Train V2) with its own run
directory under ``DIR/trials/<trial id>`` and an MLflow run nested under the sweep's parent run.
Per-epoch metrics reach Tune through Ray Train's ``TuneReportCallback``, so ASHA can stop bad
trials early. At the end the sweep writes ``results.md``/``.csv``/``.json``, a plot and
``best.yaml`` (``python -m distnoisy.train --config best.yaml`` re-runs the best trial) and logs
them to the parent MLflow run.

The search space file (``tune_spaces/*.yaml``)::

    config: null                 # optional base config file (relative to the space file)
    overrides:                   # base config keys (key: value), applied after ``config``
      method.name: elr
      data.val_fraction: 0.1
    space:                       # config key -> values; a plain list is a grid
      method.lam: [1.0, 3.0, 7.0]
      train.lr: {loguniform: [1.0e-4, 1.0e-2]}   # also uniform, randint, choice, grid
    metric: val_acc              # per-epoch metric to optimise; mode: max | min
    search: {algorithm: grid}    # grid | random | tpe (Optuna, if installed); seed
    num_samples: 1               # random/tpe: configurations drawn
    seeds: [0, 1]                # training seeds per configuration
    scheduler: {name: asha, grace_period: 1, reduction_factor: 2}   # or fifo
    resources: {workers: 1, driver_cpu: 0.5, max_concurrent_trials: 2}

Command-line ``key=value`` arguments override the base config (``train.epochs=4``) or, for the
top-level sweep keys above, the sweep (``num_samples=4``, ``scheduler.grace_period=2``).
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import logging
import math
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from distnoisy.config import Config, from_dict, save_config, to_dict
from distnoisy.errors import ConfigError, DistnoisyError

log = logging.getLogger("distnoisy")

SPACE_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
ALGORITHMS = ("grid", "random", "tpe")
SCHEDULERS = ("asha", "fifo")
#: Per-epoch report counter added to every forwarded metric dict: ASHA's time unit.
TIME_ATTR = "epochs_done"
STOPPED_TAG = "distnoisy.stopped_early"


# -- the sweep description ------------------------------------------------------------------
@dataclass
class SearchSettings:
    algorithm: str = "grid"
    # Seeds the random draws (random/tpe), so a sweep's configurations are reproducible.
    seed: int = 0


@dataclass
class SchedulerSettings:
    name: str = "asha"
    grace_period: int = 1
    reduction_factor: int = 2


@dataclass
class ResourceSettings:
    # Ray Train workers per trial (scaling.num_workers of every trial).
    workers: int = 1
    # CPUs reserved for each trial's driver (it only waits on its Train run).
    driver_cpu: float = 0.5
    # 0 = as many as the cluster's resources allow.
    max_concurrent_trials: int = 0


@dataclass
class SweepSpec:
    config: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    space: dict[str, Any] = field(default_factory=dict)
    # Clean validation accuracy; val_acc_noisy: the validation labels corrupted by the run's
    # synthetic noise (the papers' selection when no clean set exists; README "Sweeps").
    metric: str = "val_acc"
    mode: str = "max"
    search: SearchSettings = field(default_factory=SearchSettings)
    num_samples: int = 1
    seeds: list[int] = field(default_factory=lambda: [0])
    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)
    resources: ResourceSettings = field(default_factory=ResourceSettings)
    name: str | None = None


@dataclass
class Dimension:
    key: str
    kind: str
    values: list[Any]  # the grid/choice values, or [low, high]


def _parse_dimension(key: str, spec: Any, where: str) -> Dimension:
    if isinstance(spec, list):
        spec = {"grid": spec}
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(
            f"{where}: space.{key} must be a list of values or one of "
            f"{{{', '.join(k + ': ...' for k in SPACE_KINDS)}}}, not {spec!r}"
        )
    kind, values = next(iter(spec.items()))
    if kind not in SPACE_KINDS:
        raise ConfigError(
            f"{where}: space.{key} has unknown range kind {kind!r}; valid: {', '.join(SPACE_KINDS)}"
        )
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: space.{key}.{kind} needs a non-empty list, not {values!r}")
    if kind in ("uniform", "loguniform", "randint"):
        if len(values) != 2 or not all(isinstance(v, int | float) for v in values):
            raise ConfigError(f"{where}: space.{key}.{kind} needs [low, high], not {values}")
        low, high = values
        if not low < high:
            raise ConfigError(f"{where}: space.{key}.{kind} range [{low}, {high}] needs low < high")
        if kind == "loguniform" and low <= 0:
            raise ConfigError(f"{where}: space.{key}.loguniform needs low > 0, not {low}")
        if kind == "randint" and not all(isinstance(v, int) for v in values):
            raise ConfigError(f"{where}: space.{key}.randint needs integer bounds, not {values}")
    return Dimension(key, kind, list(values))


def load_spec(path: Path, argv: list[str]) -> SweepSpec:
    """Read a search-space file and apply ``key=value`` arguments (sweep keys or config keys)."""
    from distnoisy.config import _load_yaml

    raw = _load_yaml(str(path))
    sweep_keys = {f for f in SweepSpec.__dataclass_fields__ if f not in ("overrides", "space")}
    sweep_args, config_args = [], []
    for arg in argv:
        if "=" not in arg or arg.startswith("-"):
            raise ConfigError(f"cannot parse argument {arg!r}; use key=value")
        head = arg.split("=", 1)[0].split(".", 1)[0]
        (sweep_args if head in sweep_keys else config_args).append(arg)
    try:
        merged = OmegaConf.merge(
            OmegaConf.structured(SweepSpec), raw, OmegaConf.from_dotlist(sweep_args)
        )
        spec: SweepSpec = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or ""
        valid = ", ".join(SweepSpec.__dataclass_fields__)
        raise ConfigError(
            f"search space {path}: invalid entry {key!r}: "
            f"{str(e).splitlines()[0].rstrip('.')}. Top-level keys: {valid}".replace("?.", "?")
        ) from None
    for arg in config_args:
        key, value = arg.split("=", 1)
        spec.overrides[key] = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={value}"]))["v"]
    if spec.config and not Path(spec.config).is_absolute():
        spec.config = str((path.parent / spec.config).resolve())
    spec.name = spec.name or path.stem
    return spec


# -- configurations of the trials -----------------------------------------------------------
def _nest(flat: dict[str, Any]) -> DictConfig:
    out = OmegaConf.create({})
    for key, value in flat.items():
        OmegaConf.update(out, key, value, force_add=True)
    return out


def _absolute_paths(data: dict[str, Any]) -> None:
    # Trials run in another working directory (their Tune trial dir): pin relative paths now.
    for section, key in (("data", "root"), ("data", "urls"), ("noise", "file")):
        value = data[section].get(key)
        if value and "://" not in value and not Path(value).expanduser().is_absolute():
            data[section][key] = str(Path(value).resolve())
    if not data["tracking"].get("uri"):
        from distnoisy.tracking import default_tracking_uri

        data["tracking"]["uri"] = default_tracking_uri()


def base_config(spec: SweepSpec) -> dict[str, Any]:
    """The resolved config every trial starts from (a plain dict)."""
    from distnoisy.config import _build, _load_yaml

    sources = [_load_yaml(spec.config)] if spec.config else []
    overrides = dict(spec.overrides)
    overrides["scaling.num_workers"] = spec.resources.workers
    sources.append(_nest(overrides))
    try:
        cfg = _build(sources)
    except ConfigError as e:
        raise ConfigError(f"base config of sweep {spec.name!r}: {e}") from None
    if cfg.scaling.launcher != "ray":
        raise ConfigError(
            "sweeps run every trial with Ray Train (per-epoch reports reach Tune through it); "
            "remove scaling.launcher=local from the base config"
        )
    data = to_dict(cfg)
    _absolute_paths(data)
    return data


def trial_config(base: dict[str, Any], point: dict[str, Any], seed: int) -> Config:
    """The base config with one point of the space and one seed applied (validated)."""
    from distnoisy.config import _build

    flat = dict(point, seed=seed)
    return _build([OmegaConf.create(base), _nest(flat)])


def _point_label(point: dict[str, Any]) -> str:
    return ",".join(f"{k.split('.')[-1]}={_fmt_value(v)}" for k, v in point.items())


def _fmt_value(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def expand_points(dims: list[Dimension], spec: SweepSpec) -> list[dict[str, Any]]:
    """The configurations to try (grid/random): grid values crossed, the rest drawn."""
    import numpy as np

    algorithm = spec.search.algorithm
    grid_kinds = ("grid", "choice") if algorithm == "grid" else ("grid",)
    grid_dims = [d for d in dims if d.kind in grid_kinds]
    drawn = [d for d in dims if d not in grid_dims]
    if algorithm == "grid" and drawn:
        raise ConfigError(
            f"search.algorithm=grid needs lists of values, but {', '.join(d.key for d in drawn)} "
            "are ranges; use search.algorithm=random (or tpe) or give values"
        )
    rng = np.random.default_rng(spec.search.seed)
    samples = spec.num_samples if drawn else 1
    points = []
    for combo in itertools.product(*(d.values for d in grid_dims)):
        for _ in range(samples):
            point = dict(zip((d.key for d in grid_dims), combo, strict=True))
            for d in drawn:
                low, high = d.values[0], d.values[-1]
                if d.kind == "choice":
                    value = d.values[int(rng.integers(len(d.values)))]
                elif d.kind == "uniform":
                    value = float(rng.uniform(low, high))
                elif d.kind == "loguniform":
                    value = float(math.exp(rng.uniform(math.log(low), math.log(high))))
                else:
                    value = int(rng.integers(low, high))
                point[d.key] = value
            points.append({d.key: point[d.key] for d in dims})
    return points


def _corners(dims: list[Dimension]) -> list[dict[str, Any]]:
    """Every combination of each dimension's extreme values (or all values of a list)."""
    axes = []
    for d in dims:
        if d.kind in ("grid", "choice"):
            axes.append(d.values)
        elif d.kind == "randint":
            axes.append([d.values[0], d.values[1] - 1])
        else:
            axes.append(d.values)
    combos = list(itertools.product(*axes))
    if len(combos) > 512:  # too many: check each dimension alone
        combos = []
        for i, values in enumerate(axes):
            for v in values:
                combos.append(tuple(v if j == i else axes[j][0] for j in range(len(axes))))
    return [dict(zip((d.key for d in dims), c, strict=True)) for c in combos]


@dataclass
class Sweep:
    spec: SweepSpec
    base: dict[str, Any]
    dims: list[Dimension]
    points: list[dict[str, Any]]  # empty for tpe (Optuna proposes them)


def plan(spec: SweepSpec, where: str) -> Sweep:
    """Validate everything a trial will see, before any trial starts."""
    if spec.search.algorithm not in ALGORITHMS:
        raise ConfigError(
            f"{where}: search.algorithm={spec.search.algorithm!r}; valid: {', '.join(ALGORITHMS)}"
        )
    if spec.scheduler.name not in SCHEDULERS:
        raise ConfigError(
            f"{where}: scheduler.name={spec.scheduler.name!r}; valid: {', '.join(SCHEDULERS)}"
        )
    if spec.mode not in ("max", "min"):
        raise ConfigError(f"{where}: mode={spec.mode!r}; valid: max, min")
    checks = [
        (bool(spec.space), "space is empty; name at least one config key to search over"),
        (bool(spec.seeds), "seeds is empty; give at least one training seed"),
        (len(set(spec.seeds)) == len(spec.seeds), f"seeds {spec.seeds} has duplicates"),
        (spec.num_samples >= 1, "num_samples must be >= 1"),
        (spec.scheduler.grace_period >= 1, "scheduler.grace_period must be >= 1"),
        (spec.scheduler.reduction_factor >= 2, "scheduler.reduction_factor must be >= 2"),
        (spec.resources.workers >= 1, "resources.workers must be >= 1"),
        (spec.resources.driver_cpu >= 0, "resources.driver_cpu must be >= 0"),
        (spec.resources.max_concurrent_trials >= 0, "resources.max_concurrent_trials >= 0"),
        ("seed" not in spec.space, "the training seed is set by seeds: [...], not by space.seed"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"{where}: {message}")
    if spec.search.algorithm == "tpe":
        if len(spec.seeds) != 1:
            raise ConfigError(
                f"{where}: search.algorithm=tpe proposes one configuration per trial; use a "
                "single seed (seeds: [0]) or search.algorithm=random/grid for seeds per config"
            )
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise ConfigError(
                f"{where}: search.algorithm=tpe needs optuna (pip install 'optuna>=3'); "
                "or use search.algorithm=random"
            ) from None
    base = base_config(spec)
    if "method.name" in spec.space:
        raise ConfigError(
            f"{where}: space.method.name: sweep one method per space file (methods have "
            "different keys); run one sweep per method"
        )
    dims = [_parse_dimension(k, v, where) for k, v in spec.space.items()]
    # Keys, types and ranges first (the corners of the space), then every point to be run.
    for point in _corners(dims):
        try:
            trial_config(base, point, spec.seeds[0])
        except ConfigError as e:
            raise ConfigError(f"{where}: point {point} of the space is invalid: {e}") from None
    try:
        points = [] if spec.search.algorithm == "tpe" else expand_points(dims, spec)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    for point in points:
        try:
            trial_config(base, point, spec.seeds[0])
        except ConfigError as e:
            raise ConfigError(f"{where}: point {point} of the space is invalid: {e}") from None
    cfg = from_dict(base)
    if spec.metric in ("val_acc", "val_acc_noisy"):
        from distnoisy.data.prepare import prepare_data

        data = prepare_data(cfg)  # also prepares the data once for all trials
        if data.val_dir is None:
            raise ConfigError(
                f"{where}: metric {spec.metric} needs a validation set: set "
                "data.val_fraction=0.1 (digits) or put a val/ set beside the shards, or choose "
                "another metric"
            )
        if spec.metric == "val_acc_noisy" and data.val_label_file is None:
            raise ConfigError(
                f"{where}: metric val_acc_noisy needs synthetic noise (noise.kind symmetric, "
                "pair or instance) to corrupt the validation labels; use val_acc"
            )
    return Sweep(spec, base, dims, points)


# -- Ray Tune --------------------------------------------------------------------------------
def _report_callback(epochs: int) -> Any:
    """Ray Train's ``TuneReportCallback`` that counts epochs and holds back the last one.

    Every forwarded report gets ``epochs_done`` (ASHA's time unit rather than Tune's
    ``training_iteration``, so a trial that resumes its Train run from a checkpoint keeps
    counting where it left off). The last epoch is not forwarded: a scheduler decision on it
    would kill the trial before ``train()`` publishes the outputs and ends the MLflow run;
    :func:`run_trial` reports it once ``train()`` has returned.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    class EpochReportCallback(TuneReportCallback):
        def after_report(self, run_context: Any, metrics: list, checkpoint: Any) -> None:
            first = dict(metrics[0])
            first[TIME_ATTR] = int(first.get("epoch", -1)) + 1
            if first[TIME_ATTR] < epochs:
                super().after_report(run_context, [first, *metrics[1:]], checkpoint)

    return EpochReportCallback()


def run_trial(config: dict[str, Any], sweep: dict[str, Any]) -> None:
    """Tune function trainable: one distnoisy training run (a Ray Train run) per trial."""
    import ray.tune

    from distnoisy.train import train

    logging.getLogger("distnoisy").setLevel(logging.INFO)
    trial_id = ray.tune.get_context().get_trial_id()
    run_dir = Path(sweep["dir"]) / "trials" / trial_id
    if run_dir.exists() and not (run_dir / "run.json").exists():
        shutil.rmtree(run_dir)  # killed before the run started: nothing to keep
    if (run_dir / "summary.json").exists():
        # The run finished but the sweep was interrupted before Tune recorded it: report only.
        summary = json.loads((run_dir / "summary.json").read_text())
    else:
        point, seed = config["point"], config["seed"]
        data = to_dict(trial_config(sweep["base"], point, seed))
        data.update(output_dir=str(run_dir), name=None, resume=(run_dir / "run.json").exists())
        data["tracking"]["run_name"] = f"{sweep['name']}/{_point_label(point)},seed={seed}"
        cfg = from_dict(data)
        summary = train(
            cfg,
            parent_run_id=sweep["parent_run_id"],
            train_callbacks=[_report_callback(cfg.train.epochs)],
            tags={"distnoisy.trial_id": trial_id, "distnoisy.sweep": sweep["name"]},
        )
    last = dict(summary["history"][-1])
    last[TIME_ATTR] = int(last["epoch"]) + 1
    for key in ("best_val_acc", "best_val_epoch", "test_acc_at_best_val", "label_issue_auroc"):
        if summary.get(key) is not None:
            last[key] = summary[key]
    ray.tune.report(last)


COMPLETIONS = "completions.jsonl"


def _completion_recorder(sweep_dir: Path) -> Any:
    """A Tune callback that appends each trial Tune *completed* to ``completions.jsonl``.

    Tune calls ``on_trial_complete`` when a trial returns or the scheduler stops it, but not
    when an interrupted sweep tears its trials down (it marks those TERMINATED too, in memory);
    this record is how the driver tells an early-stopped trial from an interrupted one.
    """
    from ray.tune import Callback

    class CompletionRecorder(Callback):
        def __init__(self, path: str) -> None:
            self.path = path

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            epochs = int((trial.last_result or {}).get(TIME_ATTR, 0))
            with open(self.path, "a") as f:
                f.write(json.dumps({"trial_id": trial.trial_id, TIME_ATTR: epochs}) + "\n")

    return CompletionRecorder(str(sweep_dir / COMPLETIONS))


def _completed_trials(sweep_dir: Path) -> set[str]:
    path = sweep_dir / COMPLETIONS
    if not path.exists():
        return set()
    return {json.loads(line)["trial_id"] for line in path.read_text().splitlines() if line}


def _trial_dirname(trial: Any) -> str:
    return trial.trial_id


def _param_space(sweep: Sweep) -> dict[str, Any]:
    from ray import tune

    if sweep.spec.search.algorithm != "tpe":
        # Seeds cross the points, so every seed of a configuration trains the same values.
        return {
            "point": tune.grid_search(sweep.points),
            "seed": tune.grid_search(list(sweep.spec.seeds)),
        }
    make = {
        "grid": tune.choice,
        "choice": tune.choice,
        "uniform": lambda v: tune.uniform(*v),
        "loguniform": lambda v: tune.loguniform(*v),
        "randint": lambda v: tune.randint(*v),
    }
    return {
        "point": {d.key: make[d.kind](d.values) for d in sweep.dims},
        "seed": sweep.spec.seeds[0],
    }


def _tune_config(sweep: Sweep) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    spec = sweep.spec
    epochs = int(sweep.base["train"]["epochs"])
    scheduler: Any = FIFOScheduler()
    if spec.scheduler.name == "asha":
        scheduler = ASHAScheduler(
            time_attr=TIME_ATTR,
            max_t=epochs,
            grace_period=min(spec.scheduler.grace_period, epochs),
            reduction_factor=spec.scheduler.reduction_factor,
        )
    search_alg = None
    num_samples = 1  # grid_search over the points/seeds gives every trial
    if spec.search.algorithm == "tpe":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=spec.search.seed)
        if spec.resources.max_concurrent_trials:
            search_alg = ConcurrencyLimiter(search_alg, spec.resources.max_concurrent_trials)
        num_samples = spec.num_samples
    return tune.TuneConfig(
        metric=spec.metric,
        mode=spec.mode,
        scheduler=scheduler,
        search_alg=search_alg,
        num_samples=num_samples,
        max_concurrent_trials=spec.resources.max_concurrent_trials or None,
        trial_dirname_creator=_trial_dirname,
    )


def _tuner(sweep: Sweep, sweep_dir: Path, parent_run_id: str, resume: bool) -> Any:
    from ray import tune

    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial,
            sweep={
                "dir": str(sweep_dir),
                "base": sweep.base,
                "name": sweep.spec.name,
                "parent_run_id": parent_run_id,
            },
        ),
        {"cpu": sweep.spec.resources.driver_cpu},
    )
    tune_path = sweep_dir / "tune"
    if resume:
        if not tune.Tuner.can_restore(str(tune_path)):
            raise ConfigError(f"--resume: {tune_path} holds no Tune experiment to resume")
        # Finished and early-stopped trials are kept; unfinished and failed ones run again
        # (a failed trial restarts its own Train run, which resumes from its checkpoint).
        return tune.Tuner.restore(
            str(tune_path), trainable=trainable, resume_unfinished=True, resume_errored=True
        )
    return tune.Tuner(
        trainable,
        param_space=_param_space(sweep),
        tune_config=_tune_config(sweep),
        run_config=tune.RunConfig(
            name="tune",
            storage_path=str(sweep_dir),
            failure_config=tune.FailureConfig(max_failures=0),
            callbacks=[_completion_recorder(sweep_dir)],
        ),
    )


# -- results ---------------------------------------------------------------------------------
@dataclass
class TrialRow:
    trial_id: str
    point: dict[str, Any]
    seed: int
    status: str  # completed | stopped | failed | unfinished
    epochs: int
    score: float | None
    run_dir: Path
    mlflow_run_id: str | None


def collect(result_grid: Any, sweep: Sweep, sweep_dir: Path) -> list[TrialRow]:
    """One row per trial: its point, seed, how it ended, epochs run and last metric value."""
    epochs = int(sweep.base["train"]["epochs"])
    completed = _completed_trials(sweep_dir)
    rows = []
    # The ResultGrid's Results carry no trial status; its analysis object has the trials.
    for trial in result_grid._experiment_analysis.trials:
        metrics = trial.last_result or {}
        run_dir = sweep_dir / "trials" / trial.trial_id
        info = run_dir / "run.json"
        run_id = json.loads(info.read_text()).get("mlflow_run_id") if info.exists() else None
        done = int(metrics.get(TIME_ATTR, 0))
        if trial.status == "ERROR":
            status = "failed"
        elif trial.status != "TERMINATED" or trial.trial_id not in completed:
            status = "unfinished"  # pending, or torn down by an interrupted sweep
        elif done >= epochs and (run_dir / "summary.json").exists():
            status = "completed"
        else:
            status = "stopped"  # terminated by the scheduler before the last epoch
        score = metrics.get(sweep.spec.metric)
        rows.append(
            TrialRow(
                trial_id=trial.trial_id,
                point=dict(trial.config.get("point", {})),
                seed=int(trial.config.get("seed", 0)),
                status=status,
                epochs=done,
                score=float(score) if score is not None else None,
                run_dir=run_dir,
                mlflow_run_id=run_id,
            )
        )
    rows.sort(key=lambda r: (_point_order(r.point), r.seed))
    return rows


def _point_order(point: dict[str, Any]) -> tuple:
    """Sort key: numbers by value (0.3 < 3 < 30), then anything else by its text."""
    return tuple(
        (0, v, "") if isinstance(v, int | float) else (1, 0, str(v)) for v in point.values()
    )


def close_orphaned_runs(uri: str, rows: list[TrialRow], max_epochs: int) -> int:
    """Mark the MLflow runs of trials the scheduler stopped KILLED, with the epochs they ran.

    Stopping a trial kills its actor mid-``fit()``: ``train()`` either never ends the run (left
    RUNNING) or sees the teardown as an error (FAILED). Tune knows better: it stopped them.
    """
    from distnoisy import tracking

    client = tracking._client(uri)
    closed = 0
    for row in rows:
        if row.mlflow_run_id is None or row.status not in ("stopped", "failed"):
            continue
        current = tracking.run_status(uri, row.mlflow_run_id)
        if current == "FINISHED" or (row.status == "failed" and current != "RUNNING"):
            continue
        reason = (
            f"stopped early by the scheduler after {row.epochs} of {max_epochs} epochs"
            if row.status == "stopped"
            else "trial failed"
        )
        client.set_tag(row.mlflow_run_id, STOPPED_TAG, str(row.status == "stopped").lower())
        client.set_tag(row.mlflow_run_id, "distnoisy.end_reason", reason)
        tracking.RunLogger(uri, row.mlflow_run_id, 0).log_metrics(
            {"epochs_run": row.epochs}, step=max(row.epochs - 1, 0)
        )
        tracking.end_run(uri, row.mlflow_run_id, "KILLED" if row.status == "stopped" else "FAILED")
        closed += 1
    return closed


def mark_interrupted_runs(uri: str, parent_run_id: str) -> None:
    """On resume: trial runs left RUNNING by a killed sweep driver are KILLED (until resumed)."""
    from distnoisy import tracking

    client = tracking._client(uri)
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' and status = 'RUNNING'",
    )
    for run in runs:
        client.set_tag(run.info.run_id, "distnoisy.end_reason", "sweep driver interrupted")
        tracking.end_run(uri, run.info.run_id, "KILLED")


@dataclass
class Group:
    point: dict[str, Any]
    rows: list[TrialRow]

    @property
    def scores(self) -> list[float]:
        return [r.score for r in self.rows if r.status == "completed" and r.score is not None]

    @property
    def complete(self) -> bool:
        return bool(self.rows) and all(r.status == "completed" for r in self.rows)

    def mean(self) -> float | None:
        return statistics.mean(self.scores) if self.scores else None

    def std(self) -> float | None:
        return statistics.stdev(self.scores) if len(self.scores) > 1 else None


def group_rows(rows: list[TrialRow]) -> list[Group]:
    groups: dict[str, Group] = {}
    for r in rows:
        key = json.dumps(r.point, sort_keys=True)
        groups.setdefault(key, Group(r.point, [])).rows.append(r)
    return list(groups.values())


def best_of(groups: list[Group], mode: str) -> tuple[Group, TrialRow] | None:
    """The configuration with the best mean score over its seeds (among those that ran all
    epochs: an early-stopped trial's score is from a shorter run) and its best seed."""
    sign = 1.0 if mode == "max" else -1.0
    ranked = [g for g in groups if g.complete and g.mean() is not None]
    if not ranked:
        ranked = [g for g in groups if g.mean() is not None]
    if not ranked:
        return None
    group = max(ranked, key=lambda g: sign * g.mean())
    trial = max(
        (r for r in group.rows if r.status == "completed" and r.score is not None),
        key=lambda r: sign * r.score,
    )
    return group, trial


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def results_markdown(sweep: Sweep, rows: list[TrialRow], groups: list[Group]) -> str:
    spec = sweep.spec
    keys = [d.key for d in sweep.dims]
    lines = [
        f"Sweep `{spec.name}`: method `{sweep.base['method']['name']}`, metric `{spec.metric}` "
        f"({spec.mode}, last epoch of {sweep.base['train']['epochs']}), "
        f"{spec.search.algorithm} search, scheduler {spec.scheduler.name}, "
        f"{len(spec.seeds)} seed(s) per configuration.",
        "",
        "| " + " | ".join(keys) + f" | {spec.metric} mean ± std | seeds | trials |",
        "|" + "---|" * (len(keys) + 3),
    ]
    sign = 1.0 if spec.mode == "max" else -1.0
    ranked = sorted(groups, key=lambda g: (g.mean() is None, -sign * (g.mean() or 0.0)))
    for g in ranked:
        mean, std = g.mean(), g.std()
        cell = _pct(mean) + (f" ± {std:.4f}" if std is not None else "")
        trials = ", ".join(
            ("completed" if r.status == "completed" else f"{r.status}@{r.epochs}")
            + f" {_pct(r.score)}"
            for r in g.rows
        )
        lines.append(
            "| "
            + " | ".join(_fmt_value(g.point.get(k)) for k in keys)
            + f" | {cell} | {len(g.scores)}/{len(g.rows)} | {trials} |"
        )
    lines += [
        "",
        f"Mean ± std over seeds of trials that ran all epochs; `trials`: each seed's end and "
        f"last {spec.metric} (`stopped@k`: stopped early by the scheduler after k epochs). "
        f"{len(rows)} trials.",
    ]
    return "\n".join(lines) + "\n"


def results_csv(rows: list[TrialRow], keys: list[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["trial_id", *keys, "seed", "status", "epochs", "score", "mlflow_run_id"])
    for r in rows:
        writer.writerow(
            [r.trial_id, *(r.point.get(k) for k in keys), r.seed, r.status, r.epochs, r.score,
             r.mlflow_run_id]
        )  # fmt: skip
    return out.getvalue()


def plot(sweep: Sweep, groups: list[Group], path: Path) -> bool:
    """Metric vs the one numeric key (mean ± std), a heat map over two keys, else a bar chart."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plot")
        return False
    import numpy as np

    metric = sweep.spec.metric
    done = [g for g in groups if g.mean() is not None]
    if not done:
        return False
    keys = [d.key for d in sweep.dims]
    numeric = [k for k in keys if all(isinstance(g.point[k], int | float) for g in done)]
    fig, ax = plt.subplots(figsize=(6, 4))
    grid_like = [k for k in numeric if len({g.point[k] for g in done}) <= 12]
    if len(grid_like) >= 2:
        # Heat map over the first two numeric keys; other keys: the best of their values.
        kx, ky = grid_like[:2]
        xs = sorted({g.point[kx] for g in done})
        ys = sorted({g.point[ky] for g in done})
        grid = np.full((len(ys), len(xs)), np.nan)
        sign = 1.0 if sweep.spec.mode == "max" else -1.0
        for g in done:
            i, j = ys.index(g.point[ky]), xs.index(g.point[kx])
            if not np.isfinite(grid[i, j]) or sign * g.mean() > sign * grid[i, j]:
                grid[i, j] = g.mean()
        im = ax.imshow(grid, origin="lower", cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(xs)), [_fmt_value(x) for x in xs])
        ax.set_yticks(range(len(ys)), [_fmt_value(y) for y in ys])
        ax.set_xlabel(kx)
        ax.set_ylabel(ky)
        for (i, j), v in np.ndenumerate(grid):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.3f}", ha="center", va="center", color="w", fontsize=8)
        others = [k for k in keys if k not in (kx, ky)]
        note = f", best over {', '.join(others)}" if others else ""
        fig.colorbar(im, label=f"{metric} (mean over seeds{note})")
    elif len(keys) == 1 and numeric:
        order = sorted(done, key=lambda g: g.point[keys[0]])
        x = [g.point[keys[0]] for g in order]
        ax.errorbar(
            x, [g.mean() for g in order], yerr=[g.std() or 0 for g in order], marker="o",
            label="ran all epochs (mean ± std)",
        )  # fmt: skip
        early = [r for g in groups for r in g.rows if r.status == "stopped" and r.score is not None]
        if early:
            ax.scatter(
                [r.point[keys[0]] for r in early], [r.score for r in early], color="grey",
                marker="x", label="stopped early (last value)",
            )  # fmt: skip
            x = x + [r.point[keys[0]] for r in early]
        ax.legend(fontsize=8)
        if min(x) > 0 and max(x) / min(x) >= 10:
            ax.set_xscale("log")
        ax.set_xlabel(keys[0])
        ax.set_ylabel(f"{metric} (mean ± std over seeds)")
    else:
        labels = [_point_label(g.point) for g in done]
        ax.barh(range(len(done)), [g.mean() for g in done], xerr=[g.std() or 0 for g in done])
        ax.set_yticks(range(len(done)), labels, fontsize=7)
        ax.set_xlabel(f"{metric} (mean ± std over seeds)")
    ax.set_title(f"sweep {sweep.spec.name}: {sweep.base['method']['name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_best(sweep: Sweep, trial: TrialRow, path: Path) -> Config:
    """The best trial's resolved config as a ready-to-run ``--config`` file."""
    from distnoisy.config import load_config

    cfg = load_config(["--config", str(trial.run_dir / "config.yaml")])
    data = to_dict(cfg)
    data.update(output_dir=None, name=None, resume=False)
    data["tracking"]["run_name"] = None
    best = from_dict(data)
    save_config(best, path)
    return best


# -- the driver ------------------------------------------------------------------------------
def run_sweep(
    space_file: Path, argv: list[str], out: Path | None = None, resume: bool = False
) -> dict[str, Any]:
    """Run (or resume) a sweep; returns the report (also in ``results.json``)."""
    from distnoisy import tracking
    from distnoisy.config import flat_params
    from distnoisy.launch import ensure_ray

    space_file = Path(space_file)
    where = f"search space {space_file}"
    if not space_file.is_file():
        raise ConfigError(f"{where} does not exist")
    sweep_dir = (out or Path("runs") / "tune" / space_file.stem).expanduser().resolve()
    state = sweep_dir / "sweep.json"
    if resume:
        if not state.exists():
            raise ConfigError(f"--resume: {sweep_dir} holds no sweep (no sweep.json)")
        saved = json.loads(state.read_text())
        if argv and argv != saved["argv"]:
            raise ConfigError(
                f"--resume continues the sweep as started ({' '.join(saved['argv'])}); "
                "drop the key=value arguments"
            )
        argv = saved["argv"]
        spec = load_spec(sweep_dir / "space.yaml", argv)
        spec.name = saved["name"]
    else:
        if sweep_dir.exists() and any(sweep_dir.iterdir()):
            raise ConfigError(
                f"sweep directory {sweep_dir} is not empty; pass --resume to continue that "
                "sweep, or --out DIR for a new one"
            )
        spec = load_spec(space_file, argv)
    sweep = plan(spec, where)  # every error before this line leaves nothing behind
    base_cfg = from_dict(sweep.base)
    uri = base_cfg.tracking.uri
    assert uri is not None

    if resume:
        parent_run_id = saved["parent_run_id"]
        tracking.reopen_run(uri, parent_run_id)
        mark_interrupted_runs(uri, parent_run_id)
    else:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        # A copy of the space (with its config file's absolute path): --resume reads this one.
        shutil.copyfile(space_file, sweep_dir / "space.yaml")
        if spec.config:
            copy = OmegaConf.load(sweep_dir / "space.yaml")
            copy.config = spec.config
            OmegaConf.save(copy, sweep_dir / "space.yaml")
        params = {f"sweep.{k}": v for k, v in spec.space.items()}
        params.update(
            {
                "sweep.metric": spec.metric,
                "sweep.mode": spec.mode,
                "sweep.search": spec.search.algorithm,
                "sweep.scheduler": spec.scheduler.name,
                "sweep.grace_period": spec.scheduler.grace_period,
                "sweep.reduction_factor": spec.scheduler.reduction_factor,
                "sweep.seeds": spec.seeds,
                "sweep.num_samples": spec.num_samples,
                "sweep.space_file": str(space_file),
            }
        )
        params.update(flat_params(base_cfg))
        parent_run_id = tracking.start_run(
            uri,
            base_cfg.tracking.experiment,
            f"sweep-{spec.name}",
            params,
            tags={"distnoisy.sweep": spec.name, "distnoisy.output_dir": str(sweep_dir)},
        )
        tmp = state.with_suffix(".tmp")
        tmp.write_text(
            json.dumps({"argv": argv, "name": spec.name, "parent_run_id": parent_run_id})
        )
        os.replace(tmp, state)

    status = "FAILED"
    try:
        # A local cluster gets enough logical CPUs for the concurrent trials it is asked for.
        per_trial = spec.resources.workers + spec.resources.driver_cpu
        wanted = math.ceil(max(1, spec.resources.max_concurrent_trials) * per_trial)
        ensure_ray(base_cfg.scaling.address, wanted - 1)
        t0 = time.perf_counter()
        result_grid = _tuner(sweep, sweep_dir, parent_run_id, resume).fit()
        rows = collect(result_grid, sweep, sweep_dir)
        epochs = int(sweep.base["train"]["epochs"])
        close_orphaned_runs(uri, rows, epochs)
        if any(r.status == "unfinished" for r in rows):
            status = "KILLED"
            raise KeyboardInterrupt("sweep interrupted")
        report = finish(sweep, rows, sweep_dir, uri, parent_run_id)
        report["wall_s"] = round(time.perf_counter() - t0, 1)
        (sweep_dir / "results.json").write_text(json.dumps(report, indent=2, default=str))
        tracking.log_artifacts(uri, parent_run_id, [sweep_dir / "results.json"])
        status = "FINISHED"
        return report
    except (KeyboardInterrupt, SystemExit):
        status = "KILLED"
        raise
    finally:
        tracking.end_run(uri, parent_run_id, status)


def finish(
    sweep: Sweep, rows: list[TrialRow], sweep_dir: Path, uri: str, parent_run_id: str
) -> dict[str, Any]:
    """Write the results table, plot and best config, and log them to the parent run."""
    from distnoisy import tracking

    groups = group_rows(rows)
    keys = [d.key for d in sweep.dims]
    (sweep_dir / "results.md").write_text(results_markdown(sweep, rows, groups))
    (sweep_dir / "results.csv").write_text(results_csv(rows, keys))
    artifacts = [sweep_dir / "results.md", sweep_dir / "results.csv"]
    if plot(sweep, groups, sweep_dir / "plot.png"):
        artifacts.append(sweep_dir / "plot.png")
    report: dict[str, Any] = {
        "name": sweep.spec.name,
        "metric": sweep.spec.metric,
        "mode": sweep.spec.mode,
        "sweep_dir": str(sweep_dir),
        "parent_run_id": parent_run_id,
        "trials": [
            {
                "trial_id": r.trial_id,
                "point": r.point,
                "seed": r.seed,
                "status": r.status,
                "epochs": r.epochs,
                "score": r.score,
                "mlflow_run_id": r.mlflow_run_id,
            }
            for r in rows
        ],
        "configs": [
            {"point": g.point, "mean": g.mean(), "std": g.std(), "n": len(g.scores)} for g in groups
        ],
        "best": None,
    }
    chosen = best_of(groups, sweep.spec.mode)
    if chosen is not None:
        group, trial = chosen
        write_best(sweep, trial, sweep_dir / "best.yaml")
        artifacts.append(sweep_dir / "best.yaml")
        report["best"] = {
            "point": group.point,
            "mean": group.mean(),
            "std": group.std(),
            "trial_id": trial.trial_id,
            "seed": trial.seed,
            "score": trial.score,
            "config": str(sweep_dir / "best.yaml"),
        }
        metrics = {f"best_{sweep.spec.metric}": trial.score}
        if group.mean() is not None:
            metrics[f"best_mean_{sweep.spec.metric}"] = group.mean()
        tracking.RunLogger(uri, parent_run_id, 0).log_metrics(metrics, step=0)
    tracking.log_artifacts(uri, parent_run_id, artifacts)
    return report


def format_report(report: dict[str, Any]) -> str:
    trials = report["trials"]
    stopped = [t for t in trials if t["status"] == "stopped"]
    lines = [
        f"distnoisy sweep {report['name']}: {len(trials)} trials "
        f"({sum(t['status'] == 'completed' for t in trials)} completed, {len(stopped)} stopped "
        f"early, {sum(t['status'] == 'failed' for t in trials)} failed) in "
        f"{report.get('wall_s')} s; outputs in {report['sweep_dir']}"
    ]
    best = report["best"]
    if best is None:
        lines.append("  no trial finished: no best config")
    else:
        spread = f" ± {best['std']:.4f}" if best["std"] is not None else ""
        lines += [
            f"  best config {_point_label(best['point'])}: {report['metric']} "
            f"{best['mean']:.4f}{spread} over seeds; seed {best['seed']}: {best['score']:.4f}",
            f"  re-run it: python -m distnoisy.train --config {best['config']}",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from distnoisy.train import setup_cli

    setup_cli()  # SIGTERM -> KeyboardInterrupt: the sweep ends like Ctrl-C, resumable
    parser = argparse.ArgumentParser(
        prog="python -m distnoisy.tune", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("space", type=Path, help="search space YAML (see tune_spaces/)")
    parser.add_argument("overrides", nargs="*", help="key=value: base config or sweep keys")
    parser.add_argument("--out", type=Path, help="sweep directory (default runs/tune/<space>)")
    parser.add_argument(
        "--resume", action="store_true", help="continue the sweep in --out; finished trials stay"
    )
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    try:
        report = run_sweep(args.space, args.overrides, args.out, args.resume)
    except DistnoisyError as e:
        print(f"distnoisy: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"distnoisy: sweep interrupted; continue it with: python -m distnoisy.tune "
            f"{args.space} --resume" + (f" --out {args.out}" if args.out else ""),
            file=sys.stderr,
        )
        return 130
    print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
