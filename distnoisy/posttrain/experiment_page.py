"""docs/results/posttrain.md from the experiment's results (every figure computed here from
the runs' and post-trainings' summaries; the bars' verdicts too)."""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterable
from datetime import date
from typing import Any

import numpy as np

from distnoisy.posttrain.config import DEFAULT_SCORE

Results = dict[tuple[str, str, str, int], dict[str, Any]]
Getter = Callable[[dict[str, Any]], float | None]

#: Bars of the issue this page answers (in points of clean test accuracy).
CE_GAIN_BAR = 1.0
COST_BAR = -0.5

TITLES = {"fashion_mnist": "Fashion-MNIST", "digits": "digits"}


def _vals(rows: Iterable[dict[str, Any]], get: Getter) -> list[float]:
    out = []
    for r in rows:
        try:
            v = get(r)
        except (KeyError, TypeError):
            v = None
        if v is not None:
            out.append(float(v))
    return out


def pct(rows: list[dict[str, Any]], get: Getter) -> str:
    """Mean ± std over seeds, in percent."""
    v = _vals(rows, get)
    return f"{100 * np.mean(v):.1f} ± {100 * np.std(v):.1f}" if v else "-"


def points(rows: list[dict[str, Any]], get: Getter) -> str:
    """A signed difference in points, mean ± std over seeds."""
    v = _vals(rows, get)
    return f"{100 * np.mean(v):+.1f} ± {100 * np.std(v):.1f}" if v else "-"


def mean_points(rows: list[dict[str, Any]], get: Getter) -> float | None:
    v = _vals(rows, get)
    return 100 * float(np.mean(v)) if v else None


def early(r: dict[str, Any]) -> float:
    return r["run"]["test_acc_at_best_val"]


def head(r: dict[str, Any]) -> float:
    return r["default"]["test_acc"]


def tuned(r: dict[str, Any]) -> float:
    return r["default"]["test_acc_finetuned"]


def peer(r: dict[str, Any]) -> float:
    return r["cleanlab"]["test_acc"]


def perfect(r: dict[str, Any]) -> float:
    return r["perfect"]["test_acc"]


def groups(results: Results) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    """Results per (dataset, noise, method), seeds in order."""
    out: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for key in sorted(results, key=lambda k: k[3]):
        out.setdefault(key[:3], []).append(results[key])
    return out


def _order(grouped: dict[tuple[str, str, str], Any], args: Any) -> list[tuple[str, str, str]]:
    return [
        (d, n, m)
        for d in args.datasets
        for n in args.noises
        for m in args.methods
        if (d, n, m) in grouped
    ]


def main_table(grouped: dict, keys: list[tuple[str, str, str]]) -> str:
    """One row per method: the run, post-training head only and fine-tuned, cleanlab."""
    lines = [
        "| method | final | val-selected (early stopping) | post-trained, head only | "
        "vs early stopping | fine-tuned | vs early stopping | cleanlab's recipe | "
        "vs early stopping | removed: post-training (precision / recall) | "
        "removed: cleanlab (precision / recall) | perfect removal (vs early stopping) |",
        "|" + "---|" * 12,
    ]
    for key in keys:
        rows = grouped[key]
        lines.append(
            f"| {key[2]} | {pct(rows, lambda r: r['run']['test_acc'])} | {pct(rows, early)} | "
            f"{pct(rows, head)} | {points(rows, lambda r: head(r) - early(r))} | "
            f"{pct(rows, tuned)} | {points(rows, lambda r: tuned(r) - early(r))} | "
            f"{pct(rows, peer)} | {points(rows, lambda r: peer(r) - early(r))} | "
            f"{_removed(rows, 'default')} | {_removed(rows, 'cleanlab')} | "
            f"{_with_gain(rows, perfect)} |"
        )
    return "\n".join(lines) + "\n"


def _with_gain(rows: list[dict[str, Any]], get: Getter) -> str:
    """``mean ± std (+gain)``: the accuracy and its mean gain over early stopping."""
    gain = mean_points(rows, lambda r: get(r) - early(r))
    return "-" if gain is None else f"{pct(rows, get)} ({gain:+.1f})"


def _removed(rows: list[dict[str, Any]], name: str) -> str:
    frac = pct(rows, lambda r: r[name]["removed_fraction"])
    prec = pct(rows, lambda r: r[name]["precision_removed"])
    rec = pct(rows, lambda r: r[name]["recall_removed"])
    return f"{frac} ({prec} / {rec})"


def bars(grouped: dict, keys: list[tuple[str, str, str]]) -> str:
    """The issue's bars, each with its verdict from the numbers."""
    lines = []
    for key in keys:
        dataset, noise, method = key
        if method != "ce" or dataset != "fashion_mnist":
            continue
        rows = grouped[key]
        ceiling = mean_points(rows, lambda r: perfect(r) - early(r))
        for name, get in (("head only", head), ("fine-tuned", tuned)):
            gain = mean_points(rows, lambda r, g=get: g(r) - early(r))
            if gain is not None:
                verdict = "met" if gain >= CE_GAIN_BAR else "not met"
                lines.append(
                    f"- CE, Fashion-MNIST, {noise} noise, {name}: {gain:+.1f} points over the "
                    f"run's early stopping (bar: >= +{CE_GAIN_BAR:.0f}): **{verdict}**"
                    + (
                        f" (removing exactly the corrupted samples: {ceiling:+.1f})."
                        if ceiling is not None and name == "head only"
                        else "."
                    )
                )
    for name, get in (("head only", head), ("fine-tuned", tuned)):
        costly = []
        for key in keys:
            gain = mean_points(grouped[key], lambda r, g=get: g(r) - early(r))
            if gain is not None and gain < COST_BAR:
                costly.append(f"{key[2]} ({TITLES[key[0]]}, {key[1]}: {gain:+.1f})")
        verdict = "held everywhere" if not costly else "missed for " + ", ".join(costly)
        lines.append(
            f"- Never costs more than {-COST_BAR} points on average against early stopping, "
            f"{name}: **{verdict}**."
        )
    wins = [
        key
        for key in keys
        if (g := mean_points(grouped[key], lambda r: head(r) - peer(r))) is not None and g >= 0
    ]
    lines.append(
        f"- Post-training (head only) at least as accurate as cleanlab's recipe on the same "
        f"features: **{len(wins)} of {len(keys)}** settings (dataset x noise x method, mean "
        "over seeds)."
    )
    lines.append(removal_bar(grouped, keys))
    return "\n".join(lines) + "\n"


def removal_bar(grouped: dict, keys: list[tuple[str, str, str]]) -> str:
    """Precision and recall of the removed sets, post-training against cleanlab, over the
    seeds where both removed something (precision is undefined for an empty set)."""
    precise = recalled = compared = 0
    for key in keys:
        both = [
            r
            for r in grouped[key]
            if "cleanlab" in r and r["default"].get("removed") and r["cleanlab"].get("removed")
        ]
        if not both:
            continue
        compared += 1
        ours = _vals(both, lambda r: r["default"]["precision_removed"])
        theirs = _vals(both, lambda r: r["cleanlab"]["precision_removed"])
        precise += bool(ours and theirs and np.mean(ours) >= np.mean(theirs))
        ours = _vals(both, lambda r: r["default"]["recall_removed"])
        theirs = _vals(both, lambda r: r["cleanlab"]["recall_removed"])
        recalled += bool(ours and theirs and np.mean(ours) >= np.mean(theirs))
    empty = sum(1 for k in keys for r in grouped[k] if not r["default"].get("removed"))
    runs = sum(len(grouped[k]) for k in keys)
    return (
        f"- Removed set, post-training against cleanlab's recipe (settings where both removed "
        f"something, mean over those seeds): precision at least as high in **{precise} of "
        f"{compared}**, recall at least as high in **{recalled} of {compared}**; post-training "
        f"removed nothing in **{empty} of {runs}** runs (the rounds never beat the run's own "
        "head, or round 0, on the validation set)."
    )


def variant_table(
    grouped: dict, keys: list[tuple[str, str, str]], columns: list[tuple[str, str]], title: str
) -> str:
    """Head-only test accuracy of several variants side by side, against early stopping."""
    cols = [c for c in columns if any(c[0] in r for k in keys for r in grouped[k])]
    lines = [
        f"| {title} | val-selected | " + " | ".join(label for _, label in cols) + " |",
        "|" + "---|" * (2 + len(cols)),
    ]
    for key in keys:
        rows = grouped[key]
        cells = [pct(rows, lambda r, n=name: r[n]["test_acc"]) for name, _ in cols]
        label = f"{TITLES[key[0]]}, {key[1]}, {key[2]}"
        lines.append(f"| {label} | {pct(rows, early)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _variant_names(scores: list[str]) -> dict[str, str]:
    """The post-training variant that holds each score's results (the default's is "default")."""
    return {s: ("default" if s == DEFAULT_SCORE else s) for s in scores}


def score_table(grouped: dict, keys: list[tuple[str, str, str]], scores: list[str]) -> str:
    """Per score: head-only test accuracy and round 1's AUROC against the corrupted set."""
    name = _variant_names(scores)
    lines = [
        "| setting | " + " | ".join(f"{s}: test acc / round-1 AUROC" for s in scores) + " |",
        "|" + "---|" * (1 + len(scores)),
    ]
    for key in keys:
        rows = grouped[key]
        if not all(name[s] in rows[0] for s in scores):
            continue
        cells = []
        for s in scores:
            auc = _vals(rows, lambda r, n=name[s]: r[n]["auroc"])
            cells.append(
                f"{pct(rows, lambda r, n=name[s]: r[n]['test_acc'])} / {np.mean(auc):.3f}"
                if auc
                else "-"
            )
        lines.append(f"| {key[1]}, {key[2]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def score_ranking(grouped: dict, keys: list[tuple[str, str, str]], scores: list[str]) -> str:
    """Mean head-only test accuracy and AUROC of each score over every setting compared."""
    name = _variant_names(scores)
    used = [k for k in keys if all(name[s] in grouped[k][0] for s in scores)]
    if not used:
        return ""
    parts = []
    for s in scores:
        acc = [mean_points(grouped[k], lambda r, n=name[s]: r[n]["test_acc"]) for k in used]
        auc = [np.mean(_vals(grouped[k], lambda r, n=name[s]: r[n]["auroc"])) for k in used]
        parts.append(
            f"`{s}` {np.mean([a for a in acc if a is not None]):.2f}% / {np.mean(auc):.4f}"
        )
    return (
        f"Mean over the {len(used)} settings above (test accuracy / round-1 AUROC): "
        + ", ".join(parts)
        + ".\n"
    )


def per_seed(results: Results) -> str:
    lines = [
        "| dataset | noise | method | seed | final | val-selected | head only | kept round | "
        "removed | fine-tuned | fine-tune epoch | cleanlab | cleanlab removed |",
        "|" + "---|" * 13,
    ]

    def p(v: Any) -> str:
        return "-" if v is None else f"{100 * v:.1f}"

    for (dataset, noise, method, seed), r in sorted(results.items()):
        d, c = r["default"], r.get("cleanlab") or {}
        ft_epoch = (d.get("finetune") or {}).get("selected_epoch", "-")
        lines.append(
            f"| {TITLES[dataset]} | {noise} | {method} | {seed} | {p(r['run']['test_acc'])} | "
            f"{p(early(r))} | {p(d['test_acc'])} | {d['best_round']} | {d['removed']} | "
            f"{p(d.get('test_acc_finetuned'))} | {ft_epoch} | "
            f"{p(c.get('test_acc'))} | {c.get('removed', '-')} |"
        )
    return "\n".join(lines) + "\n"


def _missing(missing: dict[tuple[str, str, str, int], str]) -> str:
    if not missing:
        return ""
    items = ", ".join(
        f"{TITLES[d]} {n} {m} seed {s} ({why})" for (d, n, m, s), why in sorted(missing.items())
    )
    return f"Not on this page (not finished when it was rendered): {items}.\n"


def render(
    results: Results,
    args: Any,
    wall: float,
    command: str,
    missing: dict[tuple[str, str, str, int], str] | None = None,
) -> str:
    """The whole page; ``command`` made it, ``missing`` lists the runs it left out."""
    from distnoisy.posttrain.experiment_notes import NOTES, SETUP

    grouped = groups(results)
    keys = _order(grouped, args)
    again = command.replace(" --reuse-only", "")
    parts = [
        "# Post-training on real data: against early stopping, with every method, against "
        "cleanlab\n",
        f"Rendered by `OMP_NUM_THREADS=1 {command}` ({len(results)} runs, {wall / 60:.0f} min, "
        f"on {platform.machine()} / {platform.system()}, Python {platform.python_version()}, "
        f"{date.today().isoformat()}, on a 2-core machine shared with other jobs). "
        + (f"`{again}` trains and post-trains what is missing first. " if again != command else "")
        + "Grid runs found finished are reused, and post-trainings with the same config.\n",
        _missing(missing or {}),
        SETUP.format(finetune_epochs=args.finetune_epochs),
        "## The bars\n",
        bars(grouped, keys),
        NOTES,
    ]
    for dataset in args.datasets:
        for noise in args.noises:
            sub = [k for k in keys if k[:2] == (dataset, noise)]
            if sub:
                parts += [f"## {TITLES[dataset]}, 40% {noise} noise\n", main_table(grouped, sub)]
    parts += [
        "## Where post-training starts, and what it selects on\n",
        "Head-only post-training, mean ± std over seeds. *default*: features from the "
        "best-by-validation weights (`posttrain.weights=auto`), rounds selected on the "
        "validation labels the run's early stopping used (`posttrain.select_on=val`); "
        "*from final weights*: `posttrain.weights=final` (the old default); *on noisy "
        "validation labels*: `posttrain.select_on=val_noisy` (the validation labels corrupted "
        "like the training labels, the protocol of docs/posttrain.md's stopping rule).\n",
        variant_table(
            grouped,
            keys,
            [
                ("default", "default"),
                ("final", "from final weights"),
                ("val_noisy", "on noisy validation labels"),
            ],
            "setting",
        ),
    ]
    score_keys = [k for k in keys if k[0] == "fashion_mnist"]
    scores = list(args.scores)
    if score_keys and len(scores) > 1:
        parts += [
            "## Scores on Fashion-MNIST\n",
            "Head-only post-training with each `posttrain.score`, everything else default; "
            "round-1 AUROC: the first round's ranking of every training sample against the "
            "corrupted set (mean over seeds).\n",
            score_table(grouped, score_keys, scores),
            score_ranking(grouped, score_keys, scores),
        ]
    parts += ["## Per seed\n", per_seed(results)]
    return "\n".join(parts)
