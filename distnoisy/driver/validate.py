"""The driver's checks before a run starts: where it writes, that a resume matches its saved
config, that the data fits a batch and that the model and method build.

Every check raises a one-line :class:`~distnoisy.core.errors.ConfigError` before the run
directory is created.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING

from distnoisy.config import RESUMABLE_KEYS, Config, load_config, resume_conflicts
from distnoisy.core.errors import ConfigError

if TYPE_CHECKING:
    from distnoisy.data.prepare import DataSpec


def resolve_run_dir(cfg: Config) -> Path:
    if cfg.output_dir:
        return Path(cfg.output_dir).expanduser().resolve()
    name = cfg.name or time.strftime("%Y%m%d-%H%M%S") + f"-{cfg.method.name}"
    return (Path("runs") / name).resolve()


def check_run_dir(run_dir: Path, resume: bool) -> None:
    existing = next(p for p in (run_dir, *run_dir.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(
            f"output_dir {run_dir} cannot be created: {existing} is a file, not a directory; "
            "choose another output_dir or name"
        )
    has_run = (run_dir / "run.json").exists()
    if resume and not has_run:
        raise ConfigError(f"resume=true but {run_dir} holds no run to resume (no run.json)")
    if resume and not (run_dir / "config.yaml").is_file():
        raise ConfigError(
            f"resume=true but {run_dir} holds no config.yaml to resume with; start a new run "
            "with another output_dir"
        )
    if not resume and run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(
            f"output_dir {run_dir} already exists and is not empty; pass resume=true to continue "
            "that run, or choose another output_dir/name"
        )


def _in_ray_job_copy(cwd: Path) -> bool:
    """Whether ``cwd`` is a Ray job's copy of its working_dir (deleted with the job's
    session): ``.../runtime_resources/working_dir_files/<package>``."""
    return "working_dir_files" in cwd.parts and "runtime_resources" in cwd.parts


def check_output_location(cfg: Config) -> None:
    """A run submitted with ``ray job submit --working-dir`` must say where its outputs go:
    the job runs in a temporary copy of that directory, which Ray deletes."""
    cwd = Path.cwd().resolve()
    if not _in_ray_job_copy(cwd):
        return
    missing = [
        k
        for k, v in (("output_dir", cfg.output_dir), ("tracking.uri", cfg.tracking.uri))
        if not v and (k == "output_dir" or cfg.tracking.enabled)
    ]
    if missing:
        raise ConfigError(
            f"this run's working directory {cwd} is Ray's temporary copy of the job's "
            f"working_dir; give {' and '.join(f'{k}=' for k in missing)} on storage that outlives "
            "the job (e.g. output_dir=/shared/runs/NAME), or the outputs are deleted with it"
        )


def check_resume_config(cfg: Config, run_dir: Path) -> None:
    """A resumed run keeps the config it was started with (but for :data:`RESUMABLE_KEYS`)."""
    saved_path = run_dir / "config.yaml"
    conflicts = resume_conflicts(load_config(["--config", str(saved_path)]), cfg)
    if conflicts:
        diff = "; ".join(f"{k}={new!r} (saved: {old!r})" for k, (old, new) in conflicts.items())
        raise ConfigError(
            f"resume=true: {diff} differs from {saved_path}; a resumed run keeps its config "
            f"(only {', '.join(RESUMABLE_KEYS)} may change): drop the override, or start a new "
            "run with another output_dir"
        )


def load_run_config(argv: list[str]) -> Config:
    """The config of ``python -m distnoisy.train ARGS``.

    With ``resume=true`` the run's saved ``config.yaml`` is the base and ``ARGS`` apply over it
    (``--config`` files, then ``key=value``), so a run resumes with the config it was started
    with; :func:`train` rejects any override outside :data:`RESUMABLE_KEYS` that changes it.

    Raises
    ------
    ConfigError
        For a bad argument, or ``resume=true`` without a run to resume.
    """
    cfg = load_config(argv)
    if not cfg.resume:
        return cfg
    run_dir = resolve_run_dir(cfg)
    check_run_dir(run_dir, resume=True)
    resumed = load_config(["--config", str(run_dir / "config.yaml"), *argv])
    # The directory found above, even if the saved config names it another way (name= vs path).
    return dataclasses.replace(resumed, output_dir=str(run_dir), resume=True)


def check_batch_fits(cfg: Config, spec: DataSpec) -> None:
    """One global batch must fit in an epoch's training samples (else no step would run)."""
    per_epoch = spec.num_train
    if cfg.data.exclude_file:
        from distnoisy.data.stream.sampling import KeptSubset, read_index_file

        excluded = read_index_file(cfg.data.exclude_file, spec.num_train)
        per_epoch = KeptSubset(spec.num_train, excluded).size
    if cfg.data.balanced_batches > 0:
        from distnoisy.data.stream import BalancedSubset
        from distnoisy.engine.components import training_labels

        given = training_labels(spec)[0]
        target = cfg.data.balanced_batches * cfg.train.batch_size
        per_epoch = BalancedSubset(given, target, seed=cfg.seed).size
    if cfg.train.batch_size > per_epoch:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} is larger than the {per_epoch} training "
            f"samples of an epoch ({spec.num_train} in the training set); lower train.batch_size "
            f"to at most {per_epoch}"
        )


def dry_build(cfg: Config, num_classes: int, in_channels: int) -> None:
    """Instantiate the model and method once so that bad settings fail before the run starts."""
    from distnoisy.engine.components import network_builder
    from distnoisy.methods import METHODS

    method = METHODS.get(cfg.method.name)(
        cfg.method, num_samples=1, num_classes=num_classes, epochs=cfg.train.epochs
    )
    # The method builds its networks as the workers will (LIMIT checks its q-network here).
    models = method.build_networks(network_builder(cfg, num_classes, in_channels))
    if cfg.train.init_weights:
        from distnoisy.engine.init_weights import load_init_weights

        load_init_weights(models, cfg.train.init_weights)
