"""`mixer-study ui` serves the MLflow UI for the tracking store, on 127.0.0.1 only."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from mlflow.tracking import MlflowClient

from tests.conftest import CLI, REPO, cli_env, free_port


def _listening_addresses(port: int) -> set[str]:
    """IPv4 addresses with a LISTEN socket on ``port``, from /proc/net/tcp (hex little-endian address:port)."""
    addresses = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:
            addresses.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return addresses


def test_ui_serves_the_store_on_loopback(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).create_experiment("visible")
    port = free_port()
    server = subprocess.Popen(CLI + ["ui", "--tracking-uri", uri, "--port", str(port)], env=cli_env(tmp_path),
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=10"
        deadline, body = time.monotonic() + 120, None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    body = json.load(response)
                break
            except OSError:
                time.sleep(1)
        assert body is not None, "MLflow UI did not answer"
        assert "visible" in {e["name"] for e in body["experiments"]}
        assert _listening_addresses(port) == {"127.0.0.1"}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
