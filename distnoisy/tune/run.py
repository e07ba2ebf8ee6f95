"""The sweep driver: plan, run the trials through Ray Tune, collect and report."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from distnoisy.config import Config, from_dict
from distnoisy.core.errors import ConfigError
from distnoisy.driver.cli import teardown_output_to
from distnoisy.tune.mlflow_cleanup import close_orphaned_runs, mark_interrupted_runs
from distnoisy.tune.ray_glue import _tuner
from distnoisy.tune.report import (
    TrialRow,
    best_of,
    collect,
    group_rows,
    plot,
    results_csv,
    results_markdown,
    write_best,
)
from distnoisy.tune.spec import Sweep, SweepSpec, _point_label, load_spec, plan


def run_sweep(
    space_file: Path, argv: list[str], out: Path | None = None, resume: bool = False
) -> dict[str, Any]:
    """Run (or resume) a sweep; returns the report (also in ``results.json``)."""
    from distnoisy import tracking
    from distnoisy.launch.cluster import ensure_ray
    from distnoisy.tracking.lifecycle import tracked_run

    space_file = Path(space_file)
    where = f"search space {space_file}"
    if not space_file.is_file():
        raise ConfigError(f"{where} does not exist")
    sweep_dir = (out or Path("runs") / "tune" / space_file.stem).expanduser().resolve()
    spec, argv, saved = _load_sweep_spec(space_file, argv, sweep_dir, resume)
    sweep = plan(spec, where)  # every error before this line leaves nothing behind
    base_cfg = from_dict(sweep.base)
    uri = base_cfg.tracking.uri
    assert uri is not None

    if not resume:
        _make_sweep_dir(spec, space_file, sweep_dir)
    with tracked_run(
        uri,
        base_cfg.tracking.experiment,
        f"sweep-{spec.name}",
        _sweep_params(spec, space_file, base_cfg),
        tags={"distnoisy.sweep": spec.name, "distnoisy.output_dir": str(sweep_dir)},
        reopen=saved["parent_run_id"] if resume else None,
        source="python -m distnoisy.tune",
    ) as parent_run_id:
        assert parent_run_id is not None
        if resume:
            mark_interrupted_runs(uri, parent_run_id)
        else:
            _save_state(sweep_dir, argv, spec.name, parent_run_id)
        # A local cluster gets enough logical CPUs for the concurrent trials it is asked for.
        per_trial = spec.resources.workers + spec.resources.driver_cpu
        wanted = math.ceil(max(1, spec.resources.max_concurrent_trials) * per_trial)
        ensure_ray(base_cfg.scaling.address, wanted - 1)
        t0 = time.perf_counter()
        with teardown_output_to(sweep_dir / "interrupted.log"):
            result_grid = _tuner(sweep, sweep_dir, parent_run_id, resume).fit()
            rows = collect(result_grid, sweep, sweep_dir)
            epochs = int(sweep.base["train"]["epochs"])
            close_orphaned_runs(uri, rows, epochs)
            if any(r.status == "unfinished" for r in rows):
                # Tune stopped on Ctrl-C/SIGTERM and returned: the sweep ends KILLED, resumable,
                # and so do the runs of the trials it stopped mid-training (a resume reopens
                # them). Ray's teardown, printed meanwhile, is in interrupted.log.
                mark_interrupted_runs(uri, parent_run_id)
                import ray

                ray.shutdown()  # the actors' log stream ends here
                raise KeyboardInterrupt("sweep interrupted")
        report = finish(sweep, rows, sweep_dir, uri, parent_run_id)
        report["wall_s"] = round(time.perf_counter() - t0, 1)
        (sweep_dir / "results.json").write_text(json.dumps(report, indent=2, default=str))
        tracking.log_artifacts(uri, parent_run_id, [sweep_dir / "results.json"])
        return report


def _load_sweep_spec(
    space_file: Path, argv: list[str], sweep_dir: Path, resume: bool
) -> tuple[SweepSpec, list[str], dict[str, Any]]:
    """(spec, argv, saved sweep state) of a new sweep, or of the one in ``sweep_dir``."""
    state = sweep_dir / "sweep.json"
    saved: dict[str, Any] = {}
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
    return spec, argv, saved


def _make_sweep_dir(spec: SweepSpec, space_file: Path, sweep_dir: Path) -> None:
    """Create the sweep directory with a copy of the space (with its config file's absolute
    path): ``--resume`` reads this one."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(space_file, sweep_dir / "space.yaml")
    if spec.config:
        copy = OmegaConf.load(sweep_dir / "space.yaml")
        copy.config = spec.config
        OmegaConf.save(copy, sweep_dir / "space.yaml")


def _sweep_params(spec: SweepSpec, space_file: Path, base_cfg: Config) -> dict[str, Any]:
    """The parent run's params: the space, the search and the base config."""
    from distnoisy.config import flat_params

    params: dict[str, Any] = {f"sweep.{k}": v for k, v in spec.space.items()}
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
    return params


def _save_state(sweep_dir: Path, argv: list[str], name: str, parent_run_id: str) -> None:
    """``sweep.json``: what ``--resume`` needs (the arguments, the name, the parent run)."""
    state = sweep_dir / "sweep.json"
    tmp = state.with_suffix(".tmp")
    tmp.write_text(json.dumps({"argv": argv, "name": name, "parent_run_id": parent_run_id}))
    os.replace(tmp, state)


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
