"""Ray Tune wiring: the function trainable, the epoch report callback, the completion record,
the parameter space and the ``Tuner``.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from distnoisy.config import from_dict, to_dict
from distnoisy.core.errors import ConfigError
from distnoisy.tune.spec import TIME_ATTR, Sweep, _point_label, trial_config


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
            if "epoch_step" in first:  # a mid-epoch checkpoint: no epoch finished
                return
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
