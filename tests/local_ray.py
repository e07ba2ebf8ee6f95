"""A real multi-node Ray cluster on this machine, started with the ``ray`` CLI (test helper).

The head and every further node are separate ``ray start`` processes (one raylet each), each
with its own temporary directory and free ports, so several such clusters (other test sessions
on a shared machine) never collide. Nothing here stops Ray processes by name: ``ray stop``
would stop every Ray cluster of the user on the machine, so :meth:`LocalRayCluster.stop` ends
only the processes whose command line names this cluster's own directories, by pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 right now."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def cluster_env(address: str | None = None) -> dict[str, str]:
    """The environment of a process that talks to the cluster (CLI, driver, job client).

    ``RAY_AUTH_MODE=token`` makes clients send the token that ``ray start --head`` wrote to
    ``~/.ray/auth_token`` (token authentication is on by default for local clusters in Ray
    2.60); the test session's own ``RAY_ADDRESS`` (if any) must not leak into it.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(
        RAY_AUTH_MODE="token",
        OMP_NUM_THREADS="1",
        MLFLOW_DISABLE_TELEMETRY="true",
        PYTHONPATH=str(Path(__file__).resolve().parents[1]),
        RAY_USAGE_STATS_ENABLED="0",
        # As with an activated venv: `python` in a job's entrypoint is this environment's.
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    if address:
        env["RAY_ADDRESS"] = address
    return env


def _pids_naming(text: str) -> list[int]:
    """Pids of this user's processes whose command line contains ``text``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            pids.append(int(proc.name))
    return pids


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def _tree(pids: list[int]) -> list[int]:
    seen: list[int] = []
    todo = list(pids)
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.append(pid)
            todo += _children(pid)
    return seen


def kill_pids(pids: list[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


class LocalRayCluster:
    """A head node plus any number of worker nodes, each its own raylet, on 127.0.0.1.

    Parameters
    ----------
    root
        A directory of this cluster alone. Every node's ``--temp-dir`` is in a short directory
        of its own under ``/tmp`` instead: Ray puts Unix sockets below it, and a socket path
        may not exceed 107 bytes (pytest's temporary paths plus Ray's session names do).
    head_cpus
        Logical CPUs of the head node.
    """

    def __init__(self, root: Path, head_cpus: int = 1) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.temp_root = Path(tempfile.mkdtemp(prefix="dnray-", dir="/tmp"))
        self.gcs_port, self.dashboard_port, client_port = free_ports(3)
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        self.nodes: dict[str, Path] = {}
        # The head's directory is named as Ray's default one (``$RAY_TMPDIR/ray``): a process
        # with RAY_TMPDIR=temp_root finds this cluster as `ray start`'s last one on the machine.
        self._start("head", head_cpus, {"head": 1}, ["--head", f"--port={self.gcs_port}",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                    f"--ray-client-server-port={client_port}"], dirname="ray")  # fmt: skip

    def _start(
        self, name: str, cpus: int, resources: dict, extra: list[str], dirname: str = ""
    ) -> None:
        temp = self.temp_root / (dirname or name)
        agent, agent_grpc, runtime_env, metrics = free_ports(4)
        cmd = [
            RAY, "start", *extra, f"--num-cpus={cpus}", f"--resources={json.dumps(resources)}",
            f"--temp-dir={temp}", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
            f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
        ]  # fmt: skip
        done = subprocess.run(
            cmd, env=cluster_env(), capture_output=True, text=True, timeout=180, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"ray start for {name} failed:\n{done.stdout}\n{done.stderr}")
        self.nodes[name] = temp

    def add_node(self, name: str, cpus: int = 1) -> float:
        """Start a worker node ``name`` (custom resource ``{name: 1}``); returns seconds taken."""
        t0 = time.monotonic()
        self._start(name, cpus, {name: 1}, [f"--address={self.address}"])
        return time.monotonic() - t0

    def raylet_pid(self, name: str) -> int:
        pids = [
            p
            for p in _pids_naming(f"--raylet_socket_name={self.nodes[name]}/")
            if Path(f"/proc/{p}/exe").resolve().name == "raylet"
        ]
        if len(pids) != 1:
            raise RuntimeError(f"expected one raylet of node {name}, found {pids}")
        return pids[0]

    def kill_node(self, name: str, gone_ok: bool = False) -> None:
        """SIGKILL node ``name``'s raylet and every process under it (its workers); with
        ``gone_ok``, a raylet that has already exited (a drained node Ray shut down) is fine."""
        try:
            kill_pids(_tree([self.raylet_pid(name)]))
        except RuntimeError:
            if not gone_ok:
                raise
        # What was started beside the raylet (log monitor, agents) names its directory.
        kill_pids(_tree(_pids_naming(str(self.nodes.pop(name)))))

    def head_node_id(self) -> str:
        (head,) = [n for n in self.state("nodes") if n.get("is_head_node")]
        return head["node_id"]

    def drain_node(self, node_id: str, deadline_s: int) -> None:
        """What Ray's autoscaler (or a hook receiving the cloud's reclaim notice) does to a spot
        node: a drain with reason PREEMPTION and a deadline (Ray's preemption notice)."""
        subprocess.run(
            [RAY, "drain-node", f"--address={self.address}", f"--node-id={node_id}",
             "--reason=DRAIN_NODE_REASON_PREEMPTION", "--reason-message=spot reclaim (test)",
             f"--deadline-remaining-seconds={deadline_s}"],
            env=cluster_env(), capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip

    def state(self, kind: str, *filters: str) -> list[dict]:
        """``ray list KIND --detail`` as a list of dicts (the State API, through the dashboard)."""
        args = [a for f in filters for a in ("--filter", f)]
        out = subprocess.run(
            [RAY, "list", kind, "--address", self.dashboard_url, "--format", "json", "--detail",
             "--limit", "1000", *args],
            env=cluster_env(), capture_output=True, text=True, timeout=60, check=True,
        ).stdout  # fmt: skip
        return json.loads(out[out.index("[") :])

    def stop(self) -> None:
        """End every process of this cluster (only this one's: matched by its directories)."""
        for name in list(self.nodes)[::-1]:
            pids = _tree(_pids_naming(str(self.nodes[name])))
            kill_pids(pids, signal.SIGTERM)
            time.sleep(1)
            kill_pids(pids)
        self.nodes.clear()
        shutil.rmtree(self.temp_root, ignore_errors=True)
