"""``python -m distnoisy.analyze.experiment``: the runs and analysis behind
docs/results/instance_level.md, in one command.

For each ``--data`` set: one clean-label reference run (CE, ``noise.kind=none``), one run per
``--methods`` entry on the noisy labels, then the analysis (k-NN buckets in the reference's
features; on ``longtail`` also buckets by the true subpopulation size), written as the
``## <data>`` section of ``--out`` with the command that regenerates it. Example::

    python -m distnoisy.analyze.experiment --data longtail --methods ce ls forward peer elr dal \\
        --epochs 30 --out docs/results/instance_level.md

Every run is an ordinary ``distnoisy.train`` run (``scaling.launcher=local``, one worker).
"""

from __future__ import annotations

import argparse
import math
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from distnoisy.analyze.cli import analyse_tracked
from distnoisy.analyze.config import load_analyze_config
from distnoisy.analyze.pipeline import Analysis
from distnoisy.core.errors import DistnoisyError

#: Noise of each data set: instance-dependent (the paper's setting), 30% mean rate.
NOISE = ["noise.kind=instance", "noise.rate=0.3"]
PER_DATA = {"fashion_mnist": ["data.train_size=3000"]}


def _train(args: list[str]) -> None:
    from distnoisy.config import load_config
    from distnoisy.train import train

    out = Path(next(a for a in args if a.startswith("output_dir=")).split("=", 1)[1])
    if (out / "summary.json").is_file():  # re-running the script reuses finished runs
        return
    train(load_config(args))


def _runs(
    data: str, methods: list[str], epochs: int, root: Path, uri: str, extra: list[str]
) -> dict[str, Path]:
    common = [
        *extra,
        f"data.name={data}",
        f"train.epochs={epochs}",
        "scaling.launcher=local",
        "scaling.num_workers=1",
        f"tracking.uri={uri}",
        *PER_DATA.get(data, []),
    ]
    dirs = {"reference": root / "reference"}
    _train([*common, "method.name=ce", "noise.kind=none", f"output_dir={dirs['reference']}"])
    for m in methods:
        dirs[m] = root / m
        _train([*common, f"method.name={m}", *NOISE, f"output_dir={dirs[m]}"])
    return dirs


def _pct(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def _table(result: Analysis, key: str, title: str) -> list[str]:
    nb = len(result.edges) + 1
    head = ["bucket 0 (rarest)", *[f"{b}" for b in range(1, nb - 1)], f"{nb - 1} (most frequent)"]
    lines = [f"**{title}** (%)", "", "| method | " + " | ".join(head) + " |"]
    lines.append("|---|" + "---|" * nb)
    for label in result.labels:
        if key in ("excess_error", "memorized") and label == result.reference:
            continue
        lines.append(
            f"| {label} | " + " | ".join(_pct(r.get(key)) for r in result.rows[label]) + " |"
        )
    return [*lines, ""]


def _gains(result: Analysis) -> list[str]:
    """Accuracy of each treatment minus CE's, per bucket."""
    if "ce" not in result.rows:
        return []
    ce = result.rows["ce"]
    nb = len(result.edges) + 1
    lines = ["**Accuracy gain over CE** (percentage points)", ""]
    lines += ["| method | " + " | ".join(f"bucket {b}" for b in range(nb)) + " |"]
    lines.append("|---|" + "---|" * nb)
    for label in result.labels:
        if label in ("ce", result.reference):
            continue
        rows = result.rows[label]
        cells = [_pct(r["test_acc"] - c["test_acc"]) for r, c in zip(rows, ce, strict=True)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _claims(result: Analysis) -> list[str]:
    """The two predictions of the instance-level paper, computed: CE's excess error in the
    rarest vs the most frequent bucket, and where each treatment's gain over CE lands."""
    if "ce" not in result.rows or not result.reference:
        return []
    ce = result.rows["ce"]
    rare, freq = ce[0]["excess_error"], ce[-1]["excess_error"]
    ratio = (
        f"rarest / most frequent: {rare / freq:.1f}x"
        if freq > 0
        else "none at all in the most frequent bucket"
    )
    lines = [
        f"- CE's excess error from noise: {_pct(rare)}% in the rarest bucket, {_pct(freq)}% in "
        f"the most frequent ({ratio}).",
    ]
    for label in result.labels:
        if label in ("ce", result.reference):
            continue
        rows = result.rows[label]
        g_rare = rows[0]["test_acc"] - ce[0]["test_acc"]
        g_freq = rows[-1]["test_acc"] - ce[-1]["test_acc"]
        share = (
            f"excess error left: {_pct(rows[0]['excess_error'])}% in the rarest bucket, "
            f"{_pct(rows[-1]['excess_error'])}% in the most frequent"
        )
        lines.append(
            f"- {label}: gain over CE {_pct(g_rare)} points in the rarest bucket, "
            f"{_pct(g_freq)} in the most frequent; {share}."
        )
    return ["**The paper's predictions, measured**", "", *lines, ""]


def _counts(result: Analysis) -> str:
    rows = result.rows[result.labels[0]]
    parts = [f"{r['n_train']}/{r['n_test']}" for r in rows]
    return "training/test samples per bucket: " + ", ".join(parts)


def section(results: dict[str, Analysis], command: str, figure: str | None = None) -> str:
    lines = (
        [f"![accuracy, memorisation and excess error by bucket]({figure})", ""] if figure else []
    )
    for name, result in results.items():
        lines += [f"### Buckets by {name}", "", _counts(result), ""]
        lines += _table(result, "test_acc", "Clean test accuracy")
        lines += _table(result, "excess_error", "Excess test error from noise (reference - run)")
        lines += _table(result, "memorized", "Memorized (of corrupted training samples)")
        lines += _gains(result)
        lines += _claims(result)
    lines += [
        f"Regenerate with: `{command}`",
        f"Measured on {platform.machine()} / {platform.system()}, Python "
        f"{platform.python_version()}, {time.strftime('%Y-%m-%d')}.",
    ]
    return "\n".join(lines) + "\n"


def analyse_data(data: str, dirs: dict[str, Path], out: Path, uri: str) -> dict[str, Analysis]:
    runs = "[" + ",".join(str(p) for k, p in dirs.items() if k != "reference") + "]"
    base = [f"run={runs}", f"reference={dirs['reference']}", f"tracking.uri={uri}"]
    kinds = {"k-NN density (reference features)": ["analysis.frequency=knn"]}
    if data == "longtail":
        kinds["true subpopulation size"] = ["analysis.frequency=subpopulation"]
    results = {}
    for i, (name, extra) in enumerate(kinds.items()):
        cfg = load_analyze_config([*base, *extra, f"output_dir={out / f'analysis{i}'}"])
        results[name] = analyse_tracked(cfg)[0]
    return results


def main(argv: list[str] | None = None) -> int:
    from distnoisy.core.result_docs import write_section
    from distnoisy.driver.cli import setup_cli

    setup_cli()
    p = argparse.ArgumentParser(prog="python -m distnoisy.analyze.experiment", description=__doc__)
    p.add_argument("--data", nargs="+", default=["longtail"])
    p.add_argument("--methods", nargs="+", default=["ce", "ls", "forward", "peer", "elr", "dal"])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--runs", type=Path, default=Path("runs/instance_level"))
    p.add_argument("--out", type=Path, help="markdown page; each --data is its '## ' section")
    p.add_argument("--tag", default="", help="a variant's name: runs/<data>-<tag>, its own section")
    p.add_argument("overrides", nargs="*", help="key=value for every run (e.g. data.longtail.*)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    command = "python -m distnoisy.analyze.experiment " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    try:
        for data in args.data:
            name = f"{data}-{args.tag}" if args.tag else data
            # One MLflow store per data set: the data sets can be run by concurrent commands.
            (args.runs / name).mkdir(parents=True, exist_ok=True)
            uri = f"sqlite:///{(args.runs / name / 'mlflow.db').resolve()}"
            dirs = _runs(data, args.methods, args.epochs, args.runs / name, uri, args.overrides)
            results = analyse_data(data, dirs, args.runs / name, uri)
            figure = None
            if args.out:  # the k-NN analysis' plot beside the page
                figure = f"{args.out.stem}-{name}.png"
                args.out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(
                    args.runs / name / "analysis0" / "analysis.png", args.out.parent / figure
                )
            body = section(results, command, figure)
            print(body)
            if args.out:
                title = f"{data} ({' '.join(args.overrides)})" if args.overrides else data
                write_section(args.out, title, body, header="# Instance-level noise analysis\n")
    except DistnoisyError as e:
        print(f"distnoisy: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
