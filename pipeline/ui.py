"""`mixer-study ui`: the MLflow UI of a study's store as a well-behaved server, and the link to a study's runs.

MLflow 3.17's UI chooses between its GenAI view (traces, token usage) and its model-training view (the runs table)
from the page's ``workflowType`` query parameter, else from the mode the browser last used, else GenAI: it no longer
reads the experiment tag ``mlflow.experimentKind`` for that choice. So the printed link carries
``workflowType=machine_learning``. It also sorts by the study's headline metric: the UI nests child runs under their
(collapsed) parent only in its default order by date, so a sorted table shows every trial as a row, best first.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import webbrowser
from dataclasses import dataclass
from urllib.parse import urlencode

from mlflow.tracking import MlflowClient

from pipeline.spec import StudyError
from pipeline.tracking import local_store_path
from workers.names import BEST_VAL_ACC, FEWSHOT_5SHOT, ROLE_STUDY, ROLE_TAG, STUDY_TAG
from workers.training.mlflow_logger import tag_filter

# uvicorn waits for open keep-alive connections (a browser tab) before it exits on SIGTERM: this long, then SIGKILL.
STOP_GRACE_S = 3.0


@dataclass(frozen=True)
class StudyPage:
    """Where a study's runs are in the UI: its experiment and the metric its runs table is sorted by."""

    name: str
    experiment_id: str
    sort_metric: str | None  # None: the study's trials have no headline metric yet (default order by date)

    def link(self, base_url: str) -> str:
        """The URL of the study's runs table in model-training mode on the UI at ``base_url``."""
        query = {"workflowType": "machine_learning"}
        if self.sort_metric:
            query |= {"orderByKey": f"metrics.`{self.sort_metric}`", "orderByAsc": "false"}
        return f"{base_url}/#/experiments/{self.experiment_id}/runs?{urlencode(query)}"


def check_store(uri: str) -> None:
    """Raise StudyError if ``uri`` is a local store that does not exist (MLflow would silently create it empty)."""
    path = local_store_path(uri)
    if path is not None and not path.exists():
        raise StudyError(f"MLflow store {path} does not exist: run a study first (mixer-study run STUDY.yaml), or "
                         "give the store of one with --tracking-uri / $MLFLOW_TRACKING_URI")


def check_port_free(host: str, port: int) -> None:
    """Raise StudyError if ``host:port`` cannot be bound now, before MLflow starts (it would log and exit 0)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is not "in use"
        try:
            probe.bind((host, port))
        except OSError as error:
            raise StudyError(f"--port {port}: cannot listen on {host}:{port} ({error.strerror}): another server "
                             "uses it; stop it or give another --port") from None


def find_study(uri: str, name: str | None = None) -> StudyPage | None:
    """The page of study ``name``, or of the most recently started study when ``name`` is None (None if the store
    has no study). Raises LookupError naming the studies there if ``name`` is not one of them."""
    client = MlflowClient(uri)
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    studies = client.search_runs(experiment_ids, filter_string=tag_filter({ROLE_TAG: ROLE_STUDY}),
                                 order_by=["attributes.start_time DESC"]) if experiment_ids else []
    found = [run for run in studies if name is None or run.data.tags.get(STUDY_TAG) == name]
    if not found:
        if name is None:
            return None
        known = ", ".join(sorted({run.data.tags.get(STUDY_TAG, "?") for run in studies})) or "none"
        raise LookupError(f"no study {name!r} in the MLflow store {uri} (studies there: {known})")
    parent = found[0]
    trials = client.search_runs([parent.info.experiment_id], max_results=50,
                                filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    logged = {key for run in trials for key in run.data.metrics}
    sort_metric = next((key for key in (FEWSHOT_5SHOT, BEST_VAL_ACC) if key in logged), None)
    return StudyPage(parent.data.tags[STUDY_TAG], parent.info.experiment_id, sort_metric)


class _StopRequested(Exception):
    """Raised in the main thread by the SIGTERM/SIGINT handler of :func:`serve`."""


def _wait_ready(base_url: str, server: subprocess.Popen, timeout_s: float = 300.0) -> bool:
    """Whether the server answered ``/health`` before it exited or ``timeout_s`` passed (minutes on a loaded
    machine: MLflow imports a lot)."""
    deadline = time.monotonic() + timeout_s
    while server.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{base_url}/health", timeout=2) as response:
            if response.status == 200:
                return True
        time.sleep(0.3)
    return False


def _stop_group(server: subprocess.Popen) -> None:
    """SIGTERM the server's process group (MLflow's CLI, uvicorn and its worker), SIGKILL it after STOP_GRACE_S."""
    for sig, wait_s in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, sig)
        try:
            server.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def serve(uri: str, host: str, port: int, name: str | None = None, open_browser: bool = False) -> int:
    """Serve the MLflow UI of store ``uri`` on ``host:port`` until SIGTERM/SIGINT (returns 0) or until MLflow exits
    (returns its exit code); prints the link to the study's runs once the server answers.

    Args:
        uri: a local MLflow store (sqlite or file); it must exist.
        host: the address to bind (127.0.0.1 keeps it to this machine).
        port: the TCP port; refused before anything starts if it is in use.
        name: the study to link to (default: the most recently started one).
        open_browser: also open the link in the default web browser.
    """
    if local_store_path(uri) is None:
        raise StudyError(f"--tracking-uri {uri} is not a local store: open that server in a browser, or give a "
                         "sqlite:/// or folder store to serve")
    check_store(uri)
    page = find_study(uri, name)
    check_port_free(host, port)
    # MLflow 3's server also starts a job runner and huey consumers for GenAI jobs: nothing a study uses, slow to
    # start, and they print KeyboardInterrupt tracebacks when stopped.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", host,
               "--port", str(port), "--workers", "1"]

    def request_stop(signum: int, frame: object) -> None:
        raise _StopRequested

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    server = None
    try:
        print(f"starting the MLflow UI for {uri} on {host}:{port} (Ctrl-C to stop) ...", flush=True)
        # Its own process group: the whole server stops together, and a terminal's Ctrl-C reaches only this process,
        # which stops the group with SIGTERM instead of every MLflow process printing a traceback.
        server = subprocess.Popen(command, env=env, start_new_session=True)
        base_url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        if _wait_ready(base_url, server):
            link = page.link(base_url) if page else base_url
            print(f"study {page.name}: {link}" if page else f"no study in this store yet: {link}", flush=True)
            if open_browser:
                webbrowser.open(link)
        return server.wait()
    except _StopRequested:
        return 0
    finally:
        for sig in previous:  # a second Ctrl-C while the group stops must not interrupt the stopping
            signal.signal(sig, signal.SIG_IGN)
        if server is not None:
            _stop_group(server)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
