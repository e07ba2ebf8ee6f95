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

Modules: :mod:`~distnoisy.tune.spec` (the space file and the plan of trials),
:mod:`~distnoisy.tune.ray_glue` (Ray Tune wiring), :mod:`~distnoisy.tune.report` (results),
:mod:`~distnoisy.tune.mlflow_cleanup`, :mod:`~distnoisy.tune.run` (the driver) and
:mod:`~distnoisy.tune.cli`; the names below are re-exported here.
"""

from distnoisy.tune.cli import main
from distnoisy.tune.mlflow_cleanup import STOPPED_TAG, close_orphaned_runs, mark_interrupted_runs
from distnoisy.tune.ray_glue import COMPLETIONS, run_trial
from distnoisy.tune.report import (
    Group,
    TrialRow,
    best_of,
    collect,
    group_rows,
    plot,
    results_csv,
    results_markdown,
    write_best,
)
from distnoisy.tune.run import finish, format_report, run_sweep
from distnoisy.tune.spec import (
    ALGORITHMS,
    SCHEDULERS,
    SPACE_KINDS,
    TIME_ATTR,
    Dimension,
    ResourceSettings,
    SchedulerSettings,
    SearchSettings,
    Sweep,
    SweepSpec,
    base_config,
    expand_points,
    load_spec,
    plan,
    trial_config,
)

__all__ = [
    "ALGORITHMS",
    "COMPLETIONS",
    "SCHEDULERS",
    "SPACE_KINDS",
    "STOPPED_TAG",
    "TIME_ATTR",
    "Dimension",
    "Group",
    "ResourceSettings",
    "SchedulerSettings",
    "SearchSettings",
    "Sweep",
    "SweepSpec",
    "TrialRow",
    "base_config",
    "best_of",
    "close_orphaned_runs",
    "collect",
    "expand_points",
    "finish",
    "format_report",
    "group_rows",
    "load_spec",
    "main",
    "mark_interrupted_runs",
    "plan",
    "plot",
    "results_csv",
    "results_markdown",
    "run_sweep",
    "run_trial",
    "trial_config",
    "write_best",
]
