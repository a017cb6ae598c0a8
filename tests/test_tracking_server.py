"""The tracking server as the user meets it: unreachable at start (a fast, clear error; nothing launched), and
credentials in its URI or in the environment, which must never be written anywhere."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import CLI, REPO, cli_env, cmdline, free_port, mlflow_server, run_cli, study_dict, write_study

PASSWORD, TOKEN = "pw-d41d8cd98f", "tok-9e107d9d372bb"


def test_unreachable_tracking_server_fails_fast_and_launches_nothing(tmp_path: Path, digits16: Path) -> None:
    path = write_study(tmp_path / "s.yaml", study_dict("unreachable", digits16))
    port = free_port()  # nothing listens there
    storage = tmp_path / "runs"
    env = cli_env(tmp_path)
    for verb in (["run", str(path), "--storage", str(storage)],
                 ["train", "--config", str(path), "--storage", str(storage)],
                 ["report", "unreachable"]):
        started = time.monotonic()
        result = run_cli([*verb, "--tracking-uri", f"http://alice:{PASSWORD}@127.0.0.1:{port}"], env, timeout=120)
        elapsed = time.monotonic() - started
        out = result.stdout + result.stderr
        assert result.returncode == 2, out[-3000:]
        assert elapsed < 30, f"{verb[0]}: {elapsed:.0f} s to report an unreachable server"
        assert f"MLflow tracking store http://127.0.0.1:{port} does not answer" in result.stderr
        assert PASSWORD not in out and "Traceback" not in out
        assert "Ray logs" not in out  # no Ray started
    assert not (storage / "unreachable" / "tune").exists() and not (storage / "unreachable" / "train").exists()


def _wait_for(path: Path, driver, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert driver.poll() is None, f"the study ended before {path.name} appeared"
        assert time.monotonic() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.2)


def _assert_complete_history(client: MlflowClient, run, steps: int, log_every: int) -> None:
    from tests.conftest import duplicated_points

    assert duplicated_points(client, run.info.run_id) == {}
    logged = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
    assert logged == list(range(log_every, steps + 1, log_every))  # none lost while the store was down
    for key in ("fewshot/5shot", "best/val_acc", "compute/images_seen"):
        assert key in run.data.metrics, key
    assert "time/trial_end_unix" in run.data.tags  # a wall-clock mark: a tag


def _train_workers(ray_tmp: Path) -> list[psutil.Process]:
    """The Ray Train workers of the Ray whose processes got RAY_TMPDIR=ray_tmp (this test's embedded Ray)."""
    workers = []
    for process in psutil.process_iter():
        try:
            if "RayTrainWorker" in cmdline(process) and process.environ().get("RAY_TMPDIR") == str(ray_tmp):
                workers.append(process)
        except psutil.Error:
            continue
    return workers


@pytest.mark.slow  # `make test-slow` (in CI): about 3.5 minutes of servers and studies
def test_tracking_outage_mid_study_is_spooled_and_synced_and_secrets_stay_secret(tmp_path: Path,
                                                                                   digits16: Path) -> None:
    """The server stops right after a trial's first checkpoint.

    Study A: the trial trains on, spooling; its workers are then frozen (SIGSTOP) while the server restarts (tens of
    seconds on a loaded 2-core machine), and thawed: their next flushes replay the spool. Study B: the server stays
    down until the driver exits; `mixer-study sync` sends everything afterwards. Both run with `user:password@` in
    the tracking URI and a *_TOKEN variable in the environment: neither secret may appear in any file of the server,
    the study's storage or Ray's session, nor in the output.
    """
    steps, log_every = 300, 5
    port, root = free_port(), tmp_path / "server"
    storage = tmp_path / "runs"
    ray_tmp = Path("/tmp") / f"rs-{port}"  # Ray's socket paths must stay short
    env = cli_env(tmp_path, RAY_TMPDIR=str(ray_tmp), MIXER_TEST_API_TOKEN=TOKEN)
    try:
        for name in ("outage-back", "outage-sync"):
            _outage_study(name, steps, log_every, digits16, tmp_path, root, port, storage, env)
        outputs = "".join(p.read_text() for p in tmp_path.glob("*.log") if p.parent == tmp_path)
        for secret in (PASSWORD, TOKEN):
            assert secret not in outputs
            for folder in (root, storage, ray_tmp):
                leaks = [f for f in folder.rglob("*") if f.is_file() and not f.is_symlink()
                         and secret.encode() in f.read_bytes()]
                assert leaks == [], (secret, leaks)
    finally:
        from tests.conftest import stop_processes_mentioning

        stop_processes_mentioning(str(ray_tmp))
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _outage_study(name: str, steps: int, log_every: int, digits16: Path, tmp_path: Path, root: Path, port: int,
                  storage: Path, env: dict) -> None:
    study = study_dict(name, digits16, train={"steps": steps, "log_every": log_every, "eval_every": 20,
                                              "checkpoint_every": 100})
    path = write_study(tmp_path / f"{name}.yaml", study)
    train_dir = storage / name / "train" / "base"
    log_path = tmp_path / f"{name}.log"
    with open(log_path, "w") as log:
        with mlflow_server(root, port) as uri:
            secret_uri = uri.replace("http://", f"http://alice:{PASSWORD}@")
            driver = subprocess.Popen(CLI + ["run", str(path), "--tracking-uri", secret_uri, "--storage",
                                             str(storage)], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
            _wait_for(train_dir / "step_00000100", driver)
        deadline = time.monotonic() + 120
        while not any((train_dir / "mlflow-spool").glob("*.json")):  # the next flush found the store gone
            assert driver.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.1)
        if name == "outage-sync":
            assert driver.wait(timeout=600) == 0, log_path.read_text()[-3000:]  # trained on without the store
            assert "mixer-study sync outage-sync" in log_path.read_text()
            frozen = []
        else:
            frozen = _train_workers(Path(env["RAY_TMPDIR"]))
            assert frozen, f"no trial worker to freeze (driver exit code {driver.poll()})"
            for process in frozen:
                process.send_signal(signal.SIGSTOP)
        with mlflow_server(root, port) as uri:
            for process in frozen:  # the store is back while the trial still has steps to train
                process.send_signal(signal.SIGCONT)
            if name == "outage-back":
                assert driver.wait(timeout=600) == 0, log_path.read_text()[-3000:]
            else:
                synced = run_cli(["sync", name, "--storage", str(storage)], env, timeout=300)
                assert synced.returncode == 0 and "metric points sent" in synced.stdout, synced.stderr[-3000:]
                log_path.with_suffix(".sync.log").write_text(synced.stdout + synced.stderr)
            client = MlflowClient(uri)
            exp = client.get_experiment_by_name(name)
            runs = {r.data.tags["mixer.role"]: r for r in client.search_runs([exp.experiment_id])}
            assert runs["trial"].info.status == "FINISHED" and runs["study"].info.status == "FINISHED", name
            _assert_complete_history(client, runs["trial"], steps, log_every)
            for run in runs.values():
                assert all(PASSWORD not in v and TOKEN not in v for v in run.data.params.values())
            assert not list(storage.glob(f"{name}/**/mlflow-spool/*.json")), "spool left behind"
