"""`mixer-study ui` serves the MLflow UI of a real store on 127.0.0.1, prints the link to a study's runs table in
model-training mode, stops everything it started on SIGTERM or SIGINT, and refuses a busy port or a missing store."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import psutil
import pytest
from mlflow.tracking import MlflowClient

from pipeline import cli
from pipeline.tracking import experiment_id, study_run, trial_run
from pipeline.ui import find_study
from tests.conftest import CLI, REPO, cli_env, free_port
from workers.names import FEWSHOT_5SHOT


def _listening_addresses(port: int) -> set[str]:
    """IPv4 addresses with a LISTEN socket on ``port``, from /proc/net/tcp (hex little-endian address:port)."""
    addresses = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:
            addresses.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return addresses


def _store_with_studies(tmp_path: Path) -> str:
    """A sqlite store with two studies made by the project's own tracking code: "older" (one trial) and then
    "newer" (three trials with different 5-shot accuracies)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    for study, accuracies in (("older", [0.5]), ("newer", [0.6, 0.9, 0.7])):
        exp = experiment_id(client, study)
        parent = study_run(client, exp, study, {"description": study})
        for i, acc in enumerate(accuracies):
            run = trial_run(client, exp, study, parent, f"variant=Nano-4,fraction={i}", {"data.fraction": i})
            client.log_metric(run, FEWSHOT_5SHOT, acc)
            client.set_terminated(run)
        client.set_terminated(parent)
        time.sleep(0.01)  # distinct start times: "newer" is the latest study
    return uri


def _get(url: str, body: dict | None = None) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status, response.read()


def test_find_study_picks_the_latest_or_the_named_one(tmp_path: Path) -> None:
    uri = _store_with_studies(tmp_path)
    newer, older = find_study(uri), find_study(uri, "older")
    assert (newer.name, older.name) == ("newer", "older") and newer.experiment_id != older.experiment_id
    assert newer.sort_metric == FEWSHOT_5SHOT
    with pytest.raises(LookupError, match="no study 'absent'.*studies there: newer, older"):
        find_study(uri, "absent")


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_ui_links_to_the_study_runs_and_stops_on_a_signal(tmp_path: Path, stop_signal: int) -> None:
    uri = _store_with_studies(tmp_path)
    port = free_port()
    ui = subprocess.Popen(CLI + ["ui", "--tracking-uri", uri, "--port", str(port)], env=cli_env(tmp_path), cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    started, output = [], []
    # Reading its output blocks: a ui that never prints its link is killed, which ends the reading.
    watchdog = threading.Timer(240, lambda: contextlib.suppress(ProcessLookupError)(os.killpg)(ui.pid, signal.SIGKILL))
    watchdog.start()
    try:
        for line in ui.stdout:  # the link comes once the server answers (a minute at most on a loaded machine)
            output.append(line)
            if line.startswith("study "):
                break
        assert output and output[-1].startswith("study newer: http://127.0.0.1:"), "".join(output)
        link = output[-1].split(": ", 1)[1].strip()
        started = psutil.Process(ui.pid).children(recursive=True)
        assert started, "ui started no server process"

        # The link: the study's experiment, in model-training mode, sorted by 5-shot accuracy (flat, best first).
        base, fragment = link.split("/#", 1)
        route = urlsplit(fragment)
        query = {key: values[0] for key, values in parse_qs(route.query).items()}
        exp_id = route.path.split("/")[2]
        assert route.path == f"/experiments/{exp_id}/runs"
        assert query == {"workflowType": "machine_learning", "orderByKey": f"metrics.`{FEWSHOT_5SHOT}`",
                         "orderByAsc": "false"}
        status, page = _get(f"{base}/")  # the fragment stays in the browser: the server sends the app
        assert status == 200 and b'id="root"' in page
        _, experiment = _get(f"{base}/ajax-api/2.0/mlflow/experiments/get?experiment_id={exp_id}")
        assert json.loads(experiment)["experiment"]["name"] == "newer"
        # What the runs table asks for with that sort order: the newer study's trials, best 5-shot first.
        order = f"{query['orderByKey']} {'ASC' if query['orderByAsc'] == 'true' else 'DESC'}"
        _, runs = _get(f"{base}/ajax-api/2.0/mlflow/runs/search",
                       {"experiment_ids": [exp_id], "order_by": [order], "max_results": 10})
        accuracies = [next((m["value"] for m in run["data"].get("metrics", []) if m["key"] == FEWSHOT_5SHOT), None)
                      for run in json.loads(runs)["runs"]]
        assert accuracies[:3] == [0.9, 0.7, 0.6]
        assert _listening_addresses(port) == {"127.0.0.1"}

        os.kill(ui.pid, stop_signal)  # the ui process alone, as a terminal's Ctrl-C or a service manager would
        rest, _ = ui.communicate(timeout=15)
        output.append(rest)
    finally:
        watchdog.cancel()
        if ui.poll() is None:
            os.killpg(ui.pid, signal.SIGKILL)
            ui.wait()
    text = "".join(output)
    assert ui.returncode == 0, text
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text
    _, alive = psutil.wait_procs(started, timeout=5)
    assert not alive, f"left running: {[p.pid for p in alive]}"
    assert not _listening_addresses(port)
    with socket.socket() as probe:  # the port is free again for a server (SO_REUSEADDR, as uvicorn binds)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))


def _ui_refused(args: list[str], capsys) -> str:
    """Run `mixer-study ui ARGS` in this process (a refusal starts nothing); returns its stderr, asserting exit 2."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["ui", *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "mixer-study ui: error: " in err and "Traceback" not in err, err
    return err


def test_ui_refuses_a_busy_port_a_missing_store_and_an_unknown_study(tmp_path: Path, capsys) -> None:
    uri = _store_with_studies(tmp_path)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        err = _ui_refused(["--tracking-uri", uri, "--port", str(port)], capsys)
    assert f"--port {port}: cannot listen on 127.0.0.1:{port}" in err
    assert "starting" not in capsys.readouterr().out  # refused before MLflow started

    missing = tmp_path / "elsewhere" / "mlflow.db"
    err = _ui_refused(["--tracking-uri", f"sqlite:///{missing}", "--port", str(free_port())], capsys)
    assert f"MLflow store {missing} does not exist" in err
    assert not missing.parent.exists()  # no empty store was created

    err = _ui_refused(["absent", "--tracking-uri", uri, "--port", str(free_port())], capsys)
    assert "no study 'absent'" in err and "newer, older" in err
