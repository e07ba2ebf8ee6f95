"""The command lines: bad input is one line before any run directory, help texts, resume.

Everything runs for real: ``main([...])`` in this process, or ``python -m ...`` subprocesses
(help, Ctrl-C), on the digits data with the local launcher and tracking off.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distnoisy.train import main

LOCAL = ("scaling.launcher=local", "tracking.enabled=false")
REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    """This checkout first on the path of a subprocess, one thread (a loaded CI machine)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")


def _default_sigint() -> None:
    """In the child before exec: SIGINT back to its default action. A process started in the
    background by a non-interactive shell (``pytest ... &``) ignores SIGINT, and an ignored
    signal stays ignored across exec, so Python would never raise KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run the train CLI, expect exit code 2 and one ``distnoisy: error:`` line on stderr."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distnoisy: error: "), err
    return lines[0]


# -- bad input: one line, exit code 2, no run directory ----------------------------------------
def test_zero_workers_is_a_one_line_error(tmp_path, capsys):
    run = tmp_path / "run"
    line = _one_line_error(capsys, ["scaling.num_workers=0", f"output_dir={run}", *LOCAL])
    assert "scaling.num_workers must be >= 1" in line
    assert not run.exists()


def test_output_dir_that_is_a_file_is_a_one_line_error(tmp_path, capsys):
    path = tmp_path / "a_file"
    path.write_text("not a run\n")
    for out in (path, path / "below"):
        line = _one_line_error(capsys, [f"output_dir={out}", *LOCAL])
        assert str(path) in line and "is a file, not a directory" in line
    assert path.read_text() == "not a run\n"


def test_batch_larger_than_the_training_set_is_a_one_line_error(tmp_path, capsys, digits_root):
    run = tmp_path / "run"
    argv = [f"data.root={digits_root}", f"output_dir={run}", "train.epochs=1", *LOCAL]
    line = _one_line_error(capsys, [*argv, "train.batch_size=1440"])
    assert "train.batch_size=1440" in line and "at most 1437" in line
    assert not run.exists()
    # A class-balanced epoch of one batch of 1400 takes at most 140 per class: with 123 of
    # the given labels in one class it holds fewer than 1400 samples, so no step would run.
    balanced = ["train.batch_size=1400", "data.balanced_batches=1", "scaling.num_workers=1"]
    line = _one_line_error(capsys, [*argv, *balanced])
    assert "train.batch_size=1400" in line and "1437 in the training set" in line
    assert not run.exists()


# -- resume: the run's saved config, not today's defaults --------------------------------------
@pytest.mark.slow
def test_resume_uses_the_saved_config_and_rejects_a_conflicting_override(
    tmp_path, capsys, digits_root
):
    run = tmp_path / "run"
    start = [f"data.root={digits_root}", f"output_dir={run}", "train.epochs=2", *LOCAL]
    assert main([*start, "scaling.num_workers=1"]) == 0
    saved = (run / "config.yaml").read_bytes()
    shutil.rmtree(run / "checkpoints" / "epoch=0001")  # as if the job died after epoch 0
    (run / "summary.json").unlink()
    capsys.readouterr()

    # Anything that changes what the run trains is refused, and config.yaml is left alone.
    line = _one_line_error(capsys, [f"output_dir={run}", "resume=true", "train.epochs=5"])
    assert "train.epochs=5 (saved: 2)" in line and "a resumed run keeps its config" in line
    assert (run / "config.yaml").read_bytes() == saved

    # The command of the bug report: only output_dir and resume, today's defaults are 60 epochs.
    done = subprocess.run(
        [sys.executable, "-m", "distnoisy.train", f"output_dir={run}", "resume=true"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 2 and len(summary["history"]) == 2
    assert "2 epochs in" in done.stdout
    assert (run / "config.yaml").read_bytes() == saved
    assert not (tmp_path / "mlflow.db").exists()  # tracking stayed off, as saved


# -- --help: what the command does, how keys are given, where they are documented -------------
@pytest.mark.parametrize("module", ["distnoisy.train", "distnoisy.tune", "distnoisy.compare"])
def test_help_explains_the_command_and_where_keys_are_documented(module, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr
    text = done.stdout
    assert text.startswith(f"usage: python -m {module} ")
    assert "key=value" in text and "README.md, section 'Configuration'" in text
    for section in ("data", "noise", "method", "model", "train", "scaling", "tracking"):
        assert f"{section}.*" in text, section
    assert "``" not in text  # plain text, not reStructuredText
    assert not list(tmp_path.iterdir())  # --help writes nothing


# -- Ctrl-C: the line names the real command that resumes the run ------------------------------
def _interrupt_after(cwd, args: list[str], marker: str) -> tuple[int, str, dict[int, bytes]]:
    """Start ``python -m distnoisy.train args``, press Ctrl-C once a stderr line contains
    ``marker``; its exit code, its stderr and the processes of its tree (workers, a local Ray
    cluster) still alive 60 s after it exited, by PID with their command line. Its process group
    is killed afterwards, whatever happened (the driver's own session: the clean-up reaches
    spawned workers too)."""
    from distnoisy.launch.reaper import _stat, descendants

    proc = subprocess.Popen(
        [sys.executable, "-m", "distnoisy.train", *args],
        cwd=cwd,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=_default_sigint,
    )
    try:
        seen = []
        for line in proc.stderr:  # the epoch lines are logged to stderr
            seen.append(line)
            if marker in line:
                break
        assert seen and marker in seen[-1], "".join(seen)[-3000:]
        tree = descendants(proc.pid)
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=120)[1]
        # Poll (no fixed sleep): the tree's processes go as the driver stops them.
        deadline = time.monotonic() + 60
        alive = tree
        while alive and time.monotonic() < deadline:
            time.sleep(0.2)
            alive = {p: t for p, t in tree.items() if (st := _stat(p)) and st[1] == t}
        left = {}
        for pid in alive:
            with contextlib.suppress(OSError):
                left[pid] = Path(f"/proc/{pid}/cmdline").read_bytes()[:120]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, err, left


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_interrupt_prints_the_command_that_resumes_the_run(tmp_path, digits_root, workers):
    # One worker trains in the driver; two are spawned processes, stopped with the driver.
    run = tmp_path / "run with space"
    argv = [f"data.root={digits_root}", f"output_dir={run}", "train.epochs=500"]
    args = [*argv, *LOCAL, f"scaling.num_workers={workers}"]
    returncode, err, left = _interrupt_after(tmp_path, args, "epoch 1/500")
    assert returncode == 130, err[-3000:]
    last = err.strip().splitlines()[-1]
    expected = f"python -m distnoisy.train 'output_dir={run}' resume=true"
    assert last == f"distnoisy: interrupted; resume with: {expected}", err[-3000:]
    assert not (run / "summary.json").exists() and (run / "run.json").exists()
    # No worker trains on: every process the driver had started is gone.
    assert left == {}


@pytest.mark.slow
def test_ray_launcher_interrupt_prints_the_command_that_resumes_the_run(tmp_path, digits_root):
    # Ray Train's own SIGINT handler aborts the run; the driver then saw a Ray error or
    # SystemExit(1) and exited 1 without the line.
    run = tmp_path / "run"
    argv = [f"data.root={digits_root}", f"output_dir={run}", "train.epochs=300"]
    # worker lines come prefixed with "(RayTrainWorker pid=...)"
    returncode, err, left = _interrupt_after(
        tmp_path, [*argv, "tracking.enabled=false"], "epoch 1/300"
    )
    assert returncode == 130, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last == (
        f"distnoisy: interrupted; resume with: python -m distnoisy.train output_dir={run} "
        "resume=true"
    ), err[-3000:]
    assert not (run / "summary.json").exists()
    assert left == {}  # the workers and the local cluster the driver started are gone


# -- a GPU recipe on a cluster without GPUs: one line in seconds, not an endless wait ----------
@pytest.mark.slow
def test_gpu_recipe_on_a_local_cluster_without_gpus_fails_in_seconds(
    tmp_path, digits_root, ray_cluster, capsys
):
    assert not ray_cluster.cluster_resources().get("GPU")
    run = tmp_path / "run"
    argv = [f"data.root={digits_root}", f"output_dir={run}", "tracking.enabled=false"]

    def too_long(signum, frame):
        raise TimeoutError("still waiting for GPUs after 60 s")

    # An alarm, so that the endless wait this replaces fails the test instead of hanging it.
    previous = signal.signal(signal.SIGALRM, too_long)
    signal.alarm(60)
    t0 = time.monotonic()
    try:
        rc = main([*argv, "scaling.use_gpu=true", "scaling.num_workers=2"])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # main() installs its own
    assert time.monotonic() - t0 < 30
    assert rc == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("distnoisy: error: scaling.num_workers=2 with scaling.use_gpu=true")
    assert "needs 2 GPU, but the Ray cluster has 0 GPU and cannot grow" in lines[0]
    assert "set scaling.use_gpu=false" in lines[0]
    assert not run.exists()


# -- more workers than this machine's memory holds: one line in seconds, no run directory -------
def _too_many_workers() -> int:
    """A worker count this machine's memory cannot hold at the floor, with a margin for the
    memory that frees or fills between this line and the command's own check."""
    from distnoisy.core.machine import WORKER_MEMORY_FLOOR_MB, available_memory_bytes

    workers = 2 * (available_memory_bytes() // (WORKER_MEMORY_FLOOR_MB * 2**20)) + 2
    if workers > 1000:  # a global batch of one sample per worker must fit digits' 1,437
        pytest.skip(f"{workers} workers: more than a digits run can take on this machine")
    return workers


def test_more_local_ranks_than_the_memory_holds_is_a_one_line_error(tmp_path, capsys, digits_root):
    run, workers = tmp_path / "run", _too_many_workers()
    argv = [f"data.root={digits_root}", f"output_dir={run}", f"scaling.num_workers={workers}"]
    line = _one_line_error(capsys, [*argv, f"train.batch_size={workers}", *LOCAL])
    assert f"scaling.num_workers={workers}: {workers} workers on this machine need" in line
    assert "or fewer here" in line
    assert not run.exists()


def test_more_ray_workers_than_the_memory_holds_fails_before_starting_a_cluster(
    tmp_path, digits_root
):
    """A subprocess: this session's own Ray cluster, if started, must not be the one joined."""
    run, workers = tmp_path / "run", _too_many_workers()
    env = {k: v for k, v in _env().items() if k != "RAY_ADDRESS"}
    t0 = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "distnoisy.train", f"data.root={digits_root}",
         f"output_dir={run}", f"scaling.num_workers={workers}", f"train.batch_size={workers}",
         "scaling.address=local",
         "tracking.enabled=false"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert lines == [lines[0]] and f"scaling.num_workers={workers}: " in lines[0], lines
    assert "or give scaling.address of a cluster with more nodes" in lines[0]
    assert "Started a local Ray instance" not in done.stdout + done.stderr
    assert time.monotonic() - t0 < 60  # was: every worker started, minutes, Ray's OOM kills
    assert not run.exists()


def test_the_memory_check_against_a_hand_computed_floor():
    from distnoisy.core.errors import ConfigError
    from distnoisy.core.machine import WORKER_MEMORY_FLOOR_MB, check_room_for_workers

    floor = WORKER_MEMORY_FLOOR_MB * 2**20
    check_room_for_workers(10, available_bytes=10 * floor)  # exactly enough
    with pytest.raises(ConfigError) as exc:
        check_room_for_workers(10, available_bytes=10 * floor - 1)
    assert "use scaling.num_workers=9 or fewer here" in str(exc.value)
    assert f"need at least {10 * WORKER_MEMORY_FLOOR_MB / 1024:.1f} GB" in str(exc.value)
    with pytest.raises(ConfigError, match="free memory on this machine, or give"):
        check_room_for_workers(2, available_bytes=floor // 2)


def test_workers_killed_for_memory_name_the_fix_not_a_resume_alone(tmp_path):
    """Ray's error when its memory monitor killed workers (the text of a real run with
    scaling.num_workers=64 on a 24 GB machine): the line says why and what to change."""
    import ray.train

    from distnoisy.config import load_config
    from distnoisy.launch.ray_train import _gave_up_error

    cfg = load_config([f"output_dir={tmp_path}"])
    err = ray.train.ControllerError(
        RuntimeError(
            "7 worker(s) were killed due to the node running low on memory.\nMemory on the "
            "node (IP: 192.0.2.2, ID: 2740) was 22.63GB used / 23.54GB limit (0.961329)"
        )
    )
    line = str(_gave_up_error(err, cfg, tmp_path))
    assert "\n" not in line
    why = "Ray killed workers because their node ran out of memory (22.63GB used / 23.54GB limit)"
    assert why in line
    assert "fewer workers per node, or a smaller data.batch_size" in line
    assert line.endswith(f"python -m distnoisy.train output_dir={tmp_path} resume=true")
    assert "restore the cluster's resources" not in line


# -- ray job submit: the working directory is a temporary copy ---------------------------------
def test_a_ray_job_without_output_dir_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    # What `ray job submit --working-dir .` runs in: Ray deletes the copy with the job.
    copy = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    line = _one_line_error(capsys, ["scaling.launcher=local"])
    assert "Ray's temporary copy of the job's working_dir" in line
    assert "give output_dir= and tracking.uri= on storage that outlives the job" in line
    assert list(copy.iterdir()) == []
    line = _one_line_error(capsys, ["scaling.launcher=local", "tracking.enabled=false"])
    assert "give output_dir= on storage" in line


# -- a driver killed outright leaves no process of the cluster it started ----------------------
@pytest.mark.slow
def test_sigkilled_driver_leaves_no_process_of_its_local_cluster(tmp_path, digits_root):
    from distnoisy.launch.reaper import _stat, descendants

    run = tmp_path / "run"
    argv = [f"data.root={digits_root}", f"output_dir={run}", "train.epochs=300"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "distnoisy.train", *argv, "tracking.enabled=false"],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        for line in proc.stderr:
            if "epoch 1/300" in line:
                break
        cluster = descendants(proc.pid)  # GCS, raylet, dashboard, agents, workers, ...
        assert len(cluster) > 5, cluster
        proc.kill()
        proc.wait(timeout=30)
        deadline = time.monotonic() + 20
        alive = cluster
        while alive and time.monotonic() < deadline:
            time.sleep(1)
            alive = {p: t for p, t in cluster.items() if (st := _stat(p)) and st[1] == t}
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    names = {p: Path(f"/proc/{p}/cmdline").read_bytes()[:80] for p in alive if _stat(p)}
    for pid in alive:  # do not leave them to the rest of the session
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not alive, names
