"""``python -m distnoisy.bench steps`` times one training step per registered method relative to
plain cross-entropy, on the same model, batch and inputs, on the CPU::

    python -m distnoisy.bench steps --threads 2 --out docs/benchmarks.md

Two numbers per method:

- the **full step** exactly as :func:`distnoisy.engine.trainer.run_worker` runs it (forward,
  ``method.loss``, ``zero_grad``/``backward``/``step``, staging the CE loss history and
  predictions, ``store.flush()``). Rounds interleave the methods in a fresh shuffled order each
  round, so machine noise hits all of them alike; the ratio to CE comes with a bootstrap
  interval over rounds (resampled in pairs, since a round's methods share its noise);
- the **loss overhead**: ``method.loss`` + its backward + the flush of the method's own store
  writes, on fixed detached-leaf logits, timed over many repetitions with
  :func:`time.perf_counter_ns`. On a CPU a ResNet-18 step takes seconds and a loss a fraction of
  a millisecond, so this is the robust figure; it is reported as extra microseconds over CE and
  as a fraction of CE's full step.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import gc
import random
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distnoisy.bench.common import DOC_HEADER, _load_average, _without_note, machine_info
from distnoisy.core import result_docs as reporting
from distnoisy.engine.step import declare_run_fields, train_step
from distnoisy.methods import METHODS, Method
from distnoisy.methods.base import StepInput
from distnoisy.models import build_model
from distnoisy.store import SampleStore

SECTION_TITLE = "## Training step time per method"
#: A method whose loss adds more than this fraction of CE's step time is flagged.
LOSS_BUDGET = 0.03
BASELINE = "ce"


@dataclass
class StepBenchSettings:
    """What ``bench steps`` measures (its command-line options).

    Attributes
    ----------
    model
        A registered model name (``distnoisy.models.MODELS``).
    batch, image, classes
        Batch size B, square image side and number of classes C of the random batch.
    rounds
        Timed rounds; each runs every method for ``steps`` steps, in a shuffled order.
    warmup
        Untimed steps per method before the rounds (allocator, caches, momentum buffers).
    steps
        Timed steps per method per round.
    methods
        Method names to time, or None for every registered method. CE is always included.
    threads
        ``torch.set_num_threads`` value, or None to leave torch's default.
    loss_rounds, loss_reps
        The loss-overhead timing: ``loss_rounds`` interleaved rounds of ``loss_reps``
        individually timed repetitions per method.
    seed
        Seed of the model, the batch and the round orders.
    """

    model: str = "cifar_resnet18"
    batch: int = 128
    image: int = 32
    classes: int = 10
    rounds: int = 12
    warmup: int = 2
    steps: int = 2
    methods: list[str] | None = None
    threads: int | None = None
    loss_rounds: int = 20
    loss_reps: int = 50
    seed: int = 0


@dataclass
class MethodTiming:
    """Timings of one method.

    Attributes
    ----------
    name
        The method's registry name.
    step_ms
        Median over rounds of the round's mean step time, in milliseconds.
    step_min_ms, step_max_ms
        Smallest and largest round value.
    ratio
        ``step_ms / step_ms[CE]`` (exactly 1.0 for CE).
    ratio_lo, ratio_hi
        95% bootstrap interval of ``ratio``, resampling rounds (paired across methods).
    loss_us
        Median time of ``method.loss`` + backward + flush of its store writes on fixed logits,
        in microseconds.
    loss_p10_us
        The 10th percentile of the same repetitions: the method's intrinsic cost. A median far
        above it means the repetitions waited (e.g. intra-op threads woken on a busy machine).
    loss_extra_us
        ``loss_us - loss_us[CE]``.
    loss_extra_p10_us
        ``loss_p10_us - loss_p10_us[CE]``.
    loss_extra_frac
        ``loss_extra_us`` as a fraction of CE's full step time.
    rounds_ms
        The per-round values behind ``step_ms``.
    """

    name: str
    step_ms: float
    step_min_ms: float
    step_max_ms: float
    ratio: float
    ratio_lo: float
    ratio_hi: float
    loss_us: float
    loss_p10_us: float
    loss_extra_us: float
    loss_extra_p10_us: float
    loss_extra_frac: float
    rounds_ms: list[float] = field(default_factory=list)

    @property
    def over_budget(self) -> bool:
        """Whether the loss adds more than :data:`LOSS_BUDGET` of CE's step time."""
        return self.loss_extra_frac > LOSS_BUDGET

    @property
    def step_over_budget(self) -> bool:
        """Whether the whole step is, with 95% confidence, more than the budget slower than CE."""
        return self.ratio_lo > 1.0 + LOSS_BUDGET


@dataclass
class StepBenchReport:
    """The result of :func:`run_step_bench`.

    Attributes
    ----------
    settings
        What was measured.
    methods
        Timings by method name, CE first, then in registry order.
    skipped
        Methods that could not be built or run from default params, with the reason.
    machine
        Platform, CPU, CPU count, torch version and threads.
    date
        UTC time the run finished (ISO 8601, seconds).
    wall_s
        Total wall time of the benchmark.
    profiles
        For methods over the loss budget: a ``torch.profiler`` table of their loss.
    load
        The machine's 1-minute load average at the start and at the end (NaN where the
        platform has none): other work competing for the cores shows up as step-time noise.
    """

    settings: StepBenchSettings
    methods: dict[str, MethodTiming]
    skipped: dict[str, str]
    machine: dict[str, str]
    date: str
    wall_s: float
    profiles: dict[str, str] = field(default_factory=dict)
    load: tuple[float, float] = (float("nan"), float("nan"))


@dataclass
class _Subject:
    """A built method with its own store, ready to step."""

    name: str
    method: Method
    store: SampleStore


# -- setup ------------------------------------------------------------------------------------
def default_transition(num_classes: int, keep: float = 0.6) -> list[list[float]]:
    """A row-stochastic C x C matrix: ``keep`` on the diagonal, the rest spread evenly."""
    off = (1.0 - keep) / (num_classes - 1)
    return [[keep if i == j else off for j in range(num_classes)] for i in range(num_classes)]


def _build_subject(
    name: str, *, num_samples: int, num_classes: int, epochs: int, resources: dict[str, Any]
) -> _Subject:
    """Build ``name`` from default params and attach a store exactly as the loop does."""
    cls = METHODS.get(name)
    params = cls.Params(name=name)
    cls.validate_params(params)
    method = cls(
        params,
        num_samples=num_samples,
        num_classes=num_classes,
        epochs=epochs,
        resources=copy.deepcopy(resources),
    )
    store = SampleStore(num_samples)
    declare_run_fields(store, epochs, num_classes)
    method.attach(store)
    method.on_epoch_start(0)
    return _Subject(name, method, store)


def _selected_methods(requested: list[str] | None) -> tuple[list[str], dict[str, str]]:
    """Names to time (CE first) and requested names that are not registered."""
    registered = METHODS.names()
    wanted = list(registered) if requested is None else list(dict.fromkeys(requested))
    unknown = {n: "not registered" for n in wanted if n not in registered}
    names = [n for n in wanted if n in registered and n != BASELINE]
    return [BASELINE, *names], unknown


# -- the timed work ---------------------------------------------------------------------------
def _train_step(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    subject: _Subject,
    x: torch.Tensor,
    y: torch.Tensor,
    index: torch.Tensor,
) -> None:
    """One training step: :func:`distnoisy.engine.step.train_step`, as the trainer runs it."""
    batch = StepInput(x, y, index, epoch=0, step=0, steps_per_epoch=1)
    train_step(subject.method, {"model": model}, {"model": opt}, subject.store, batch)


def _loss_only(subject: _Subject, z: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> None:
    """The method's own work in a step: its loss, that loss's backward and its store writes."""
    z.grad = None
    out = subject.method.loss(z, y, index)
    out.loss.backward()
    subject.store.flush()


def _reset(
    model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict[str, torch.Tensor]
) -> None:
    """Put back the initial weights (in place) and zero the momentum buffers."""
    model.load_state_dict(state)
    for st in opt.state.values():
        buf = st.get("momentum_buffer")
        if buf is not None:
            buf.zero_()


def _bootstrap_ratio(
    num: np.ndarray, den: np.ndarray, rng: np.random.Generator, draws: int = 2000
) -> tuple[float, float]:
    """95% interval of ``median(num) / median(den)``, resampling round indices in pairs."""
    idx = rng.integers(0, len(num), size=(draws, len(num)))
    ratios = np.median(num[idx], axis=1) / np.median(den[idx], axis=1)
    lo, hi = np.percentile(ratios, [2.5, 97.5])
    return float(lo), float(hi)


def profile_loss(subject: _Subject, z: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> str:
    """A ``torch.profiler`` table (CPU time, top operators) of 20 loss-only repetitions."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(20):
            _loss_only(subject, z, y, index)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)


def run_step_bench(
    settings: StepBenchSettings, log: Any = print, profile_over_budget: bool = True
) -> StepBenchReport:
    """Time one training step per method relative to CE (see the module docstring).

    Parameters
    ----------
    settings
        What to measure.
    log
        Called with progress lines and notes (e.g. skipped methods); ``print`` by default.
    profile_over_budget
        Profile the loss of every method over :data:`LOSS_BUDGET` into ``report.profiles``.

    Returns
    -------
    StepBenchReport
        Per-method timings, skipped methods and the machine.

    Notes
    -----
    ``settings.threads`` applies for the run only; torch's thread count and global RNG are
    restored afterwards.
    """
    previous_threads = torch.get_num_threads()
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    try:
        with torch.random.fork_rng():
            return _run_step_bench(settings, log, profile_over_budget)
    finally:
        torch.set_num_threads(previous_threads)


def _run_step_bench(
    settings: StepBenchSettings, log: Any, profile_over_budget: bool
) -> StepBenchReport:
    t_start = time.perf_counter()
    load_start = _load_average()
    torch.manual_seed(settings.seed)
    b, c = settings.batch, settings.classes
    num_batches = 4
    num_samples, epochs = num_batches * b, 10
    resources = {"transition": default_transition(c)}

    model = build_model(settings.model, c, 3)
    model.train()
    init_state = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(b, 3, settings.image, settings.image)
    y = torch.randint(0, c, (b,))
    with torch.no_grad():
        z0 = model(x).detach()

    names, skipped = _selected_methods(settings.methods)
    for name, why in skipped.items():
        log(f"note: skipping {name}: {why}")
    subjects = _runnable_subjects(
        names,
        skipped,
        z0,
        y,
        num_samples=num_samples,
        num_classes=c,
        epochs=epochs,
        resources=resources,
        log=log,
    )
    order = list(subjects)
    log(
        f"timing {len(order)} methods: {', '.join(order)} "
        f"({settings.model}, batch {b}, {settings.image}x{settings.image}, C={c}, "
        f"{torch.get_num_threads()} threads)"
    )

    def index_of(step: int) -> torch.Tensor:
        return torch.arange(b) + b * (step % num_batches)

    # Warm-up: untimed steps per method, same reset as the timed turns.
    for name in order:
        _reset(model, opt, init_state)
        for k in range(settings.warmup):
            _train_step(model, opt, subjects[name], x, y, index_of(k))

    rng_order = random.Random(settings.seed)
    per_round = _time_steps(
        settings, order, subjects, model, opt, init_state, x, y, index_of, rng_order, log
    )
    leaves = {n: z0.clone().requires_grad_(True) for n in order}
    idx0 = torch.arange(b)
    loss_ns = _time_losses(settings, order, subjects, leaves, y, idx0, rng_order)
    timings = _timings(order, per_round, loss_ns, np.random.default_rng(settings.seed))

    profiles: dict[str, str] = {}
    if profile_over_budget:
        for name, t in timings.items():
            if t.over_budget:
                profiles[name] = profile_loss(subjects[name], leaves[name], y, idx0)
    return StepBenchReport(
        settings=settings,
        methods=timings,
        skipped=skipped,
        machine=machine_info(),
        date=dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
        wall_s=time.perf_counter() - t_start,
        profiles=profiles,
        load=(load_start, _load_average()),
    )


def _runnable_subjects(
    names: list[str],
    skipped: dict[str, str],
    z0: torch.Tensor,
    y: torch.Tensor,
    *,
    num_samples: int,
    num_classes: int,
    epochs: int,
    resources: dict[str, Any],
    log: Any,
) -> dict[str, _Subject]:
    """The methods that build and run a loss from default params; the others go to ``skipped``."""
    subjects: dict[str, _Subject] = {}
    for name in names:
        try:
            subject = _build_subject(
                name,
                num_samples=num_samples,
                num_classes=num_classes,
                epochs=epochs,
                resources=resources,
            )
            z = z0.clone().requires_grad_(True)
            _loss_only(subject, z, y, torch.arange(len(y)))  # can it run a step at all?
        except Exception as exc:
            if name == BASELINE:
                raise
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
            skipped[name] = f"cannot be built/run from default params ({reason})"
            log(f"note: skipping {name}: {skipped[name]}")
            continue
        subjects[name] = subject
    return subjects


def _time_steps(
    settings: StepBenchSettings,
    order: list[str],
    subjects: dict[str, _Subject],
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    init_state: dict[str, Any],
    x: torch.Tensor,
    y: torch.Tensor,
    index_of: Any,
    rng_order: random.Random,
    log: Any,
) -> dict[str, list[float]]:
    """Per method, the mean step time (ms) of each timed round.

    Rounds take a fresh shuffled order each, seeded.
    """
    per_round: dict[str, list[float]] = {n: [] for n in order}
    for r in range(settings.rounds):
        round_order = order[:]
        rng_order.shuffle(round_order)
        for name in round_order:
            _reset(model, opt, init_state)
            gc.collect()
            gc.disable()
            try:
                times = []
                for k in range(settings.steps):
                    index = index_of(k)
                    t0 = time.perf_counter_ns()
                    _train_step(model, opt, subjects[name], x, y, index)
                    times.append(time.perf_counter_ns() - t0)
            finally:
                gc.enable()
            per_round[name].append(float(np.mean(times)) / 1e6)
        log(
            f"round {r + 1}/{settings.rounds}: "
            + ", ".join(f"{n} {per_round[n][-1]:.0f}" for n in order)
            + " ms"
        )
    return per_round


def _time_losses(
    settings: StepBenchSettings,
    order: list[str],
    subjects: dict[str, _Subject],
    leaves: dict[str, torch.Tensor],
    y: torch.Tensor,
    idx0: torch.Tensor,
    rng_order: random.Random,
) -> dict[str, list[int]]:
    """Loss-only times (ns) on fixed detached-leaf logits, interleaved like the step rounds."""
    loss_ns: dict[str, list[int]] = {n: [] for n in order}
    for _ in range(settings.loss_rounds):
        round_order = order[:]
        rng_order.shuffle(round_order)
        for name in round_order:
            subject, z = subjects[name], leaves[name]
            gc.disable()
            try:
                for _ in range(settings.loss_reps):
                    t0 = time.perf_counter_ns()
                    _loss_only(subject, z, y, idx0)
                    loss_ns[name].append(time.perf_counter_ns() - t0)
            finally:
                gc.enable()
    return loss_ns


def _timings(
    order: list[str],
    per_round: dict[str, list[float]],
    loss_ns: dict[str, list[int]],
    rng_boot: np.random.Generator,
) -> dict[str, MethodTiming]:
    """Medians, ratios to CE with their bootstrap intervals, and loss overheads per method."""
    ce_rounds = np.asarray(per_round[BASELINE])
    ce_step_ms = float(np.median(ce_rounds))
    ce_loss_us = float(np.median(loss_ns[BASELINE])) / 1e3
    ce_loss_p10_us = float(np.percentile(loss_ns[BASELINE], 10)) / 1e3
    timings: dict[str, MethodTiming] = {}
    for name in order:
        rounds = np.asarray(per_round[name])
        step_ms = float(np.median(rounds))
        if name == BASELINE:
            ratio, lo, hi = 1.0, 1.0, 1.0
        else:
            ratio = step_ms / ce_step_ms
            lo, hi = _bootstrap_ratio(rounds, ce_rounds, rng_boot)
        loss_us = float(np.median(loss_ns[name])) / 1e3
        loss_p10_us = float(np.percentile(loss_ns[name], 10)) / 1e3
        extra = loss_us - ce_loss_us
        timings[name] = MethodTiming(
            name=name,
            step_ms=step_ms,
            step_min_ms=float(rounds.min()),
            step_max_ms=float(rounds.max()),
            ratio=ratio,
            ratio_lo=lo,
            ratio_hi=hi,
            loss_us=loss_us,
            loss_p10_us=loss_p10_us,
            loss_extra_us=extra,
            loss_extra_p10_us=loss_p10_us - ce_loss_p10_us,
            loss_extra_frac=extra / (ce_step_ms * 1e3),
            rounds_ms=rounds.tolist(),
        )
    return timings


# -- reporting --------------------------------------------------------------------------------
def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def format_table(report: StepBenchReport) -> str:
    """The per-method table as GitHub Markdown (also readable as plain text)."""
    rows = [
        "| method | step median (ms) | round min–max (ms) | ratio to CE [95% CI] "
        "| loss fwd+bwd median (p10) (µs) | loss extra vs CE median (p10) (µs) "
        "| extra / CE step | budget |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for t in report.methods.values():
        ci = "—" if t.name == BASELINE else f"[{t.ratio_lo:.3f}, {t.ratio_hi:.3f}]"
        flags = []
        if t.over_budget:
            flags.append(f"loss over {LOSS_BUDGET:.0%}")
        if t.step_over_budget:
            flags.append(f"step CI above +{LOSS_BUDGET:.0%}")
        verdict = ", ".join(flags) or "ok"
        rows.append(
            f"| {t.name} | {t.step_ms:.1f} | {t.step_min_ms:.1f}–{t.step_max_ms:.1f} "
            f"| {t.ratio:.3f} {ci} | {t.loss_us:.1f} ({t.loss_p10_us:.1f}) "
            f"| {t.loss_extra_us:+.1f} ({t.loss_extra_p10_us:+.1f}) "
            f"| {t.loss_extra_frac:+.4%} | {verdict} |"
        )
    return "\n".join(rows)


def format_section(report: StepBenchReport, command: str, note: str | None = None) -> str:
    """The ``## Training step time per method`` section of ``docs/benchmarks.md``.

    Parameters
    ----------
    report
        The measurements.
    command
        The command line that produced them.
    note
        An optional paragraph appended to the section (e.g. the machine's load at the time).
    """
    s, m = report.settings, report.machine
    lines = [
        SECTION_TITLE,
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {m['platform']}; CPU {m['cpu']} ({m['cpu_count']} logical CPUs); "
        f"Python {m['python']}; torch {m['torch']} with {m['torch_threads']} threads. "
        f"Date: {report.date} (benchmark wall time {report.wall_s:.0f} s; 1-minute load "
        f"average {report.load[0]:.1f} at the start, {report.load[1]:.1f} at the end).",
        "",
        f"One training step as `distnoisy.engine.step` runs it (forward, `method.loss`, "
        f"`zero_grad`/`backward`/SGD-momentum `step`, staging the CE loss history and "
        f"predictions, `store.flush()`), model `{s.model}`, one fixed random batch of "
        f"{s.batch} {s.image}x{s.image} images, C={s.classes}, CPU, same initial weights for "
        f"every method. {_n(s.rounds, 'round')} x {_n(s.steps, 'step')} per method after "
        f"{_n(s.warmup, 'warm-up step')}, the methods interleaved in a fresh shuffled order "
        f"each round; a method's step figure is the median over rounds of its round mean, its "
        f"CI a paired bootstrap over rounds.",
        "",
        f"The loss columns time the method's own work, `method.loss` + its backward + the "
        f"flush of its own store writes, on fixed detached-leaf logits "
        f"({s.loss_rounds} x {s.loss_reps} repetitions per method, interleaved, "
        f"`time.perf_counter_ns`): median and 10th percentile. On a CPU the step takes "
        f"seconds and a loss a fraction of a millisecond, so these are the robust figures; the "
        f"step ratios mostly show machine noise. A median far above the p10 means repetitions "
        f"waited (intra-op threads woken on a busy machine), not arithmetic. Budget: a loss "
        f"may add at most {LOSS_BUDGET:.0%} of CE's step (`extra / CE step`, from the medians).",
        "",
        format_table(report),
    ]
    if report.skipped:
        lines += ["", "Not timed:"]
        lines += [f"- `{n}`: {why}" for n, why in report.skipped.items()]
    over = [t for t in report.methods.values() if t.over_budget or t.step_over_budget]
    if over:
        lines += ["", "Over budget: " + ", ".join(f"`{t.name}`" for t in over) + "."]
    else:
        worst = max(report.methods.values(), key=lambda t: t.loss_extra_frac)
        lines += [
            "",
            f"No method over budget; the largest loss overhead is `{worst.name}`'s, "
            f"{worst.loss_extra_us:+.0f} µs = {worst.loss_extra_frac:.3%} of CE's step.",
        ]
    if note:
        lines += ["", note.strip()]
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str, title: str = SECTION_TITLE) -> None:
    """Write ``section`` (starting with the ``title`` line) into the Markdown file ``path``,
    replacing the section of that title and keeping the others (a new file starts with
    :data:`DOC_HEADER`)."""
    body = section.rstrip("\n").removeprefix(title).lstrip("\n")
    reporting.write_section(path, title.removeprefix("## "), body, header=DOC_HEADER)


# -- command line -----------------------------------------------------------------------------
def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add the ``steps`` sub-command to the ``python -m distnoisy.bench`` parser."""
    s = sub.add_parser("steps", help="one training step per method, relative to CE (CPU)")
    d = StepBenchSettings()
    s.add_argument("--model", default=d.model)
    s.add_argument("--batch", type=int, default=d.batch)
    s.add_argument("--image", type=int, default=d.image, help="square image side")
    s.add_argument("--classes", type=int, default=d.classes)
    s.add_argument("--rounds", type=int, default=d.rounds, help="timed rounds")
    s.add_argument("--warmup", type=int, default=d.warmup, help="untimed steps per method")
    s.add_argument("--steps", type=int, default=d.steps, help="timed steps per method per round")
    s.add_argument("--methods", default="all", help="'all' or a comma-separated list")
    s.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    s.add_argument("--loss-rounds", type=int, default=d.loss_rounds)
    s.add_argument("--loss-reps", type=int, default=d.loss_reps)
    s.add_argument("--seed", type=int, default=d.seed)
    s.add_argument("--out", type=Path, default=None, help="Markdown file to write the section to")
    s.add_argument("--note", default=None, help="a paragraph to append to the written section")


def main(args: argparse.Namespace, argv: list[str]) -> StepBenchReport:
    """Run ``python -m distnoisy.bench steps ...`` from its parsed ``args``; print the section,
    optionally write ``--out``."""
    methods = None
    if args.methods.strip() != "all":
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for name in ("batch", "image", "classes", "rounds", "steps", "loss_rounds", "loss_reps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        raise SystemExit("--warmup must be >= 0")
    if args.classes < 2:
        raise SystemExit("--classes must be >= 2")
    settings = StepBenchSettings(
        model=args.model,
        batch=args.batch,
        image=args.image,
        classes=args.classes,
        rounds=args.rounds,
        warmup=args.warmup,
        steps=args.steps,
        methods=methods,
        threads=args.threads,
        loss_rounds=args.loss_rounds,
        loss_reps=args.loss_reps,
        seed=args.seed,
    )
    report = run_step_bench(settings)
    command = "python -m distnoisy.bench " + shlex.join(_without_note(argv))
    print()
    section = format_section(report, command, args.note)
    print(section)
    for name, table in report.profiles.items():
        print(f"profile of the {name} loss (over the {LOSS_BUDGET:.0%} budget):\n{table}")
    if args.out is not None:
        write_section(args.out, section)
        print(f"wrote {SECTION_TITLE[3:]!r} to {args.out}")
    return report
