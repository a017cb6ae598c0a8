"""Shared fixtures: real digits shards on disk, a study-file writer, and a CLI runner in a fresh process.

Tests that need Ray run the `mixer-study` CLI in a subprocess: each gets its own embedded local Ray (as a user
would), and a crash or kill in one test cannot leave a Ray instance behind in the pytest process.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from workers.config import TrialConfig
from workers.data.writer import shards_from_digits

CLI = [sys.executable, "-m", "pipeline.cli"]
REPO = Path(__file__).resolve().parents[1]


# Caches Python and the tools write into any checkout: not test output.
CACHE_PARTS = ("__pycache__", ".pytest_cache", ".ruff_cache", ".egg-info")


def checkout_files() -> set[str]:
    """The git-ignored files of the checkout, every file (not folders: a new run under an existing ``mlruns/``
    counts), caches and .venv left out.

    Ignored files are what a test run could add unseen (stores, artifact roots, runs/, results/: all in
    .gitignore); a new untracked file shows in `git status` anyway, and counting those too would blame the tests
    for a file someone writes in the checkout meanwhile."""
    out = subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=all", "--", ".",
                          ":(exclude).venv"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return {line[3:] for line in out.splitlines()
            if line.startswith("!! ") and not any(part in line for part in CACHE_PARTS)}


@pytest.fixture(scope="session", autouse=True)
def checkout_untouched():
    """Fails the session (an error at the last test's teardown) if tests added ignored files to the checkout:
    every store, artifact root, spool and report of a test belongs in its temp dir."""
    if not (REPO / ".git").exists():  # an sdist or a copy without git: nothing to compare against
        yield
        return
    before = checkout_files()
    yield
    added = sorted(checkout_files() - before)
    assert not added, f"the tests added {len(added)} files to the checkout {REPO}: {added[:20]}"


@pytest.fixture(scope="session")
def digits16(tmp_path_factory) -> Path:
    """Digits upscaled to 16 px as WebDataset shards (train/val/test), 25 samples per shard."""
    out = tmp_path_factory.mktemp("digits16")
    shards_from_digits(str(out), image_size=16, samples_per_shard=25, seed=0)
    return out


def study_dict(study_name: str, shards: Path, **sections) -> dict:
    """A small, fast study on digits shards; keyword sections (grid=..., train=...) override the defaults."""
    study = {
        "name": study_name,
        "base": {
            "data": {"train": str(shards / "train"), "val": str(shards / "val"),
                     "augment": {"crop": "pad", "pad": 1, "eval_crop_fraction": 1.0}},
            "model": {"variant": "Nano-4"},
            "optim": {"lr": 0.003, "warmup_steps": 10},
            "train": {"steps": 60, "batch_size": 32, "eval_every": 20, "checkpoint_every": 20, "log_every": 10},
            "fewshot": {"train": str(shards / "train"), "test": str(shards / "test"), "shots": [1, 5], "seeds": 2},
        },
        "grid": {},
        "resources": {"workers_per_trial": 2, "cpus_per_worker": 1},
    }
    for section, value in sections.items():
        if section in TrialConfig.model_fields and isinstance(value, dict):  # a recipe section: merged into base
            study["base"][section] = {**study["base"].get(section, {}), **value}
        else:
            study[section] = value
    return study


def write_study(path: Path, study: dict) -> Path:
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def cli_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), **extra}
    env.pop("RAY_ADDRESS", None)
    return env


def run_cli(args: list[str], env: dict[str, str], timeout: float = 600, cwd: Path | None = None):
    """Run `mixer-study ARGS` to completion; returns the CompletedProcess (stdout+stderr text)."""
    return subprocess.run(CLI + args, env=env, cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout)


def stop_processes_mentioning(marker: str, timeout: float = 20) -> None:
    """Stop the processes whose command line contains ``marker`` (a test's own temp dir or port): SIGTERM, then
    SIGKILL what is left. Nothing else on the machine is touched."""
    import psutil

    mine = [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])
            and p.pid != os.getpid()]
    for process in mine:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(mine, timeout=timeout)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()


def cmdline(process) -> str:
    """A psutil process's command line as one string ('' once it is gone); Ray's workers show their role here
    (``ray::RayTrainWorker``)."""
    import psutil

    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def duplicated_points(client, run_id: str) -> dict[str, list[int]]:
    """{metric key: steps that occur more than once in its history} for MLflow run ``run_id`` (system metrics
    included): empty when every point of every history was logged once."""
    from collections import Counter

    duplicates = {}
    for key in client.get_run(run_id).data.metrics:
        counts = Counter(m.step for m in client.get_metric_history(run_id, key))
        if repeated := sorted(step for step, n in counts.items() if n > 1):
            duplicates[key] = repeated
    return duplicates


@contextlib.contextmanager
def mlflow_server(root: Path, port: int | None = None):
    """A real `mlflow server` on 127.0.0.1 (sqlite store and artifacts under ``root``); yields its URI and stops
    the server (its own process group) afterwards. Restart it on the same store with the same ``port``."""
    import time
    import urllib.request

    port = port or free_port()
    root.mkdir(parents=True, exist_ok=True)
    log = open(root / f"server-{port}.log", "a")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        # MLflow 3's server also starts a job runner and 7 huey consumers (GenAI jobs) that no study uses: off, as
        # they made its start take minutes on a loaded 2-core machine.
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300  # minutes when the machine is loaded
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, (root / f"server-{port}.log").read_text()
            time.sleep(0.5)
        yield uri
    finally:
        # SIGTERM, then SIGKILL after 3 s: uvicorn's graceful shutdown waits for clients' keep-alive connections,
        # which would keep a "stopped" server answering for as long as a trial keeps flushing.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, 15)
        try:
            server.wait(timeout=3)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, 9)
            server.wait()
        log.close()


S3_TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def moto_server():
    """A real local S3 API (`python -m moto.server`) on 127.0.0.1; yields its endpoint URL and stops the server
    afterwards. Clients reach it with S3_TEST_CREDENTIALS and the endpoint: in a fresh process's environment
    ``AWS_ENDPOINT_URL`` (botocore, so s3fs; pyarrow, so Ray's storage) and ``FSSPEC_S3_ENDPOINT_URL`` (fsspec)."""
    import time
    import urllib.request

    pytest.importorskip("moto.server")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"moto server did not start on {endpoint}")
                time.sleep(0.2)
        yield endpoint
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture(scope="module")
def s3_endpoint():
    """A moto server that this test process's fsspec reaches as s3:// (bucket ``shards`` created)."""
    import fsspec

    s3fs = pytest.importorskip("s3fs")
    with moto_server() as endpoint, pytest.MonkeyPatch.context() as mp:
        for var, value in S3_TEST_CREDENTIALS.items():
            mp.setenv(var, value)
        mp.delenv("AWS_PROFILE", raising=False)
        # what FSSPEC_S3_ENDPOINT_URL does when set before fsspec is imported
        mp.setitem(fsspec.config.conf, "s3", {"endpoint_url": endpoint})
        s3fs.S3FileSystem.clear_instance_cache()
        try:
            fsspec.filesystem("s3").mkdir("shards")
            yield endpoint
        finally:
            s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One sqlite MLflow store per test module (creating one runs MLflow's migrations, ~2 s); each test makes its
    own experiments in it."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


@pytest.fixture(scope="module")
def client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri)
