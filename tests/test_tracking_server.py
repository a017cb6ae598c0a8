"""The tracking server as the user meets it: unreachable at start (a fast, clear error; nothing launched), and
credentials in its URI or in the environment, which must never be written anywhere."""

from __future__ import annotations

import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from tests.conftest import cli_env, free_port, mlflow_server, run_cli, study_dict, write_study

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


def test_credentials_never_reach_mlflow_tune_state_or_logs(tmp_path: Path, digits16: Path) -> None:
    """A study whose tracking URI holds user:password@, with a *TOKEN* variable in its environment: neither
    secret appears in any file of the tracking server, the study's storage or Ray's session, nor in the output."""
    study = study_dict("secrets", digits16, train={"steps": 20, "eval_every": 10, "checkpoint_every": 10})
    path = write_study(tmp_path / "secrets.yaml", study)
    ray_tmp = Path("/tmp") / f"rs-{free_port()}"  # Ray's socket paths must stay short
    storage = tmp_path / "runs"
    with mlflow_server(tmp_path / "server") as uri:
        secret_uri = uri.replace("http://", f"http://alice:{PASSWORD}@")
        env = cli_env(tmp_path, RAY_TMPDIR=str(ray_tmp), MIXER_TEST_API_TOKEN=TOKEN)
        result = run_cli(["run", str(path), "--tracking-uri", secret_uri, "--storage", str(storage)], env,
                         timeout=600)
        out = result.stdout + result.stderr
        assert result.returncode == 0, out[-4000:]
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("secrets")
        runs = client.search_runs([exp.experiment_id])
        assert {r.data.tags["mixer.role"] for r in runs} == {"study", "trial"}
        assert all(r.info.status == "FINISHED" for r in runs)
    try:
        for secret in (PASSWORD, TOKEN):
            assert secret not in out
            for root in (tmp_path / "server", storage, ray_tmp):
                leaks = [f for f in root.rglob("*") if f.is_file() and not f.is_symlink()
                         and secret.encode() in f.read_bytes()]
                assert leaks == [], (secret, leaks)
        for run in runs:
            assert all(PASSWORD not in v and TOKEN not in v for v in run.data.params.values())
    finally:
        import shutil

        from tests.conftest import stop_processes_mentioning

        stop_processes_mentioning(str(ray_tmp))
        shutil.rmtree(ray_tmp, ignore_errors=True)


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
    for key in ("fewshot/5shot", "best/val_acc", "time/trial_end_unix", "compute/images_seen"):
        assert key in run.data.metrics, key


def test_tracking_outage_mid_study_is_spooled_and_synced(tmp_path: Path, digits16: Path) -> None:
    """The server stops mid-training. Study A: it is back before the trial ends, and the trial's own flushes replay
    the spool. Study B: it stays down until the driver exits; `mixer-study sync` sends everything afterwards."""
    import subprocess

    from tests.conftest import CLI, REPO

    log_every = 5
    port, root = free_port(), tmp_path / "server"
    storage = tmp_path / "runs"
    env = cli_env(tmp_path)
    for name, steps in (("outage-back", 600), ("outage-sync", 200)):
        # One worker: the other core restarts the server (10 s idle, 30 s beside a 2-worker trial).
        study = study_dict(name, digits16, train={"steps": steps, "log_every": log_every, "eval_every": 20,
                                                  "checkpoint_every": 100}, resources={"workers_per_trial": 1})
        path = write_study(tmp_path / f"{name}.yaml", study)
        train_dir = storage / name / "train" / "base"
        log_path = tmp_path / f"{name}.log"
        with open(log_path, "w") as log:
            with mlflow_server(root, port) as uri:
                driver = subprocess.Popen(CLI + ["run", str(path), "--tracking-uri", uri, "--storage", str(storage)],
                                          env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
                _wait_for(train_dir / "step_00000100", driver)
            deadline = time.monotonic() + 120
            while not any((train_dir / "mlflow-spool").glob("*.json")):  # the next flush found the store gone
                assert driver.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
                time.sleep(0.1)
            if name == "outage-sync":
                assert driver.wait(timeout=600) == 0, log_path.read_text()[-3000:]  # trained on without the store
                assert "mixer-study sync outage-sync" in log_path.read_text()
            # back: for outage-back while the trial trains (the server takes 10-30 s to start here)
            with mlflow_server(root, port) as uri:
                if name == "outage-back":
                    assert driver.poll() is None, "the trial ended before the store was back: raise its steps"
                    assert driver.wait(timeout=600) == 0, log_path.read_text()[-3000:]
                else:
                    synced = run_cli(["sync", name, "--storage", str(storage)], env, timeout=300)
                    assert synced.returncode == 0 and "metric points sent" in synced.stdout, synced.stderr[-3000:]
                client = MlflowClient(uri)
                exp = client.get_experiment_by_name(name)
                runs = {r.data.tags["mixer.role"]: r for r in client.search_runs([exp.experiment_id])}
                assert runs["trial"].info.status == "FINISHED" and runs["study"].info.status == "FINISHED", name
                _assert_complete_history(client, runs["trial"], steps, log_every)
                assert not list(storage.glob(f"{name}/**/mlflow-spool/*.json")), "spool left behind"
