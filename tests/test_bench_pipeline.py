"""``python -m distnoisy.bench pipeline``: the process-tree memory it reports, its input checks,
and (slow) the whole job at 20,000 images end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from distnoisy.bench.proctree import run_command

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def test_run_command_sees_the_peak_of_a_grandchild(tmp_path):
    """A grandchild that touches 300 MB for a moment, then frees it, is the command's largest
    process (its high-water mark, exact between samples); output lines keep their order and
    times, and a window before it started does not include it."""
    script = textwrap.dedent(
        """
        import subprocess, sys, time
        print("parent up", flush=True)
        child = (
            "import time; print('child up', flush=True); b = bytearray(300 << 20); "
            "b[::4096] = b'x' * len(b[::4096]); del b; time.sleep(1.0); print('child done')"
        )
        subprocess.run([sys.executable, "-c", child], check=True)
        """
    )
    record = run_command([sys.executable, "-c", script], tmp_path, tmp_path / "log.txt")
    assert record.returncode == 0
    mb, name = record.peak()
    assert 300 <= mb < 400, mb
    assert "bytearray" in name
    texts = [line for _, line in record.lines]
    assert texts == ["parent up", "child up", "child done"]
    up = record.first_line("child up")
    assert up is not None and record.peak(record.start, up - 0.5)[0] < 300
    assert "child done" in (tmp_path / "log.txt").read_text()


def _bench(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "distnoisy.bench", "pipeline", *args],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_bad_input_is_one_line(tmp_path):
    (tmp_path / "old" / "run").mkdir(parents=True)
    done = _bench("--samples", "20000", "--out", str(tmp_path / "old"), cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"distnoisy: error: --out {tmp_path / 'old'} already holds run from an earlier run; "
        "give a new directory (a generated source/ folder of the same size is reused), or "
        "--resume to keep its finished phases"
    ]
    small = _bench("--samples", "100", "--out", str(tmp_path / "new"), cwd=tmp_path)
    assert small.returncode == 2 and "--samples 100" in small.stderr
    assert "Traceback" not in small.stderr and not (tmp_path / "new").exists()


def _fashion_mnist_or_skip() -> None:
    from distnoisy.data import fashion_mnist

    try:
        fashion_mnist.find_files(fashion_mnist.DEFAULT_SOURCE)
    except Exception:
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


#: Training images of the slow test's job, and its epochs: the 20,000-image job of
#: docs/benchmarks.md (label-issue AUROC 0.83 measured after 1 epoch).
N = 20000
EPOCHS = 1


@pytest.mark.slow
def test_pipeline_end_to_end(tmp_path):
    """The whole job as a user runs it; every phase measured, every output checked."""
    _fashion_mnist_or_skip()
    out = tmp_path / "job"
    t0 = time.monotonic()
    argv = ["pipeline", "--samples", str(N), "--epochs", str(EPOCHS), "--out", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "distnoisy.bench", *argv],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=3600,
    )
    wall = time.monotonic() - t0
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "pipeline.json").read_text())
    assert report["complete"] and report["samples"] == N
    assert report["machine"]["cpu_count"] and report["machine"]["memory_gb"] > 0
    phases = report["phases"]
    assert list(phases) == ["convert", "train", "label_issues", "posttrain", "analyze"]
    # The phases run one after another inside the command: their wall times add up to less
    # than the command's, and each rate is the samples over that phase's wall time (and CPU time,
    # which the report rounds to 0.1 s).
    assert 0 < sum(p["wall_s"] for p in phases.values()) <= wall
    for name, p in phases.items():
        # rounding: the rate to 0.1, the wall time to 0.01 s (N * 0.005 / wall^2 in the rate)
        slack = 0.05 + N * 0.005 / p["wall_s"] ** 2 + 1e-6
        assert p["samples_per_s"] == pytest.approx(N / p["wall_s"], abs=slack), name
        assert p["cpu_us_per_sample"] == pytest.approx(1e6 * p["cpu_s"] / N, abs=5e4 / N + 0.1), (
            name
        )
        assert p["cpu_s"] > 0, name  # every phase's tree was seen working
        assert p["peak_rss_mb"] > 50 and p["peak_process"], name
        assert p["disk_mb"] > 0, name
        assert len(p["load_avg_start"]) == 3, name
    # Ray's workers are in the sampled tree: the training ranks are among its processes.
    assert any(name.startswith("ray::") for name, _ in phases["train"]["processes"])
    assert phases["train"]["commands"][0].startswith("python -m distnoisy.train data.name=shards")
    checks = report["checks"]
    issues = checks["label_issues"]
    assert issues["rows"] == N and issues["every_sample_once"]
    assert issues["given_labels_match_noise_file"]
    assert 0.3 < issues["noisy"] / N < 0.5  # 40% symmetric noise, realised
    assert issues["auroc"] > 0.7  # 0.83 measured: 1 epoch of ELR on 20,000 images
    assert issues["auroc"] == pytest.approx(issues["run_summary_auroc"], abs=1e-3)
    post = checks["posttrain"]
    # Round 1's removals (tried whatever the stopping rule keeps) are mostly noise: 87% at
    # 20,000 and 95-96% at 100,000 and 1,000,000 measured, against a noise rate of 40%.
    assert post["rounds"][1]["round"] == 1 and post["rounds"][1]["precision_removed"] > 0.6
    # Something is removed exactly when a removal round is kept, and the check's precision of
    # the kept removals (read by index from the noise file) is the run's own.
    assert (post["removed"] > 0) == (post["best_round"] >= 1)
    if post["removed"]:
        assert post["precision_removed"] == pytest.approx(
            post["summary_precision_removed"], abs=1e-4
        )
    assert checks["analysis"]["buckets_cover_training_set"]
    assert len(checks["analysis"]["table"]) == 5
    for path in ("run/label_issues/index.json", "run/sample_stats/index.json", "mlflow.db"):
        assert (out / path).exists(), path
    assert not (out / "source" / "train").exists()  # deleted once converted
