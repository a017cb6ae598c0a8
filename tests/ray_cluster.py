"""A real multi-node Ray cluster on this machine, for tests: `ray start` nodes on 127.0.0.1 with their own ports and
temp dir, optionally with Ray 2.60's token authentication and the head's job server for `ray job submit`.

Only this cluster's processes are stopped afterwards, found by its temp dir (head) and GCS address (worker nodes):
never `ray stop`, which stops every Ray on the host, a user's own cluster included.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

from tests.conftest import cmdline, free_port, stop_processes_mentioning

RAY = str(Path(sys.executable).with_name("ray"))


class RayCluster:
    """Nodes of one cluster. ``env`` is every node's environment (the processes they start inherit it)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"  # the GCS, for `--address` of drivers and nodes
        self.temp_dir = Path("/tmp") / f"rc-{self.port}"  # Ray's socket paths must stay short
        self.job_address: str | None = None  # the head's job server (dashboard), once started with it

    def start_head(self, cpus: int, *, job_server: bool = False) -> None:
        args = [RAY, "start", "--head", "--num-cpus", str(cpus), "--port", str(self.port), "--temp-dir",
                str(self.temp_dir), "--ray-client-server-port", str(free_port()), *_node_args()[0]]
        if job_server:
            dashboard = free_port()
            args += ["--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port",
                     str(dashboard)]
            self.job_address = f"http://127.0.0.1:{dashboard}"
        else:
            args += ["--include-dashboard", "false"]
        self._ray(args)
        if job_server:
            self._wait_for_job_agent()

    def add_node(self, cpus: int) -> int:
        """Start a worker node; returns its node manager port, which names it for `kill_node`."""
        args, manager_port = _node_args()
        self._ray([RAY, "start", "--address", self.address, "--num-cpus", str(cpus), *args])
        return manager_port

    def kill_node(self, manager_port: int) -> list[str]:
        """SIGKILL a worker node's raylet and every process under it at once, as a machine dies; returns their
        command lines."""
        raylet = next((p for p in psutil.process_iter() if f"--node_manager_port={manager_port}" in cmdline(p)), None)
        assert raylet is not None, f"no raylet with node manager port {manager_port}"
        doomed = [raylet, *raylet.children(recursive=True)]
        killed = [cmdline(p) for p in doomed]
        for process in doomed:
            with contextlib.suppress(psutil.Error):
                process.send_signal(signal.SIGKILL)
        psutil.wait_procs(doomed, timeout=30)
        return killed

    def processes(self) -> list[psutil.Process]:
        """The head's processes: those whose command line names the temp dir (raylet, GCS, dashboard) and all their
        descendants (Ray's workers rename themselves `ray::...`, so they no longer mention it)."""
        roots = [p for p in psutil.process_iter() if str(self.temp_dir) in cmdline(p)]
        found = {p.pid: p for p in roots}
        for root in roots:
            with contextlib.suppress(psutil.Error):
                found.update((child.pid, child) for child in root.children(recursive=True))
        return list(found.values())

    def ray(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """`ray ARGS` in the cluster's environment (e.g. `ray job submit ...`)."""
        return subprocess.run([RAY, *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def submit(self, *entrypoint: str, working_dir: Path, wait: bool = True,
               timeout: float = 1200) -> subprocess.CompletedProcess:
        """`ray job submit --working-dir DIR -- ENTRYPOINT`; retried while a loaded machine's job agent still refuses
        jobs after `ray job list` works."""
        args = ["job", "submit", "--address", self.job_address, "--working-dir", str(working_dir)]
        args += [] if wait else ["--no-wait"]
        for _ in range(30):
            result = self.ray(*args, "--", *entrypoint, timeout=timeout)
            if "No available agent to submit job" not in result.stdout + result.stderr:
                return result
            time.sleep(2)
        return result

    def stop(self) -> None:
        stop_processes_mentioning(str(self.temp_dir))
        stop_processes_mentioning(f"gcs-address={self.address}")
        stop_processes_mentioning(f"gcs_address={self.address}")
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def _ray(self, args: list[str]) -> None:
        started = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, started.stdout + started.stderr

    def _wait_for_job_agent(self, timeout: float = 120) -> None:
        """`ray start` returns before the head's job agent accepts jobs ("No available agent to submit job")."""
        deadline = time.monotonic() + timeout
        while (listed := self.ray("job", "list", "--address", self.job_address, timeout=60)).returncode != 0:
            assert time.monotonic() < deadline, f"job server not ready: {listed.stderr[-2000:]}"
            time.sleep(2)

def _node_args() -> tuple[list[str], int]:
    """`ray start` arguments of one node on 127.0.0.1 with free ports of its own (Ray's defaults, such as the
    dashboard agent's 52365, collide with any other cluster on this host), and its node manager port."""
    ports = {flag: free_port() for flag in ("--node-manager-port", "--object-manager-port", "--metrics-export-port",
                                            "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                                            "--runtime-env-agent-port")}
    args = ["--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
    for flag, port in ports.items():
        args += [flag, str(port)]
    return args, ports["--node-manager-port"]


@contextlib.contextmanager
def ray_cluster(env: dict[str, str], home: Path | None = None) -> Iterator[RayCluster]:
    """A cluster whose nodes run with ``env``; with ``home``, token authentication is on: the token is generated
    into ``home/.ray/auth_token`` first, as the README tells users (`ray start --head` refuses to start with token
    auth and no token; `ray job submit` and joining nodes read it from there). Stopped afterwards."""
    env = {**env, "PATH": f"{Path(sys.executable).parent}:{env['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    if home is None:
        env["RAY_AUTH_MODE"] = "disabled"
    else:
        home.mkdir(parents=True, exist_ok=True)
        env.update(RAY_AUTH_MODE="token", HOME=str(home))
        generate = subprocess.run([RAY, "get-auth-token", "--generate"], env=env, capture_output=True, text=True,
                                  timeout=120)
        assert generate.returncode == 0 and (home / ".ray" / "auth_token").is_file(), generate.stderr
    cluster = RayCluster(env)
    try:
        yield cluster
    finally:
        cluster.stop()
