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
