"""Faults users meet in practice, against real components: a user error raised on Ray Train
workers, a tracking server that is not there.

Each command runs as ``python -m distnoisy.train`` in a subprocess, so everything it prints
(Ray's worker and controller logs included) is in the output the test reads.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from local_mlflow import sqlite_uri
from local_ray import free_ports
from mlflow.tracking import MlflowClient

from distnoisy.data.shards import read_manifest
from distnoisy.tracking.outbox import QUIET_S

REPO = Path(__file__).resolve().parents[1]
LOCAL = ["scaling.launcher=local", "scaling.num_workers=1"]


def _env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    return dict(env, PYTHONPATH=path, OMP_NUM_THREADS="1", **extra)


def _train(
    cwd: Path, args: list[str], timeout: float = 600, **env: str
) -> subprocess.CompletedProcess:
    """``python -m distnoisy.train args`` in ``cwd``; stdout and stderr together in ``.stdout``."""
    return subprocess.run(
        [sys.executable, "-m", "distnoisy.train", *args],
        cwd=cwd,
        env=_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )


def _one_error_line(done: subprocess.CompletedProcess) -> str:
    """Exit 2, no traceback anywhere, the ``distnoisy: error:`` line last; that line."""
    out = done.stdout
    assert done.returncode == 2, out[-4000:]
    assert "Traceback" not in out, out[-4000:]
    last = out.rstrip().splitlines()[-1]
    assert last.startswith("distnoisy: error: "), out[-4000:]
    return last


def _start(cwd: Path, args: list[str]) -> tuple[subprocess.Popen, Path]:
    """``python -m distnoisy.train args`` in the background; its process and output file."""
    out = cwd / "train.out"
    with out.open("w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "distnoisy.train", *args],
            cwd=cwd,
            env=_env(),
            stdout=f,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
    return proc, out


def _wait_for(proc: subprocess.Popen, out: Path, text: str, limit_s: float = 600) -> None:
    deadline = time.monotonic() + limit_s
    while text not in out.read_text():
        assert proc.poll() is None, f"exited {proc.returncode}:\n{out.read_text()[-4000:]}"
        assert time.monotonic() < deadline, out.read_text()[-4000:]
        time.sleep(0.2)


class MlflowServer:
    """A real ``mlflow server`` on 127.0.0.1 (SQLite store, artifacts served by it) that a test
    stops and starts again on the same port and store."""

    def __init__(self, root: Path) -> None:
        (self.port,) = free_ports(1)
        self.root, self.url = root, f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    def start(self) -> None:
        mlflow = str(Path(sys.executable).with_name("mlflow"))
        cmd = [
            mlflow, "server", "--backend-store-uri", sqlite_uri(self.root),
            "--serve-artifacts", "--artifacts-destination", str(self.root / "artifacts"),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]  # fmt: skip
        with (self.root / "server.log").open("a") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env=dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true"),
            )  # fmt: skip
        deadline = time.monotonic() + 180
        while not self._answers():
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow server did not answer /health"
            time.sleep(0.3)

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)  # the server's own group (its workers)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=20)
        self.proc = None
        assert not self._answers()


@pytest.fixture
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _logged_once(uri: str, run_dir: Path) -> dict:
    """The run's summary, after checking that MLflow holds every epoch's metrics exactly once
    (one value per step, equal to the run's own history) and the final figures."""
    summary = json.loads((run_dir / "summary.json").read_text())
    client = MlflowClient(tracking_uri=uri)
    run_id = summary["mlflow_run_id"]
    history = summary["history"]
    for key in [k for k in history[0] if k != "epoch"]:
        logged = client.get_metric_history(run_id, key)
        assert sorted(m.step for m in logged) == list(range(len(history))), (key, logged)
        for m in logged:
            assert m.value == pytest.approx(history[m.step][key], nan_ok=True), key
    final = client.get_metric_history(run_id, "final_test_acc")
    assert [(m.step, m.value) for m in final] == [(summary["epochs"], summary["test_acc"])]
    return summary


def _run_status(uri: str, run_dir: Path) -> str:
    run_id = json.loads((run_dir / "run.json").read_text())["mlflow_run_id"]
    return MlflowClient(tracking_uri=uri).get_run(run_id).info.status


# -- (a) a tracking server that is not there when the run starts --------------------------------
def test_an_unreachable_tracking_server_is_one_line_in_seconds(tmp_path, digits_root) -> None:
    (port,) = free_ports(1)  # nothing listens there
    uri = f"http://127.0.0.1:{port}"
    run = tmp_path / "run"
    args = [f"data.root={digits_root}", f"output_dir={run}", f"tracking.uri={uri}", *LOCAL]
    t0 = time.monotonic()
    done = _train(tmp_path, [*args, "train.epochs=1"], timeout=120)
    took = time.monotonic() - t0
    line = _one_error_line(done)
    assert uri in line and "tracking.enabled=false" in line and "mlflow server" in line, line
    assert took < 60, took  # the interpreter and the data check included; no 252 s of retries
    assert not run.exists()


# -- (e) a user error on Ray Train workers -----------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["ray", "local"])
def test_bad_data_on_two_workers_is_one_line_last_and_the_run_failed(
    tmp_path, digits_root, launcher
) -> None:
    root = tmp_path / "digits"
    shutil.copytree(digits_root, root)
    m = read_manifest(root / "train")
    cut = root / "train" / m.shards[1].name
    cut.write_bytes(cut.read_bytes()[: int(cut.stat().st_size * 0.5)])
    run, uri = tmp_path / "run", sqlite_uri(tmp_path)
    args = [
        f"data.root={root}",
        f"output_dir={run}",
        f"tracking.uri={uri}",
        f"scaling.launcher={launcher}",
        "scaling.num_workers=2",
        "train.epochs=2",
    ]
    done = _train(tmp_path, args)
    line = _one_error_line(done)
    assert "unusable training samples, more than data.max_bad_fraction=0.01" in line, line
    assert f"first: {cut.name}: shard yielded" in line, line
    assert line.count("distnoisy: error:") == 1
    assert done.stdout.count("distnoisy: error:") == 1  # not also in a worker's log
    assert "Error in training function" not in done.stdout
    assert _run_status(uri, run) == "FAILED"
    assert not (run / "summary.json").exists()


# -- (b) a tracking server that goes away while the run trains ---------------------------------
def _tracked_args(digits_root: Path, run: Path, uri: str, epochs: int) -> list[str]:
    return [
        f"data.root={digits_root}",
        f"output_dir={run}",
        f"tracking.uri={uri}",
        f"train.epochs={epochs}",
        *LOCAL,
    ]


@pytest.mark.slow
def test_a_tracking_server_restarted_mid_run_gets_every_epoch_once(
    tmp_path, digits_root, mlflow_server
) -> None:
    run = tmp_path / "run"
    proc, out = _start(tmp_path, _tracked_args(digits_root, run, mlflow_server.url, epochs=20))
    try:
        _wait_for(proc, out, "epoch 1/20")
        mlflow_server.stop()
        _wait_for(proc, out, "did not answer")  # rank 0 could not log an epoch: it trains on
        failed_at = time.monotonic()
        # Whatever the machine's speed, epochs must remain once the server is back and rank 0's
        # quiet time is over: the run is held (SIGSTOP) until then, and let go.
        os.killpg(proc.pid, signal.SIGSTOP)
        assert "epoch 20/20" not in out.read_text(), "the run ended before the server stopped"
        mlflow_server.start()
        time.sleep(max(0.0, failed_at + QUIET_S + 1 - time.monotonic()))
        os.killpg(proc.pid, signal.SIGCONT)
        assert proc.wait(timeout=900) == 0, out.read_text()[-4000:]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    text = out.read_text()
    assert "Traceback" not in text and "warning" not in text.lower(), text[-4000:]
    assert "Retrying" not in text  # urllib3's per-retry lines stay off the terminal
    assert "is back: the queued metrics are logged" in text, text[-4000:]
    _logged_once(mlflow_server.url, run)
    assert _run_status(mlflow_server.url, run) == "FINISHED"
    assert not (run / "tracking_pending.json").exists()


@pytest.mark.slow
def test_a_tracking_server_gone_for_good_leaves_a_run_that_sync_logs(
    tmp_path, digits_root, mlflow_server
) -> None:
    run = tmp_path / "run"
    proc, out = _start(tmp_path, _tracked_args(digits_root, run, mlflow_server.url, epochs=3))
    try:
        _wait_for(proc, out, "epoch 1/3")
        mlflow_server.stop()
        assert proc.wait(timeout=900) == 0, out.read_text()[-4000:]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    text = out.read_text()
    assert "Traceback" not in text and "Retrying" not in text, text[-4000:]
    warnings = [line for line in text.splitlines() if "warning" in line.lower()]
    assert len(warnings) == 1, warnings
    command = f"python -m distnoisy.tracking.sync {run}"
    assert warnings[0].startswith("distnoisy: warning: ") and command in warnings[0], warnings
    for name in ("summary.json", "label_issues_top.parquet", "weights.pt", "training_curves.png"):
        assert (run / name).exists(), name  # the run's own outputs are complete
    assert (run / "tracking_pending.json").exists()

    mlflow_server.start()
    done = subprocess.run(
        [sys.executable, "-m", "distnoisy.tracking.sync", str(run)],
        env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "logged" in done.stdout and "the status FINISHED" in done.stdout, done.stdout
    _logged_once(mlflow_server.url, run)
    assert _run_status(mlflow_server.url, run) == "FINISHED"
    assert not (run / "tracking_pending.json").exists()
    run_id = json.loads((run / "run.json").read_text())["mlflow_run_id"]
    client = MlflowClient(tracking_uri=mlflow_server.url)
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"summary.json", "weights.pt", "config.yaml", "training_curves.png"} <= names, names
    assert len(client.get_run(run_id).data.params) > 30
    # Again: nothing left, nothing logged twice.
    again = subprocess.run(
        [sys.executable, "-m", "distnoisy.tracking.sync", str(run)],
        env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert again.returncode == 0 and "nothing to log" in again.stdout, again.stdout
    _logged_once(mlflow_server.url, run)


# -- (c) a disk that fills while a checkpoint is written -----------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs (a real small device: its writes fail with ENOSPC when it is full)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)],
        capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.slow
def test_a_full_disk_stops_at_a_checkpoint_and_the_run_resumes_exactly(
    tmp_path, digits_root, small_disk
) -> None:
    from test_resume import _assert_same_history, _assert_same_store, _assert_same_weights

    from distnoisy.engine import checkpoint as ckpt

    common = [f"data.root={digits_root}", "train.epochs=3", "tracking.enabled=false", *LOCAL]
    straight_dir = tmp_path / "straight"  # uninterrupted, in the same environment (threads)
    assert _train(tmp_path, [*common, f"output_dir={straight_dir}"]).returncode == 0
    straight = json.loads((straight_dir / "summary.json").read_text())

    run = small_disk / "run"
    proc, out = _start(tmp_path, [*common, f"output_dir={run}"])
    filler = small_disk / "filler"
    try:
        first = run / "checkpoints" / "epoch=0000"
        deadline = time.monotonic() + 600
        while not first.exists():
            assert proc.poll() is None, out.read_text()[-4000:]
            assert time.monotonic() < deadline, out.read_text()[-4000:]
            time.sleep(0.05)
        # Another writer fills the device while epoch 2 trains: 2 MiB stay free, less than the
        # checkpoint of epoch 2 (several MiB: weights, optimizer, per-sample store).
        free = shutil.disk_usage(small_disk).free
        with filler.open("wb") as f:
            f.write(b"\0" * (free - (2 << 20)))
        assert proc.wait(timeout=600) == 2, out.read_text()[-4000:]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    text = out.read_text()
    assert "Traceback" not in text, text[-4000:]
    line = text.rstrip().splitlines()[-1]
    assert line.startswith("distnoisy: error: no space left on the device of "), text[-4000:]
    assert str(run / "checkpoints") in line and "the checkpoint of epoch 2" in line, line
    assert "MiB free" in line and "resume=true" in line, line
    # The last complete checkpoint is there and whole; nothing partial is left behind.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch=0000"]
    assert ckpt.load_state(first / ckpt.STATE_FILE)["epoch"] == 0
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]
    assert not (run / "summary.json").exists()

    filler.unlink()  # space freed: the run continues from its last checkpoint
    done = _train(tmp_path, [*common, f"output_dir={run}", "resume=true"])
    assert done.returncode == 0, done.stdout[-4000:]
    assert "resumed from" in done.stdout and "at epoch 1" in done.stdout, done.stdout[-4000:]
    resumed = json.loads((run / "summary.json").read_text())
    _assert_same_history(straight, resumed, 0.0)
    _assert_same_weights(straight_dir / "weights.pt", run / "weights.pt", 0.0)
    _assert_same_store(straight_dir, run, 0.0)


# -- (d) shards at a URL that stall or fail ------------------------------------------------------
class _FaultyHandler(SimpleHTTPRequestHandler):
    """Static files with ``Range`` support; ``server.faults[path]`` is a list of what its next
    GETs do: ``"503"`` (answer 503), ``"stall"`` (send half the body, then nothing until the
    test ends), ``"ok"``; a path's GETs past its list are served normally, unless the list
    ends with ``"forever"`` (its last fault then repeats)."""

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        faults = self.server.faults.get(self.path, [])
        with self.server.lock:
            self.server.gets[self.path] = n = self.server.gets.get(self.path, 0) + 1
        forever = faults[-1:] == ["forever"]
        plan = faults[:-1] if forever else faults
        fault = plan[n - 1] if n <= len(plan) else (plan[-1] if forever and plan else "ok")
        if fault == "503":
            self.send_error(503, "busy")
            return
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            super().do_GET()
            return
        data = path.read_bytes()
        match = re.match(r"bytes=(\d+)-$", self.headers.get("Range", ""))
        start = int(match.group(1)) if match else 0
        self.send_response(206 if match else 200)
        if match:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if fault == "stall":
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.server.release.wait(600)  # a read that never finishes (until the test ends)
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def shard_server(digits_root):
    httpd = ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_FaultyHandler, directory=str(digits_root))
    )
    httpd.daemon_threads = True
    httpd.faults, httpd.gets = {}, {}
    httpd.lock, httpd.release = threading.Lock(), threading.Event()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.release.set()
        httpd.shutdown()
        httpd.server_close()


def _shard_args(url: str, tmp_path: Path) -> list[str]:
    return [
        "data.name=shards",
        f"data.urls={url}",
        f"data.root={tmp_path / 'cache'}",
        f"output_dir={tmp_path / 'run'}",
        "train.epochs=1",
        "tracking.enabled=false",
        *LOCAL,
    ]


@pytest.mark.slow
def test_a_stalled_read_and_503s_are_retried_and_the_run_finishes(tmp_path, shard_server) -> None:
    httpd, url = shard_server
    httpd.faults = {"/train/train-000001.tar": ["stall"], "/train/train-000002.tar": ["503", "503"]}
    done = _train(tmp_path, _shard_args(url, tmp_path), DISTNOISY_READ_TIMEOUT_S="3")
    out = done.stdout
    assert done.returncode == 0, out[-4000:]
    assert "Traceback" not in out
    stalled = re.findall(r"remote shard train-000001.tar: read failed at byte (\d+) \((.*)\)", out)
    busy = re.findall(r"remote shard train-000002.tar: read failed at byte 0 \(HTTP 503", out)
    assert len(stalled) == 1 and int(stalled[0][0]) > 0, out[-4000:]  # resumed part way
    assert "timed out" in stalled[0][1], stalled
    assert len(busy) == 2, out[-4000:]
    assert "retry 1/4 in 0.5 s" in out and "retry 2/4 in 1.0 s" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["bad_samples"] == 0  # every sample arrived
    assert summary["bad_sample_list"] == [] and "skipped" not in out


@pytest.mark.slow
def test_shards_that_keep_failing_stop_the_run_with_the_bad_data_line_in_bounded_time(
    tmp_path, shard_server
) -> None:
    httpd, url = shard_server
    httpd.faults = {
        "/train/train-000001.tar": ["503", "forever"],
        "/train/train-000002.tar": ["stall", "forever"],
    }
    # The bound: interpreter, data check and one epoch (~60 s on a loaded 2-core machine),
    # plus, for each of the two passes that read the two shards, at most 3 tries of 3 s and
    # 0.5 + 1 s of backoff per shard (10.5 s), although the stalling server sends half of what
    # is left after every GET (the tries are counted per shard: 28 s in all on an idle machine;
    # 169 s when every bit of progress started the tries afresh).
    t0 = time.monotonic()
    done = _train(
        tmp_path,
        _shard_args(url, tmp_path),
        timeout=400,
        DISTNOISY_READ_TIMEOUT_S="3",
        DISTNOISY_READ_RETRIES="2",
    )
    took = time.monotonic() - t0
    line = _one_error_line(done)
    assert "unusable training samples, more than data.max_bad_fraction=0.01" in line, line
    assert "train-000001.tar: shard yielded 0 of 256" in line, line
    assert "train-000002.tar: shard yielded" in line, line
    assert "3 tries failed" in done.stdout or "RemoteReadError" in done.stdout, done.stdout[-3000:]
    assert took < 150, took


# -- fast checks of the pieces ----------------------------------------------------------------
def test_the_outbox_keeps_what_a_missing_server_did_not_take_and_sends_it_once(tmp_path) -> None:
    from distnoisy import tracking
    from distnoisy.tracking.outbox import PENDING_FILE, Outbox

    uri = sqlite_uri(tmp_path)
    run_id = tracking.start_run(uri, "exp", "r", {})
    (port,) = free_ports(1)  # nothing listens there: a server that went away
    away = Outbox(tmp_path, f"http://127.0.0.1:{port}", run_id)
    t0 = time.monotonic()
    assert not away.log_steps([({"loss": 1.0}, 0), ({"loss": 0.5}, 1)])
    assert time.monotonic() - t0 < 15  # bounded: MLflow's retries are seconds, not minutes
    assert not away.log_params({"a": 1})  # queued untried: the server is left alone a while
    (tmp_path / "f.txt").write_text("x")
    assert not away.log_artifacts([tmp_path / "f.txt", tmp_path / "missing.txt"])
    assert not away.end("FINISHED")
    assert (
        away.describe()
        == "2 metric values (steps 0..1), 1 params, 1 output files, the status FINISHED"
    )
    # One of the two steps did arrive before (a call that timed out after it was stored).
    tracking.RunLogger(uri, run_id, 0).log_metrics({"loss": 1.0}, step=0)
    pending = json.loads((tmp_path / PENDING_FILE).read_text())
    back = Outbox(tmp_path, uri, pending["run_id"])
    assert back.flush(force=True) and not (tmp_path / PENDING_FILE).exists()
    client = MlflowClient(tracking_uri=uri)
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == [0, 1]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"a": "1"}
    assert [a.path for a in client.list_artifacts(run_id)] == ["f.txt"]


def test_a_rank_logger_never_raises_and_sends_its_queue_later(tmp_path) -> None:
    from distnoisy import tracking

    uri = sqlite_uri(tmp_path)
    run_id = tracking.start_run(uri, "exp", "r", {})
    (port,) = free_ports(1)
    logger = tracking.RunLogger(f"http://127.0.0.1:{port}", run_id, 0)
    logger.log_metrics({"loss": 2.0}, step=0)  # the server is away: queued, no exception
    logger.log_metrics({"loss": 1.0}, step=1)
    assert [(k, s) for k, _, s, _ in logger.queued] == [("loss", 0), ("loss", 1)]
    logger._client, logger._quiet_until = MlflowClient(tracking_uri=uri), 0.0  # back (same run)
    logger.log_metrics({"loss": 0.5}, step=2)
    assert logger.queued == []
    steps = MlflowClient(tracking_uri=uri).get_metric_history(run_id, "loss")
    assert sorted((m.step, m.value) for m in steps) == [(0, 2.0), (1, 1.0), (2, 0.5)]


def test_a_checkpoint_that_does_not_fit_is_one_line_before_anything_is_written(tmp_path) -> None:
    from distnoisy.engine import space

    free = shutil.disk_usage(tmp_path).free
    own = tmp_path / "ckpt"
    own.mkdir()
    with (own / "state.pt").open("wb") as f:
        f.truncate(free + (64 << 20))  # sparse: as many bytes as the device lacks, none used
    dest = tmp_path / "run" / "checkpoints"
    with pytest.raises(space.DiskFullError) as e:
        space.check_room("the checkpoint of epoch 3", dest, own, tmp_path / "run")
    line = str(e.value)
    assert f"no space left on the device of {dest} for the checkpoint of epoch 3" in line
    assert "MiB free" in line and "resume=true" in line and not dest.exists()
    space.check_room("the checkpoint of epoch 3", dest, None, tmp_path / "run")  # nothing: fits


def test_a_remote_read_resumes_after_503s_and_a_stall_with_range(digits_root, monkeypatch) -> None:
    from distnoisy.data import fs

    httpd = ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_FaultyHandler, directory=str(digits_root))
    )
    httpd.daemon_threads = True
    httpd.gets, httpd.lock, httpd.release = {}, threading.Lock(), threading.Event()
    name = "/train/train-000000.tar"
    httpd.faults = {name: ["503", "stall", "ok"]}
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}{name}"
    monkeypatch.setenv("DISTNOISY_READ_TIMEOUT_S", "1")
    try:
        with fs.open_binary(url) as f:
            data = f.read()
    finally:
        httpd.release.set()
        httpd.shutdown()
        httpd.server_close()
    assert data == (digits_root / name.lstrip("/")).read_bytes()
    assert httpd.gets[name] == 3
