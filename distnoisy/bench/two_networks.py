"""Step time of the two-network methods (ELR+, LIMIT) against two CE steps, in one run.

``python -m distnoisy.bench two-networks`` times, on the same model, batch and CPU threads:

- ``2x ce``: one CE step of each of two networks (what any two-network method must pay);
- ``elr_plus``: one step of ``net1`` then one of ``net2`` (an ELR+ iteration: each step also
  runs the other network's EMA copy forward on the un-mixed batch, mixes the batch, updates the
  targets and the EMA weights);
- ``limit``: one LIMIT step (classifier and q-network forward/backward, one optimizer step);
- ``2x ce joint``: two networks in one joint CE step (both forwards, one backward, one
  optimizer: LIMIT's shape, with twice the live activations of one CE step);
- ``ema forward``: one no-grad forward of one network in train mode (ELR+'s target pass),
  to split ELR+'s cost into its network passes and the rest.

Every step is :func:`distnoisy.engine.step.train_step`, exactly what the trainer runs (per-sample
bookkeeping and ``store.flush()`` included). The subjects are interleaved in a fresh shuffled
order every round and each ratio is the median over rounds of the per-round ratio, with a
bootstrap interval, so machine noise hits numerator and denominator alike.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import gc
import os
import random
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from distnoisy.bench.common import DOC_HEADER, _without_note, machine_info
from distnoisy.config import load_config
from distnoisy.core import result_docs as reporting
from distnoisy.engine.step import declare_run_fields, train_step
from distnoisy.methods import METHODS
from distnoisy.methods.base import StepInput
from distnoisy.models import build_model
from distnoisy.store import SampleStore

SECTION_TITLE = "Two-network methods: step time relative to two CE steps"
#: Budget of ISSUE 4: what a method adds beyond its networks' passes, as a fraction of 2x CE.
OVERHEAD_BUDGET = 0.10
SUBJECTS = ("2x ce", "2x ce joint", "elr_plus", "limit", "ema forward")
SUBJECTS_EMA = "elr_plus's two EMA forwards"


@dataclass
class TwoNetworkSettings:
    model: str = "cifar_resnet18"
    batch: int = 128
    image: int = 32
    classes: int = 10
    rounds: int = 8
    warmup: int = 1
    steps: int = 1
    threads: int | None = None
    seed: int = 0


@dataclass
class TwoNetworkReport:
    settings: TwoNetworkSettings
    rounds_ms: dict[str, list[float]]
    ratios: dict[str, tuple[float, float, float]]  # name -> (median, lo, hi)
    machine: dict[str, str]
    date: str
    wall_s: float
    load: tuple[float, float] = (float("nan"), float("nan"))
    notes: list[str] = field(default_factory=list)

    def median_ms(self, name: str) -> float:
        return float(np.median(self.rounds_ms[name]))


class _Runner:
    """A method, its networks, optimizers and store, reset to the same state every turn."""

    def __init__(self, name: str, settings: TwoNetworkSettings, num_samples: int) -> None:
        s = settings
        cfg = load_config([f"method.name={name}"])
        self.method = METHODS.get(name)(
            cfg.method, num_samples=num_samples, num_classes=s.classes, epochs=1, seed=s.seed
        )
        torch.manual_seed(s.seed)
        self.nets = self.method.build_networks(
            lambda name=None, weights=None: build_model(name or s.model, s.classes, 3)
        )
        self.method.setup(self.nets, torch.device("cpu"))
        self.opts = self.method.build_optimizers(
            self.nets, lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9)
        )
        self.store = SampleStore(num_samples)
        declare_run_fields(self.store, 1, s.classes)
        self.method.attach(self.store)
        self.initial = copy.deepcopy(
            ({k: n.state_dict() for k, n in self.nets.items()}, self.method.state_dict())
        )

    def reset(self) -> None:
        nets, method_state = self.initial
        for k, n in self.nets.items():
            n.load_state_dict(nets[k])
        if method_state:
            self.method.load_state_dict(method_state)
        for opt in self.opts.values():
            opt.state.clear()

    def iteration(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, k: int) -> None:
        for phase in self.method.phases():
            batch = StepInput(x, y, index, epoch=0, step=k, steps_per_epoch=1000, phase=phase)
            train_step(self.method, self.nets, self.opts, self.store, batch)


def _bootstrap(
    values: np.ndarray, rng: np.random.Generator, reps: int = 2000
) -> tuple[float, float]:
    idx = rng.integers(0, len(values), size=(reps, len(values)))
    medians = np.median(values[idx], axis=1)
    return float(np.percentile(medians, 2.5)), float(np.percentile(medians, 97.5))


def run_two_network_bench(settings: TwoNetworkSettings, log: Any = print) -> TwoNetworkReport:
    """Time the subjects of the module docstring; see :class:`TwoNetworkReport`."""
    previous = torch.get_num_threads()
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    t_start, load_start = time.perf_counter(), os.getloadavg()[0]
    try:
        with torch.random.fork_rng():
            run, reset = _subjects(settings)
            rounds = _timed_rounds(settings, run, reset, log)
    finally:
        torch.set_num_threads(previous)
    return TwoNetworkReport(
        settings=settings,
        rounds_ms=rounds,
        ratios=_ratios(rounds, np.random.default_rng(settings.seed)),
        machine=machine_info(),
        date=dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
        wall_s=time.perf_counter() - t_start,
        load=(load_start, os.getloadavg()[0]),
    )


def _subjects(s: TwoNetworkSettings) -> tuple[Callable[[str, int], None], Callable[[str], None]]:
    """``(run(name, k), reset(name))`` over the :data:`SUBJECTS`, on one fixed random batch."""
    torch.manual_seed(s.seed)
    x = torch.randn(s.batch, 3, s.image, s.image)
    y = torch.randint(0, s.classes, (s.batch,))
    index = torch.arange(s.batch)
    ce_a, ce_b = (_Runner("ce", s, s.batch) for _ in range(2))
    ce_b.reset()
    runners = {
        "elr_plus": _Runner("elr_plus", s, s.batch),
        "limit": _Runner("limit", s, s.batch),
    }
    ema_net = runners["elr_plus"].method.ema["net2"]
    # Two networks trained in one joint step (both forwards, one backward, one
    # optimizer), the shape of LIMIT's step: isolates what LIMIT adds to that.
    torch.manual_seed(s.seed)
    joint = [build_model(s.model, s.classes, 3) for _ in range(2)]
    joint_init = copy.deepcopy([m.state_dict() for m in joint])
    joint_opt = torch.optim.SGD([p for m in joint for p in m.parameters()], lr=0.01, momentum=0.9)

    def joint_step() -> None:
        loss = sum(F.cross_entropy(m(x), y) for m in joint)
        joint_opt.zero_grad(set_to_none=True)
        loss.backward()
        joint_opt.step()

    def run(name: str, k: int) -> None:
        if name == "2x ce":
            ce_a.iteration(x, y, index, k)
            ce_b.iteration(x, y, index, k)
        elif name == "2x ce joint":
            joint_step()
        elif name == "ema forward":
            with torch.no_grad():
                ema_net(x)
        else:
            runners[name].iteration(x, y, index, k)

    def reset(name: str) -> None:
        if name == "2x ce":
            ce_a.reset()
            ce_b.reset()
        elif name == "2x ce joint":
            for m, sd in zip(joint, joint_init, strict=True):
                m.load_state_dict(sd)
            joint_opt.state.clear()
        elif name in runners:
            runners[name].reset()

    return run, reset


def _timed_rounds(
    s: TwoNetworkSettings,
    run: Callable[[str, int], None],
    reset: Callable[[str], None],
    log: Any,
) -> dict[str, list[float]]:
    """Per subject, the mean step time (ms) of each round; a fresh shuffled order each round."""
    for name in SUBJECTS:
        reset(name)
        for k in range(s.warmup):
            run(name, k)
    order_rng = random.Random(s.seed)
    rounds: dict[str, list[float]] = {n: [] for n in SUBJECTS}
    for r in range(s.rounds):
        order = list(SUBJECTS)
        order_rng.shuffle(order)
        for name in order:
            reset(name)
            # One untimed iteration first: the timed ones then see this subject's own
            # steady state (memory allocator included), as in training, where the same
            # method steps again and again. Holding two networks' activations at once
            # (LIMIT) changes how much memory each step faults in on a CPU.
            run(name, r * (s.steps + 1))
            gc.collect()
            gc.disable()
            try:
                t0 = time.perf_counter_ns()
                for k in range(s.steps):
                    run(name, r * (s.steps + 1) + 1 + k)
                rounds[name].append((time.perf_counter_ns() - t0) / 1e6 / s.steps)
            finally:
                gc.enable()
        log(
            f"round {r + 1}/{s.rounds}: "
            + ", ".join(f"{n} {rounds[n][-1]:.0f}" for n in SUBJECTS)
            + " ms"
        )
    return rounds


def _ratios(
    rounds: dict[str, list[float]], rng: np.random.Generator
) -> dict[str, tuple[float, float, float]]:
    """(median, 95% bootstrap interval) of each reported ratio over rounds."""
    two_ce = np.asarray(rounds["2x ce"])
    ratios: dict[str, tuple[float, float, float]] = {}
    for name in ("elr_plus", "limit"):
        per_round = np.asarray(rounds[name]) / two_ce
        ratios[name] = (float(np.median(per_round)), *_bootstrap(per_round, rng))
    # ELR+ beyond its network passes: minus two CE steps and two EMA forwards, over 2x CE.
    beyond = (
        np.asarray(rounds["elr_plus"]) - two_ce - 2 * np.asarray(rounds["ema forward"])
    ) / two_ce
    ratios["elr_plus beyond its network passes"] = (
        float(np.median(beyond)),
        *_bootstrap(beyond, rng),
    )
    over_joint = np.asarray(rounds["limit"]) / np.asarray(rounds["2x ce joint"])
    ratios["limit / 2x ce joint"] = (float(np.median(over_joint)), *_bootstrap(over_joint, rng))
    ema = np.asarray(rounds["ema forward"]) * 2 / two_ce
    ratios[SUBJECTS_EMA] = (float(np.median(ema)), *_bootstrap(ema, rng))
    return ratios


def format_section(report: TwoNetworkReport, command: str, note: str | None = None) -> str:
    s, m = report.settings, report.machine
    r = report.ratios
    lines = [
        f"Command: `{command}`",
        "",
        f"Machine: {m['platform']}; CPU {m['cpu']} ({m['cpu_count']} logical CPUs); "
        f"Python {m['python']}; torch {m['torch']} with {m['torch_threads']} threads. "
        f"Date: {report.date} (wall time {report.wall_s:.0f} s; 1-minute load average "
        f"{report.load[0]:.1f} at the start, {report.load[1]:.1f} at the end).",
        "",
        f"Model `{s.model}`, one fixed random batch of {s.batch} {s.image}x{s.image} images, "
        f"C={s.classes}, SGD with momentum, CPU; every step is `distnoisy.engine.step.train_step`. "
        f"{s.rounds} rounds of {s.steps} timed iteration(s) per subject (each turn after one "
        f"untimed iteration) after {s.warmup} warm-up iteration(s), subjects interleaved in a "
        "shuffled order each round; ratios are medians over rounds of the per-round ratio, with "
        "95% bootstrap intervals.",
        "",
        "| subject | median ms per iteration | round min–max (ms) |",
        "|---|---:|---:|",
    ]
    for name in SUBJECTS:
        v = report.rounds_ms[name]
        lines.append(f"| {name} | {np.median(v):.0f} | {min(v):.0f}–{max(v):.0f} |")
    lines += ["", "| ratio to 2x CE | median [95% CI] |", "|---|---:|"]
    for name, (med, lo, hi) in r.items():
        lines.append(f"| {name} | {med:.3f} [{lo:.3f}, {hi:.3f}] |")
    limit_over = r["limit"][0] - 1.0
    limit_joint = r["limit / 2x ce joint"][0] - 1.0
    beyond = r["elr_plus beyond its network passes"][0]
    lines += [
        "",
        f"LIMIT costs {limit_over:+.1%} over two CE steps and {limit_joint:+.1%} over one "
        f"joint CE step of two networks (its own shape: both forwards, one backward; budget "
        f"+{OVERHEAD_BUDGET:.0%}): {'within' if limit_joint <= OVERHEAD_BUDGET else 'OVER'} "
        "budget. ELR+ costs "
        f"{r['elr_plus'][0] - 1:+.1%} over two CE steps, of which its algorithm's two no-grad "
        "EMA forward passes (docs/methods.md#elr-two-networks: each network's targets come "
        f"from the other network's EMA copy on the un-mixed batch) are {r[SUBJECTS_EMA][0]:.1%}; "
        "everything "
        f"else it adds (mixup and its pairing, target updates, EMA weight updates, store) is "
        f"{beyond:+.1%} (budget +{OVERHEAD_BUDGET:.0%}): "
        f"{'within' if beyond <= OVERHEAD_BUDGET else 'OVER'} budget.",
    ]
    if note:
        lines += ["", note.strip()]
    return "\n".join(lines) + "\n"


def add_parser(sub: Any) -> None:
    p = sub.add_parser("two-networks", help="ELR+ and LIMIT step time relative to 2x CE (CPU)")
    d = TwoNetworkSettings()
    p.add_argument("--model", default=d.model)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--image", type=int, default=d.image)
    p.add_argument("--classes", type=int, default=d.classes)
    p.add_argument("--rounds", type=int, default=d.rounds)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--steps", type=int, default=d.steps, help="timed iterations per turn")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", type=Path, default=None, help="Markdown file to write the section to")
    p.add_argument("--note", default=None, help="a paragraph to append to the written section")


def main(args: argparse.Namespace, argv: list[str]) -> TwoNetworkReport:
    for name in ("batch", "image", "rounds", "steps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be >= 1")
    settings = TwoNetworkSettings(
        model=args.model,
        batch=args.batch,
        image=args.image,
        classes=args.classes,
        rounds=args.rounds,
        warmup=args.warmup,
        steps=args.steps,
        threads=args.threads,
        seed=args.seed,
    )
    report = run_two_network_bench(settings)
    kept = _without_note(argv)
    section = format_section(report, "python -m distnoisy.bench " + shlex.join(kept), args.note)
    print(section)
    if args.out is not None:
        reporting.write_section(args.out, SECTION_TITLE, section, header=DOC_HEADER)
        print(f"wrote {SECTION_TITLE!r} to {args.out}")
    return report
