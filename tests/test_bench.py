"""Smoke test of ``python -m distnoisy.bench steps`` on a tiny model (no timing assertions)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from distnoisy.bench.cli import main
from distnoisy.bench.common import DOC_HEADER
from distnoisy.bench.steps import (
    SECTION_TITLE,
    StepBenchSettings,
    default_transition,
    run_step_bench,
    write_section,
)

TINY = [
    "steps",
    "--model",
    "small_cnn",
    "--image",
    "8",
    "--classes",
    "10",
    "--batch",
    "16",
    "--rounds",
    "2",
    "--steps",
    "1",
    "--warmup",
    "1",
    "--loss-rounds",
    "2",
    "--loss-reps",
    "5",
    "--threads",
    "1",
]


def test_default_transition_is_row_stochastic() -> None:
    t = np.asarray(default_transition(10))
    assert t.shape == (10, 10)
    np.testing.assert_allclose(t.sum(axis=1), 1.0)
    np.testing.assert_allclose(np.diag(t), 0.6)
    assert (t > 0).all()


def test_steps_writes_section_and_keeps_others(tmp_path: Path, capsys) -> None:
    out = tmp_path / "benchmarks.md"
    out.write_text(
        "# bench\n\n## Store flush cost\n\nkeep me\n\n"
        f"{SECTION_TITLE}\n\nstale table\n\n## Data loading\n\nkeep me too\n"
    )
    note = "Measured while nothing else ran."
    argv = [*TINY, "--methods", "ce,elr,not_a_method", "--out", str(out), "--note", note]
    report = main(argv)

    assert list(report.methods) == ["ce", "elr"]  # CE first, then the requested ones
    assert "not_a_method" in report.skipped
    ce = report.methods["ce"]
    ce_rounds = np.asarray(ce.rounds_ms)
    for t in report.methods.values():
        rounds = np.asarray(t.rounds_ms)
        assert len(rounds) == 2
        # The figures are the rounds' statistics ...
        assert t.step_ms == pytest.approx(np.median(rounds))
        assert (t.step_min_ms, t.step_max_ms) == (rounds.min(), rounds.max())
        assert t.ratio == pytest.approx(t.step_ms / ce.step_ms)
        # ... and, with 2 rounds, the bootstrap's resamples are rounds (0, 0), (1, 1) and the
        # pooled (0, 1): its 95% interval spans exactly the two per-round ratios.
        per_round = rounds / ce_rounds
        if t.name != "ce":
            assert t.ratio_lo == pytest.approx(per_round.min())
            assert t.ratio_hi == pytest.approx(per_round.max())
        assert t.loss_extra_us == pytest.approx(t.loss_us - ce.loss_us)
        assert t.loss_extra_p10_us == pytest.approx(t.loss_p10_us - ce.loss_p10_us)
        assert t.loss_extra_frac == pytest.approx(t.loss_extra_us / (ce.step_ms * 1e3))
        # A step runs the loss and its backward too, and the model's forward and backward.
        assert t.step_min_ms * 1e3 > t.loss_p10_us
    assert (ce.ratio, ce.ratio_lo, ce.ratio_hi, ce.loss_extra_us) == (1.0, 1.0, 1.0, 0.0)
    assert report.machine["torch_threads"] == "1"

    text = out.read_text()
    assert "stale table" not in text
    assert text.count(SECTION_TITLE) == 1
    assert "keep me\n" in text and "## Data loading\n\nkeep me too\n" in text
    assert text.index("## Store flush cost") < text.index(SECTION_TITLE)
    assert text.index(SECTION_TITLE) < text.index("## Data loading")
    section = text[text.index(SECTION_TITLE) : text.index("## Data loading")]
    for t in report.methods.values():  # the table shows the report's numbers
        assert f"| {t.name} | {t.step_ms:.1f} | {t.step_min_ms:.1f}–{t.step_max_ms:.1f} " in section
        assert f"| {t.ratio:.3f} " in section and f"| {t.loss_extra_us:+.1f} (" in section
    assert "python -m distnoisy.bench steps --model small_cnn" in section
    assert "torch " in section and "logical CPUs" in section
    assert section.rstrip().endswith(note) and "--note" not in section
    assert "| ce |" in capsys.readouterr().out


def test_write_section_creates_file_and_replaces_in_place(tmp_path: Path) -> None:
    out = tmp_path / "docs" / "benchmarks.md"
    write_section(out, f"{SECTION_TITLE}\n\nfirst\n")
    assert out.read_text().startswith(DOC_HEADER)
    with out.open("a") as f:
        f.write("\n## Later section\n\nstays\n")
    write_section(out, f"{SECTION_TITLE}\n\nsecond\n")
    text = out.read_text()
    assert "first" not in text and "second" in text
    assert text.endswith("## Later section\n\nstays\n")
    assert text.count(SECTION_TITLE) == 1


def test_all_registered_methods_build_or_are_skipped_with_a_reason() -> None:
    from distnoisy.methods import METHODS

    report = run_step_bench(
        StepBenchSettings(
            model="small_cnn",
            batch=8,
            image=4,
            classes=3,
            rounds=1,
            warmup=0,
            steps=1,
            threads=1,
            loss_rounds=1,
            loss_reps=2,
        ),
        log=lambda _: None,
        profile_over_budget=False,
    )
    assert set(report.methods) | set(report.skipped) == set(METHODS.names())
    assert all(report.skipped.values())


def test_bad_option_is_rejected() -> None:
    with pytest.raises(SystemExit):
        main([*TINY, "--rounds", "0"])


def test_thread_count_is_restored() -> None:
    import torch

    before = torch.get_num_threads()
    settings = StepBenchSettings(
        model="small_cnn",
        batch=4,
        image=4,
        classes=3,
        rounds=1,
        warmup=0,
        steps=1,
        methods=["ce"],
        threads=1 if before != 1 else 2,
        loss_rounds=1,
        loss_reps=1,
    )
    report = run_step_bench(settings, log=lambda _: None)
    assert report.machine["torch_threads"] == str(settings.threads)
    assert torch.get_num_threads() == before


def test_two_networks_bench_times_elr_plus_and_limit_against_two_ce(tmp_path: Path) -> None:
    from distnoisy.bench.two_networks import SECTION_TITLE as TWO_TITLE
    from distnoisy.bench.two_networks import SUBJECTS

    out = tmp_path / "benchmarks.md"
    out.write_text(f"{DOC_HEADER}\n## Other section\n\nkeep me\n")
    argv = [
        "two-networks",
        *("--model", "small_cnn", "--image", "8", "--batch", "16", "--rounds", "2"),
        *("--steps", "2", "--threads", "1", "--out", str(out), "--note", "tiny run"),
    ]
    report = main(argv)
    assert set(report.rounds_ms) == set(SUBJECTS)
    assert all(len(v) == 2 for v in report.rounds_ms.values())
    two_ce = np.asarray(report.rounds_ms["2x ce"])
    for name in ("elr_plus", "limit"):
        # With 2 rounds: the median of the per-round ratios is their mean, and the bootstrap's
        # resampled medians are the two ratios and their mean, so its interval spans them.
        per_round = np.asarray(report.rounds_ms[name]) / two_ce
        med, lo, hi = report.ratios[name]
        assert med == pytest.approx(per_round.mean())
        assert (lo, hi) == pytest.approx((per_round.min(), per_round.max()))
    # A LIMIT step does the work of two networks' CE steps (forward and backward of each),
    # an ELR+ iteration that and two more no-grad forwards: neither can be free.
    assert report.ratios["limit"][0] > 0.3 and report.ratios["elr_plus"][0] > 0.5
    text = out.read_text()
    for name, (med, lo, hi) in report.ratios.items():  # the table shows the report's numbers
        assert f"| {name} | {med:.3f} [{lo:.3f}, {hi:.3f}] |" in text
    assert "keep me" in text and f"## {TWO_TITLE}" in text and "tiny run" in text
    assert "--note" not in text.split(f"## {TWO_TITLE}")[1].split("\n")[2]


def test_loader_bench_measures_both_pipelines_and_writes_its_section(tmp_path: Path) -> None:
    from distnoisy.bench.loader import SECTION

    out = tmp_path / "benchmarks.md"
    out.write_text(f"# bench\n\n{SECTION_TITLE}\n\nkeep me\n")
    argv = ["loader", "--images", "32", "--batch", "8", "--repeats", "2", "--workers", "0"]
    report = main([*argv, "--out", str(out), "--note", "a note"])
    assert len(report.shards_ips) == len(report.folder_ips) == 2
    # An epoch that read no image would count 0 images/s.
    assert min(report.shards_ips) > 0 and min(report.folder_ips) > 0 and report.cores == 1
    text = out.read_text()
    assert "keep me" in text and f"## {SECTION}" in text and "--note" not in text
    assert f"Ratio shards / ImageFolder: {report.ratio:.2f}**" in text
    assert f"**{report.convert_ips:.0f} images/s**" in text
    assert text.rstrip().endswith("a note")


def test_loader_bench_feeds_both_pipelines_the_same_images(tmp_path: Path) -> None:
    # The comparison is fair only if ImageFolder reads the very JPEG bytes the shards hold.
    import tarfile

    from distnoisy.bench.loader import run_loader_bench
    from distnoisy.data.shards import read_labels, read_manifest

    run_loader_bench(images=20, workers=0, batch=4, repeats=1, work_dir=tmp_path)
    m = read_manifest(tmp_path / "shards" / "train")
    labels, _, keys = read_labels(m)
    in_shards = {}
    for url in m.urls:
        with tarfile.open(url) as tf:
            for member in tf.getmembers():
                if member.name.endswith(".jpg"):
                    i = int(member.name.split(".", 1)[0])
                    name = f"{m.classes[labels[i]]}/{Path(keys[i]).name}"
                    in_shards[name] = tf.extractfile(member).read()
    folder = {
        str(p.relative_to(tmp_path / "folder")): p.read_bytes()
        for p in (tmp_path / "folder").rglob("*.jpg")
    }
    assert len(in_shards) == 20 and folder == in_shards
    # ... resized to a shorter side of 256 px by the converter (the originals are 320-480 px).
    from PIL import Image

    for data in folder.values():
        assert min(Image.open(io.BytesIO(data)).size) == 256


def test_store_bench_checkpoint_part_restores_both_layouts_exactly(tmp_path: Path) -> None:
    from distnoisy.bench import store as store_bench

    settings = store_bench.StoreBenchSettings(ckpt_n=5_000, ckpt_classes=7, ckpt_workers=2)
    report = store_bench.run(settings, ("checkpoint",))
    assert set(report.ckpt) == {"gathered", "parts"}
    for mode, ranks in report.ckpt.items():
        assert [p["rows"] for p in ranks] == [2_500, 2_500], mode
        assert all(p["exact"] for p in ranks), mode
    text = store_bench.render(report, "cmd")[store_bench.CKPT_SECTION]
    assert "| parts |" in text and "| gathered |" in text and "NO" not in text
