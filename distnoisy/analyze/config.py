"""The config of ``python -m distnoisy.analyze``: OmegaConf dataclasses, checked up front.

Given like training's: ``run=[A,B,...] reference=R analysis.buckets=5 ...`` (``--config
FILE.yaml`` too). Unknown keys and out-of-range values are one-line :class:`ConfigError`\\ s.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from distnoisy.config import _load_yaml, split_argv
from distnoisy.core.errors import ConfigError

#: ``analysis.frequency``: k-NN density in a feature space, or (longtail only) the true
#: training size of the sample's subpopulation.
FREQUENCIES = ("knn", "subpopulation")
#: ``analysis.metric``.
METRICS = ("cosine", "l2")
#: ``analysis.search``: exact up to 50,000 training rows (``auto``), always, or approximate.
SEARCHES = ("auto", "exact", "ivf")


@dataclass
class AnalysisOptions:
    """``analysis.*``: how frequency is measured and bucketed."""

    frequency: str = "knn"
    # Neighbours of the k-NN density.
    k: int = 10
    metric: str = "cosine"
    # Quantile buckets of the training frequency scores (bucket 0 = rarest).
    buckets: int = 5
    # Whose backbone features the density is computed in: "reference" (the reference run if
    # given, else the first run: every method on the same buckets), "self" (each run its own),
    # "pixels" (the input images themselves), or a run (output directory or MLflow id).
    features_from: str = "reference"
    # Ray tasks for the k-NN search of large sets (>= 20,000 query rows); 1 = in process.
    num_workers: int = 1
    # The k-NN search: "exact", "ivf" (approximate inverted file), or "auto" (exact up to
    # 50,000 training rows, ivf above).
    search: str = "auto"
    # ivf: lists searched per query list (more = closer to the exact score, slower).
    probes: int = 16


@dataclass
class AnalyzeTracking:
    enabled: bool = True
    # None = sqlite:///<absolute cwd>/mlflow.db, as training; also where run ids are looked up.
    uri: str | None = None
    experiment: str = "distnoisy-analysis"


@dataclass
class AnalyzeConfig:
    # The runs to compare: output directories or MLflow run ids.
    run: list[str] = field(default_factory=list)
    # A run of the same data and model on clean labels (noise.kind=none): the excess error.
    reference: str | None = None
    analysis: AnalysisOptions = field(default_factory=AnalysisOptions)
    tracking: AnalyzeTracking = field(default_factory=AnalyzeTracking)
    # None = analyses/<timestamp>
    output_dir: str | None = None


def validate(cfg: AnalyzeConfig) -> None:
    """Check choices and ranges the types cannot express."""
    a = cfg.analysis
    checks = [
        (bool(cfg.run), "no runs to analyse; pass run=[RUN_DIR_OR_ID, ...]"),
        (a.frequency in FREQUENCIES, f"analysis.frequency must be one of {', '.join(FREQUENCIES)}"),
        (a.metric in METRICS, f"analysis.metric must be one of {', '.join(METRICS)}"),
        (a.k >= 1, "analysis.k must be >= 1"),
        (a.buckets >= 1, "analysis.buckets must be >= 1"),
        (a.num_workers >= 1, "analysis.num_workers must be >= 1"),
        (a.search in SEARCHES, f"analysis.search must be one of {', '.join(SEARCHES)}"),
        (a.probes >= 1, "analysis.probes must be >= 1"),
        (len(set(cfg.run)) == len(cfg.run), "run=[...] names a run twice"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def load_analyze_config(argv: list[str] | None = None) -> AnalyzeConfig:
    """The typed config from ``--config`` files and ``key=value`` overrides (later wins)."""
    files, overrides = split_argv(list(argv or []))
    # run=DIR (one run, no brackets) means run=[DIR].
    overrides = [
        f"run=[{o[4:]}]" if o.startswith("run=") and not o[4:].lstrip().startswith("[") else o
        for o in overrides
    ]
    sources = [_load_yaml(f) for f in files]
    try:
        sources.append(OmegaConf.from_dotlist(overrides))
        merged = OmegaConf.merge(OmegaConf.structured(AnalyzeConfig()), *sources)
        cfg: AnalyzeConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or ""
        first = str(e).splitlines()[0]
        raise ConfigError(
            f"bad analysis config key or value {key!r}: {first} (keys: run, reference, "
            "analysis.{frequency,k,metric,buckets,features_from,num_workers,search,probes}, "
            "tracking.{enabled,uri,experiment}, output_dir)"
        ) from None
    validate(cfg)
    return cfg
