"""The post-training experiment: the grid's non-blocking reuse, the page's verdicts, and one
real grid run end to end (trained, post-trained in every variant, cleanlab's recipe, reused)."""

from __future__ import annotations

import fcntl
import json
from argparse import Namespace

import pytest

from distnoisy.driver import grid
from distnoisy.posttrain import experiment_page as page


def test_a_run_another_command_trains_is_left_for_later(tmp_path):
    out = grid.run_dir(tmp_path, "digits", "symmetric", "ce", 0)
    out.parent.mkdir(parents=True)
    with open(out.parent / f".{out.name}.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as another command training it holds it
        assert grid.train_or_reuse(tmp_path, "digits", "symmetric", "ce", 0, wait=False) is None
    assert not out.exists() and not grid.is_finished(tmp_path, "digits", "symmetric", "ce", 0)
    out.mkdir()
    (out / "summary.json").write_text("{}")  # finished: found, not trained
    assert grid.train_or_reuse(tmp_path, "digits", "symmetric", "ce", 0, wait=False) == out
    assert grid.is_finished(tmp_path, "digits", "symmetric", "ce", 0)


def _result(final, early, head, tuned, peer):
    def pt(acc):
        return {
            "test_acc": acc,
            "removed_fraction": 0.3,
            "precision_removed": 0.9,
            "recall_removed": 0.7,
            "best_round": 3,
            "removed": 10,
            "test_acc_finetuned": tuned,
            "auroc": 0.9,
        }

    return {
        "run": {"test_acc": final, "test_acc_at_best_val": early},
        "default": pt(head),
        # cleanlab removes more: less precise, higher recall.
        "cleanlab": {
            **pt(peer),
            "test_acc_finetuned": None,
            "precision_removed": 0.8,
            "recall_removed": 0.85,
        },
    }


def test_the_bars_verdicts_follow_the_numbers():
    results = {
        # CE gains 1.5 points head only (met), 0.5 fine-tuned (not met) under symmetric noise.
        ("fashion_mnist", "symmetric", "ce", 0): _result(0.60, 0.80, 0.81, 0.80, 0.80),
        ("fashion_mnist", "symmetric", "ce", 1): _result(0.60, 0.80, 0.82, 0.81, 0.80),
        # ELR loses 1 point head only: the cost bar is missed there.
        ("fashion_mnist", "symmetric", "elr", 0): _result(0.82, 0.82, 0.81, 0.83, 0.83),
    }
    args = Namespace(datasets=["fashion_mnist"], noises=["symmetric"], methods=["ce", "elr"])
    grouped = page.groups(results)
    text = page.bars(grouped, page._order(grouped, args))
    assert "symmetric noise, head only: +1.5 points over the run's early stopping" in text
    assert "**met**" in text
    assert "fine-tuned: +0.5 points over the run's early stopping (bar: >= +1): **not met**" in text
    assert "head only: **missed for elr (Fashion-MNIST, symmetric: -1.0)**" in text
    assert "fine-tuned: **held everywhere**" in text
    assert "cleanlab's recipe on the same features: **1 of 2**" in text
    assert "precision at least as high in **2 of 2**, recall at least as high in **0 of 2**" in text
    assert "post-training removed nothing in **0 of 3** runs" in text
    table = page.main_table(grouped, page._order(grouped, args))
    assert "| ce | 60.0 ± 0.0 | 80.0 ± 0.0 | 81.5 ± 0.5 | +1.5 ± 0.5 |" in table


def test_methods_left_out_of_the_comparisons_get_the_default_post_training_only():
    from distnoisy.posttrain.experiment import main_parser, plan

    args = main_parser().parse_args(
        ["--datasets", "fashion_mnist", "--methods", "ce", "elr", "--compare-methods", "ce"]
    )
    names = {(j.method, j.seed): [v.name for v in j.variants] for j in plan(args)}
    assert names[("elr", 0)] == ["default"]
    assert names[("ce", 2)] == [
        "default",
        "final",
        "val_noisy",
        "influence",
        "self_influence",
        "loss_history",
    ]
    every = main_parser().parse_args(["--datasets", "digits", "--methods", "elr"])
    assert [v.name for v in plan(every)[0].variants] == ["default", "final", "val_noisy"]


@pytest.mark.slow
def test_the_experiment_trains_post_trains_and_reuses(tmp_path, digits_root):
    from distnoisy.posttrain.experiment import main

    root, out = tmp_path / "grid", tmp_path / "page.md"
    args = [
        f"--runs={root}",
        "--datasets",
        "digits",
        "--noises",
        "symmetric",
        "--methods",
        "ce",
        "--seeds",
        "0",
        "--finetune-epochs=1",
        f"--out={out}",
        "--train-override",
        f"data.root={digits_root}",
        "train.epochs=3",
    ]
    assert main(args) == 0
    run = grid.run_dir(root, "digits", "symmetric", "ce", 0)
    text = out.read_text()
    assert "## digits, 40% symmetric noise" in text and "## The bars" in text
    default = json.loads((run / "posttrain-default" / "summary.json").read_text())
    assert default["weights"] == "best" and default["selected_on"] == "val_acc"
    assert default["finetune"]["epochs"] == 1
    final = json.loads((run / "posttrain-final" / "summary.json").read_text())
    assert final["weights"] == "final"
    peer = json.loads((run / "posttrain-cleanlab" / "summary.json").read_text())
    assert peer["settings"]["mu"] == default["mu"] and peer["settings"]["weights"] == "best"
    perfect = json.loads((run / "posttrain-perfect" / "summary.json").read_text())
    assert perfect["settings"]["mu"] == default["mu"] and perfect["settings"]["weights"] == "best"
    assert perfect["precision_removed"] == 1.0 and perfect["recall_removed"] == 1.0
    assert perfect["removed_fraction"] == pytest.approx(0.4, abs=0.05)  # 40% symmetric noise
    assert f"{100 * perfect['test_acc']:.1f} ± 0.0 (" in text  # its column in the table
    stamps = {p: p.stat().st_mtime_ns for p in run.rglob("summary.json")}
    assert main(args) == 0  # everything reused: nothing trained or post-trained again
    assert {p: p.stat().st_mtime_ns for p in run.rglob("summary.json")} == stamps
    assert out.read_text().split("## The bars")[1] == text.split("## The bars")[1]
    # --reuse-only: the page from what is finished; gce's run is missing, not trained.
    again = [x for x in args if x != "ce"]
    again[again.index("--methods") + 1 : again.index("--methods") + 1] = ["ce", "gce"]
    assert main([*again, "--reuse-only"]) == 0
    assert not grid.run_dir(root, "digits", "symmetric", "gce", 0).exists()
    assert (
        "Not on this page (not finished when it was rendered): digits symmetric gce seed 0 "
        "(run not trained)." in out.read_text()
    )
    assert {p: p.stat().st_mtime_ns for p in run.rglob("summary.json")} == stamps
