"""Ranks started once for several jobs (``distnoisy.launch.ranks.rank_group``) on a real local
Ray cluster: the jobs run in order on the same worker processes, a rank's error is raised as it
is, and the workers' CPUs come back however the group ends."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from distnoisy.core.errors import ConfigError
from distnoisy.launch.ranks import rank_group


def _cpus_come_back(ray, want: float, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0) < want:
        assert time.monotonic() < deadline, ray.available_resources()
        time.sleep(0.5)


@pytest.mark.slow
def test_jobs_run_in_order_on_the_same_ranks_and_errors_surface(tmp_path, ray_cluster):
    ray = ray_cluster

    # Defined here, Ray sends them by value (the workers cannot import a test module).
    def note(out: str, rank: int, world: int) -> None:
        import os

        with open(Path(out) / f"rank{rank}.txt", "a") as f:
            f.write(f"{os.getpid()} {world}\n")

    def fail_on_rank_1(message: str, rank: int, world: int) -> None:
        if rank == 1:
            raise ConfigError(message)

    total = ray.cluster_resources()["CPU"]
    _cpus_come_back(ray, total)
    # The caller's own error after its jobs: the idle ranks are let go without waiting (the
    # normal end, close() waiting for the run, is every post-training command's).
    group = rank_group(world_size=2, launcher="ray", storage_dir=tmp_path / "ray")
    with pytest.raises(KeyError), group as ranks:
        for _ in range(3):
            ranks.run(note, str(tmp_path))
            # every rank finished the job before run() returned
            lines = [(tmp_path / f"rank{r}.txt").read_text().splitlines() for r in (0, 1)]
            assert len(lines[0]) == len(lines[1])
        raise KeyError("the caller's")
    assert len(lines[0]) == 3
    pids = [{line.split()[0] for line in rank_lines} for rank_lines in lines]
    assert all(len(p) == 1 for p in pids) and pids[0] != pids[1]  # one process a rank
    assert all(line.split()[1] == "2" for rank_lines in lines for line in rank_lines)
    _cpus_come_back(ray, total)

    # A rank's own error ends the group and reaches the caller unwrapped (the CLI's one line).
    group = rank_group(world_size=2, launcher="ray", storage_dir=tmp_path / "ray2")
    with pytest.raises(ConfigError, match=r"^bad rows$"), group as ranks:
        ranks.run(note, str(tmp_path))
        ranks.run(fail_on_rank_1, "bad rows")
    _cpus_come_back(ray, total)


def _note_threads(out: str, rank: int, world: int) -> None:
    import torch

    (Path(out) / f"rank{rank}.txt").write_text(str(torch.get_num_threads()))


def test_local_ranks_share_the_cores_unless_omp_num_threads_says(tmp_path, monkeypatch):
    """Spawned local ranks split the machine's cores between them (torch's default would give
    every rank every core); a user's ``OMP_NUM_THREADS`` wins."""
    import torch

    from distnoisy.launch.local import rank_threads, share_cpu_threads
    from distnoisy.launch.ranks import run_ranks

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    run_ranks(_note_threads, str(tmp_path), world_size=2, launcher="local", storage_dir=tmp_path)
    threads = [int((tmp_path / f"rank{r}.txt").read_text()) for r in (0, 1)]
    assert threads == [rank_threads(2)] * 2
    cores = len(os.sched_getaffinity(0))
    assert threads[0] >= 1 and 2 * threads[0] <= max(2, cores)  # no core runs two ranks' threads

    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", str(before))
    share_cpu_threads(world=before + 1)  # would be 1 thread (or 0) without the user's setting
    assert torch.get_num_threads() == before
