"""Sweep results: trial rows, groups over seeds, the best configuration, ``results.md``/``.csv``,
the plot and ``best.yaml``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distnoisy.config import Config, from_dict, save_config, to_dict
from distnoisy.launch import ray_compat
from distnoisy.tune.ray_glue import _completed_trials
from distnoisy.tune.spec import TIME_ATTR, Sweep, _fmt_value, _point_label

log = logging.getLogger("distnoisy")


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
    # The ResultGrid's Results carry no trial status: the trials come from Tune's saved state.
    for trial in ray_compat.tune_trials(result_grid):
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
