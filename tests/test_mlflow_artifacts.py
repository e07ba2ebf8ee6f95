"""What a finished run leaves in MLflow (a real SQLite store): the summary figures, tags, and
artifacts a person can look at in the UI, checked without a screenshot: the plot is a valid
PNG, the tables are well-formed HTML and Markdown whose thumbnails are the training images.
A resumed run logs each epoch once and its wall time covers every segment.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import tarfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from local_mlflow import sqlite_uri
from PIL import Image

from distnoisy.data.shards import read_manifest
from distnoisy.driver.review import THUMB_PX, TOP_ISSUES
from distnoisy.train import main

REPO = Path(__file__).resolve().parents[1]
VOID = {"meta", "img", "br", "hr", "input", "link"}


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


@pytest.fixture(scope="module")
def finished(digits_root, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("mlflow")
    uri = sqlite_uri(tmp)
    run = tmp / "run"
    argv = [
        f"data.root={digits_root}",
        f"output_dir={run}",
        "train.epochs=2",
        "scaling.launcher=local",
        "scaling.num_workers=1",
        f"tracking.uri={uri}",
        "tracking.tags.team=vision",
        "tracking.system_metrics=true",
    ]
    # MLflow samples every 10 s, longer than this whole run: the samples of the last,
    # partial interval must still be logged when the run ends.
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", raising=False)
        assert main(argv) == 0
    summary = json.loads((run / "summary.json").read_text())
    return {"uri": uri, "run": run, "summary": summary, "root": digits_root, "argv": argv}


def test_summary_figures_tags_and_experiment_kind(finished):
    client = _client(finished["uri"])
    run = client.get_run(finished["summary"]["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    metrics, summary = run.data.metrics, finished["summary"]
    for key in ("clean_train_acc", "label_issue_precision_at_k", "label_issue_auroc", "memorized",
                "noise_rate_estimated", "num_label_issues"):  # fmt: skip
        assert metrics[f"final_{key}"] == pytest.approx(summary[key]), key
    assert metrics["final_wall_s"] == pytest.approx(summary["wall_s"])
    tags = run.data.tags
    assert tags["team"] == "vision"
    assert tags["mlflow.source.name"] == "python -m distnoisy.train"
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    assert tags["mlflow.source.git.commit"] == head
    # tracking.system_metrics=true: the driver machine's use, sampled while the run trained.
    cpu = client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
    assert cpu and all(0 <= m.value <= 100 * 64 for m in cpu)
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


def _download(finished, name: str) -> Path:
    client = _client(finished["uri"])
    run_id = finished["summary"]["mlflow_run_id"]
    names = {a.path for a in client.list_artifacts(run_id)}
    assert name in names, names
    out = Path(client.download_artifacts(run_id, name, str(finished["run"].parent / "dl")))
    return out


def test_weights_and_training_curves_are_artifacts(finished):
    import torch

    weights = torch.load(_download(finished, "weights.pt"), weights_only=True)
    assert set(weights) == {"model"}
    png = _download(finished, "training_curves.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(png)) as im:
        im.verify()
    with Image.open(io.BytesIO(png)) as im:
        assert im.size == (1000, 400)
        # Curves are drawn: the plot is not a blank canvas.
        assert len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)) > 20


class _Checker(HTMLParser):
    """Tags must nest properly; collects the rows' cells and the images' sources."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.rows: list[list[str]] = []
        self.images: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        if tag == "tr":
            self.rows.append([])
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack.pop() == tag, (tag, self.stack)

    def handle_data(self, data):
        if self.stack and self.stack[-1] in ("td", "th") and self.rows:
            self.rows[-1].append(data)


def _shard_image(root: Path, index: int) -> np.ndarray:
    """The stored image of a training sample, read with tarfile (independently of distnoisy)."""
    m = read_manifest(root / "train")
    shard = next(s for s in m.shards if s.first_index <= index < s.first_index + s.count)
    with tarfile.open(root / "train" / shard.name) as tf:
        data = tf.extractfile(f"{index:09d}.png").read()
    return np.asarray(Image.open(io.BytesIO(data)))


def test_label_issue_tables_render_with_the_samples_thumbnails(finished):
    issues = pq.read_table(finished["run"] / "label_issues.parquet").to_pandas()
    page = _download(finished, "label_issues_top.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    checker = _Checker()
    checker.feed(page)
    checker.close()
    assert checker.stack == []
    header, rows = checker.rows[0], checker.rows[1:]
    assert len(rows) == TOP_ISSUES and len(checker.images) == TOP_ISSUES
    col = {name: i for i, name in enumerate(header[:])}
    for k in (0, 1, TOP_ISSUES - 1):
        index = int(issues["index"].iloc[k])
        assert rows[k][col["index"] - 1] == str(index)  # rows[] lack the image cell's text
        assert rows[k][col["score"] - 1] == f"{issues['score'].iloc[k]:.4f}"
        src = checker.images[k]
        assert src.startswith("data:image/png;base64,")
        thumb = np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))))
        original = _shard_image(finished["root"], index)  # 8x8 digits, enlarged 8 times
        assert thumb.shape == (THUMB_PX, THUMB_PX)
        assert (thumb == np.kron(original, np.ones((8, 8), np.uint8))).all()

    md = _download(finished, "label_issues_top.md").read_text().splitlines()
    assert md[0].startswith("# Top 50 label issues")
    table = [line for line in md if line.startswith("|")]
    assert re.fullmatch(r"\|(---\|)+", table[1])
    widths = {line.count(" | ") for line in table[2:]} | {table[0].count(" | ")}
    assert len(widths) == 1 and len(table) == 2 + TOP_ISSUES
    first = [c.strip() for c in table[2].strip("|").split("|")]
    assert first[1] == str(issues["index"].iloc[0])


def test_resume_logs_each_epoch_once_and_wall_s_sums_the_segments(finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished["run"], run)
    first_wall = finished["summary"]["wall_s"]
    # As if the job died after logging epoch 1 but before its checkpoint was kept.
    shutil.rmtree(run / "checkpoints" / "epoch=0001")
    (run / "summary.json").unlink()
    uri = finished["uri"]
    client = _client(uri)
    run_id = finished["summary"]["mlflow_run_id"]
    # The copy resumes the same MLflow run (run.json): it continues, status RUNNING again.
    assert main([f"output_dir={run}", "resume=true"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    steps = [m.step for m in client.get_metric_history(run_id, "train_loss")]
    assert sorted(steps) == [0, 1], steps
    assert len(client.get_metric_history(run_id, "noise_rate_realised")) == 1
    assert client.get_run(run_id).info.status == "FINISHED"
    first, second = summary["wall_s_segments"]
    assert first == pytest.approx(first_wall, abs=0.05)
    assert summary["wall_s"] == pytest.approx(first + second, abs=0.02)


# -- outputs do not depend on tracking; a partitioned store's tables are artifacts too ---------
def test_noise_transition_is_written_with_tracking_off(finished, tmp_path):
    run = tmp_path / "untracked"
    argv = [a for a in finished["argv"] if not a.startswith(("output_dir=", "tracking."))]
    assert main([*argv, f"output_dir={run}", "tracking.enabled=false", "train.epochs=1"]) == 0
    assert json.loads((run / "run.json").read_text())["mlflow_run_id"] is None
    written = json.loads((run / "noise_transition.json").read_text())
    # The same data and noise as the tracked run: the same file, tracked or not.
    assert written == json.loads((finished["run"] / "noise_transition.json").read_text())
    # T[j, k] = P(given = k | clean = j), counted independently from the per-sample table.
    stats = pq.read_table(run / "sample_stats.parquet", columns=["given_label", "clean_label"])
    given, clean = (stats.column(c).to_numpy() for c in ("given_label", "clean_label"))
    c = len(written["classes"])
    counts = np.zeros((c, c))
    np.add.at(counts, (clean, given), 1.0)
    np.testing.assert_allclose(written["transition"], counts / counts.sum(1, keepdims=True))


def test_a_partitioned_run_logs_its_label_issue_tables(finished, tmp_path):
    import pyarrow.dataset as ds

    run = tmp_path / "partitioned"
    argv = [a for a in finished["argv"] if not a.startswith(("output_dir=", "tracking.system"))]
    assert main([*argv, f"output_dir={run}", "store.backend=partitioned", "train.epochs=1"]) == 0
    assert (run / "label_issues").is_dir() and not (run / "label_issues.parquet").exists()
    run_id = json.loads((run / "summary.json").read_text())["mlflow_run_id"]
    client = _client(finished["uri"])
    top = {a.path for a in client.list_artifacts(run_id)}
    assert {"label_issues", "label_issues_top.parquet"} <= top, top
    files = sorted(p.relative_to(run).as_posix() for p in (run / "label_issues").rglob("*"))
    logged = sorted(a.path for a in client.list_artifacts(run_id, "label_issues"))
    assert any(f.endswith(".parquet") for f in files) and logged == files, (logged, files)
    dl = Path(client.download_artifacts(run_id, "label_issues", str(tmp_path / "dl")))

    def table(root: Path):
        return ds.dataset(sorted(map(str, root.glob("*.parquet")))).to_table().sort_by("index")

    got = table(dl)
    assert got.num_rows == finished["summary"]["num_train"]
    assert got.equals(table(run / "label_issues"))
    assert (dl / "index.json").read_bytes() == (run / "label_issues" / "index.json").read_bytes()
    top_rows = pq.read_table(Path(client.download_artifacts(run_id, "label_issues_top.parquet")))
    assert top_rows.equals(pq.read_table(run / "label_issues_top.parquet"))
