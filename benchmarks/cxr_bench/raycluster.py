"""A local Ray cluster for measurements and tests: ``ray start --head`` on 127.0.0.1 plus more
node processes on this machine, each ``ray start --block`` (terminated, it stops its own Ray
processes), every port a free one; and the processes of that cluster, found by their command
line among the descendants of the nodes it started. Standard library only: Ray runs in the
``ray`` command it starts.

Examples:
    >>> cluster = LocalCluster(nodes=2, cpus=2)                   # doctest: +SKIP
    >>> cluster.address                                           # doctest: +SKIP
    '127.0.0.1:41234'
    >>> cluster.stop()                                            # doctest: +SKIP
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

NODE_PORTS = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
              "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ppids() -> Dict[int, int]:
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            out[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    return out


def cmdline(pid: int) -> str:
    """The process's command line ("" when it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class LocalCluster:
    """``nodes`` node processes on this machine with ``cpus`` CPUs each; :attr:`address` is the head's."""

    def __init__(self, nodes: int = 2, cpus: int = 2, object_store_mb: int = 256,
                 env: Optional[Dict[str, str]] = None) -> None:
        if shutil.which("ray") is None:
            raise RuntimeError("the ray command is not installed: pip install 'cxr[ray]'")
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.temp = tempfile.mkdtemp(prefix="cxr-ray-", dir="/tmp")  # short: Ray's socket paths have a limit
        self.cpus, self.store, self.env = cpus, object_store_mb * 2**20, env
        self.nodes: List[subprocess.Popen] = []
        self._logs = []
        self._start(head=True)
        for _ in range(nodes - 1):
            self._start(head=False)
        self.wait_nodes(nodes)

    def add_node(self) -> None:
        """One more node process; returns when the cluster has it."""
        self._start(head=False)
        self.wait_nodes(len(self.nodes))

    def _start(self, head: bool) -> None:
        cmd = ["ray", "start", "--block", "--node-ip-address", "127.0.0.1", "--num-cpus", str(self.cpus),
               "--object-store-memory", str(self.store), "--disable-usage-stats"]
        for flag in NODE_PORTS:
            cmd += [flag, str(free_port())]
        if head:
            cmd += ["--head", "--port", str(self.port), "--include-dashboard", "false", "--temp-dir", self.temp,
                    "--ray-client-server-port", str(free_port())]
        else:
            cmd += ["--address", self.address]
        log = open(Path(self.temp) / f"node{len(self.nodes)}.log", "wb")
        self._logs.append(log)
        self.nodes.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env))

    def alive_nodes(self) -> int:
        """Nodes the cluster reports alive (asked from a fresh Ray driver process)."""
        code = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False); "
                "print(sum(1 for n in ray.nodes() if n['Alive']))")
        r = subprocess.run([sys.executable, "-c", code, self.address], capture_output=True, text=True, env=self.env,
                           timeout=120)
        return int(r.stdout.strip() or 0) if r.returncode == 0 else 0

    def wait_nodes(self, n: int, timeout: float = 120) -> None:
        """Wait until ``n`` nodes are alive."""
        deadline = time.monotonic() + timeout
        while self.alive_nodes() < n:
            for p in self.nodes:
                if p.poll() is not None:
                    raise RuntimeError(f"a Ray node exited ({p.returncode}); see {self.temp}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster did not reach {n} nodes in {timeout} s")
            time.sleep(1)

    def processes(self, word: str) -> List[int]:
        """PIDs of this cluster's processes whose command line holds ``word``."""
        parents = _ppids()
        mine = {p.pid for p in self.nodes}
        found, grew = set(mine), True
        while grew:
            new = {pid for pid, ppid in parents.items() if ppid in found and pid not in found}
            found |= new
            grew = bool(new)
        return sorted(pid for pid in found - mine if word in cmdline(pid))

    def stop(self) -> None:
        """Terminate the node processes (each stops its Ray processes) and remove the temp folder."""
        for p in reversed(self.nodes):
            if p.poll() is None:
                p.terminate()
        for p in self.nodes:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(30)
        for log in self._logs:
            log.close()
        shutil.rmtree(self.temp, ignore_errors=True)
