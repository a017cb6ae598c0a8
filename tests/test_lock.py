"""One driver per study: the lock on the study's storage refuses a second driver while the first lives, and frees
itself when its holder is gone (a SIGKILLed process on this host, or a silent heartbeat from another host)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.lock import LOCK_NAME, StudyLock
from pipeline.spec import StudyError
from tests.conftest import REPO

HOLD = "import sys, time; from pipeline.lock import StudyLock\nwith StudyLock(sys.argv[1], heartbeat_s=0.2):\n" \
       "    print('held', flush=True); time.sleep(600)"


def test_second_driver_refused_until_the_first_is_killed(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StudyError, match=rf"another driver is running this study \(pid {holder.pid} on host"):
            with StudyLock(str(tmp_path)):
                pass
        heartbeat = json.loads((tmp_path / LOCK_NAME).read_text())["heartbeat"]
        time.sleep(0.6)
        assert json.loads((tmp_path / LOCK_NAME).read_text())["heartbeat"] > heartbeat  # the holder is alive
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / LOCK_NAME).exists()  # a killed driver cannot clean up ...
    with StudyLock(str(tmp_path)) as lock:  # ... but its lock is stale at once: same host, process gone
        with StudyLock(str(tmp_path)):  # re-entrant in one process (run_study continuing through resume_study)
            pass
        assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == lock._token
    assert not (tmp_path / LOCK_NAME).exists()  # released on exit


def test_resume_of_a_study_whose_driver_is_starting_names_that_driver(tmp_path: Path) -> None:
    # A driver holds the study's lock from before it writes study.yaml: `resume` in that window must say that another
    # driver runs the study (what the second-driver test in test_study.py saw only under load: "no study").
    from pipeline.tune import resume_study

    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "grid")], cwd=REPO, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert not (tmp_path / "grid" / "study.yaml").exists()
        with pytest.raises(StudyError, match=rf"another driver is running this study \(pid {holder.pid} on host"):
            resume_study("grid", storage=str(tmp_path))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with pytest.raises(StudyError, match="no study 'grid' at"):  # its driver gone, nothing was ever stored
        resume_study("grid", storage=str(tmp_path))


def test_lock_of_another_host_is_stale_only_after_its_heartbeat_stops(tmp_path: Path) -> None:
    doc = {"token": "x", "host": "node-elsewhere", "pid": 1, "pid_started": 0.0, "heartbeat": time.time()}
    (tmp_path / LOCK_NAME).write_text(json.dumps(doc))
    with pytest.raises(StudyError, match="node-elsewhere"):
        with StudyLock(str(tmp_path), stale_after_s=60):
            pass
    (tmp_path / LOCK_NAME).write_text(json.dumps({**doc, "heartbeat": time.time() - 61}))
    with StudyLock(str(tmp_path), stale_after_s=60):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["host"] != "node-elsewhere"
