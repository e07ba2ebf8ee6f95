"""The sweep description: the search space file, its dimensions and the plan of trials."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from distnoisy.config import Config, from_dict, to_dict
from distnoisy.core.errors import ConfigError

SPACE_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
ALGORITHMS = ("grid", "random", "tpe")
SCHEDULERS = ("asha", "fifo")
#: Per-epoch report counter added to every forwarded metric dict: ASHA's time unit.
TIME_ATTR = "epochs_done"


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
