"""One driver per study: a lock file on the study's storage, held by `mixer-study run` / `resume` while they drive.

Two drivers on one study would start every unfinished grid point twice (two Tune controllers, two MLflow child runs
per point). The lock is ``<storage>/<study>/driver.lock``, a small JSON document naming its holder (host, pid, the
process's start time) and refreshed by a heartbeat thread. A second driver that finds a live lock is refused with a
message naming the holder. A lock is *stale*, and is taken over, when its holder is gone: at once when the holder ran
on this host and its process no longer exists (a SIGKILLed driver, a stopped `ray job`), otherwise once its
heartbeat is older than ``stale_after_s`` (a driver on a host that died).

Storage is any fsspec URL, and object stores have no atomic create-if-absent here, so taking the lock is write, wait,
read back: of two drivers starting within the same fraction of a second, the one whose write lands last wins and
the other is refused. The lock guards against the real mistake (a second `run` or `resume` while one is going),
not against adversaries.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Any

import fsspec
import psutil

from pipeline.spec import StudyError
from workers.data.manifest import join_url

LOCK_NAME = "driver.lock"


class StudyLock:
    """Context manager holding ``<study_dir>/driver.lock`` for this process; re-entrant within the process."""

    _held: dict[str, int] = {}  # lock URL -> nesting depth, for this process (run_study continuing via resume_study)

    def __init__(self, study_dir: str, heartbeat_s: float = 10.0, stale_after_s: float = 60.0) -> None:
        self.url = join_url(study_dir, LOCK_NAME)
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self._fs, self._path = fsspec.core.url_to_fs(self.url)
        self._token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def raise_if_held(self) -> None:
        """Raise StudyError (naming the holder) if another live driver holds the lock; take nothing."""
        if self._held.get(self.url):
            return
        holder = self._read()
        if holder is not None and not self._stale(holder):
            raise StudyError(self._refusal(holder))

    def __enter__(self) -> StudyLock:
        if self._held.get(self.url):
            self._held[self.url] += 1
            return self
        self.raise_if_held()
        self._write()
        time.sleep(0.2)  # a driver that raced us has written by now: whoever wrote last holds the lock
        holder = self._read()
        if holder is None or holder.get("token") != self._token:
            raise StudyError(self._refusal(holder or {}))
        self._held[self.url] = 1
        self._thread = threading.Thread(target=self._beat, name="study-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._held[self.url] -= 1
        if self._held[self.url]:
            return
        del self._held[self.url]
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder = self._read()
        if holder is not None and holder.get("token") == self._token:
            self._fs.rm_file(self._path)

    # -- the lock document -------------------------------------------------------------------------------------------

    def _document(self) -> dict[str, Any]:
        me = psutil.Process()
        return {"token": self._token, "host": socket.gethostname(), "pid": os.getpid(),
                "pid_started": me.create_time(), "heartbeat": time.time()}

    def _write(self) -> None:
        # Written aside, then moved over the lock: a reader never sees a half-written document (a rename locally,
        # a copy on object stores, whose objects appear whole).
        self._fs.makedirs(self._path.rsplit("/", 1)[0], exist_ok=True)
        aside = f"{self._path}.{self._token}"
        self._fs.pipe_file(aside, json.dumps(self._document()).encode())
        self._fs.mv(aside, self._path)

    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self._fs.cat_file(self._path))
        except FileNotFoundError:
            return None
        except ValueError:  # not a lock document (e.g. a file cut short by a full disk): no live holder wrote it
            return {}

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            holder = self._read()
            if holder is None or holder.get("token") == self._token:  # never overwrite a lock someone took over
                self._write()

    def _stale(self, holder: dict[str, Any]) -> bool:
        if not holder:
            return True
        if holder.get("host") == socket.gethostname():
            try:
                process = psutil.Process(int(holder["pid"]))
                return abs(process.create_time() - float(holder["pid_started"])) > 1.0  # pid reused by another
            except (psutil.NoSuchProcess, KeyError, ValueError):
                return True
        return time.time() - float(holder.get("heartbeat", 0)) > self.stale_after_s

    def _refusal(self, holder: dict[str, Any]) -> str:
        age = time.time() - float(holder.get("heartbeat", time.time()))
        return (f"another driver is running this study (pid {holder.get('pid', '?')} on host "
                f"{holder.get('host', '?')}, last heartbeat {age:.0f} s ago; lock {self.url}): wait for it to finish. "
                "Two drivers would run every unfinished trial twice. If that driver is gone, its lock frees itself "
                f"(at once on the same host, else {self.stale_after_s:.0f} s after its last heartbeat)")
