"""Concise study progress on the terminal: one line per trial event, throttled step updates with an ETA.

Ray's own log stream stays on disk (``ray.init(log_to_driver=False)``); :func:`pipeline.tune.run_study` prints
where it is.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable

from ray.tune import Callback

from workers.names import BEST_VAL_ACC, FEWSHOT_5SHOT, VAL_ACC


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class StudyProgress(Callback):
    """Prints ``[done/total]`` lines as trials start, report and finish; an ETA from the trials finished so far."""

    def __init__(self, total_trials: int, steps: dict[str, int], concurrency: int, update_every_s: float = 15.0,
                 write: Callable[[str], None] | None = None) -> None:
        self.total, self.steps, self.concurrency = total_trials, steps, max(1, concurrency)
        self.update_every_s = update_every_s
        self.write = write or (lambda line: print(line, file=sys.stdout, flush=True))
        self.started: dict[str, float] = {}
        self.last_print: dict[str, float] = {}
        self.first_result: dict[str, tuple[float, int]] = {}  # (time, step): rate excludes start-up
        self.durations: list[float] = []
        self.done = 0
        self.counted_finished = False

    def __getstate__(self) -> dict:
        # Tune pickles callbacks with its experiment state; the writer may be a closure.
        state = dict(self.__dict__)
        state["write"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.write = lambda line: print(line, file=sys.stdout, flush=True)

    def _prefix(self) -> str:
        return f"[{time.strftime('%H:%M:%S')} {self.done}/{self.total} done]"

    def _study_eta(self) -> str:
        if not self.durations:
            return ""
        remaining = (self.total - self.done) * (sum(self.durations) / len(self.durations)) / self.concurrency
        return f", study ETA ~{_duration(remaining)}"

    def on_step_begin(self, iteration, trials, **info) -> None:
        # A resumed study starts with some trials already finished: count them once, at the first step.
        if not self.counted_finished:
            self.done = sum(t.status == "TERMINATED" for t in trials)
            self.counted_finished = True

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.started[trial.trial_id] = time.time()
        self.write(f"{self._prefix()} start  {trial}")

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if "step" not in result:
            return
        now, step, total = time.time(), int(result["step"]), self.steps.get(str(trial), 0)
        first_time, first_step = self.first_result.setdefault(trial.trial_id, (now, step))
        if now - self.last_print.get(trial.trial_id, 0.0) < self.update_every_s:
            return
        self.last_print[trial.trial_id] = now
        eta = ""
        if first_step < step < total:
            eta = f", trial ETA ~{_duration((now - first_time) / (step - first_step) * (total - step))}"
        self.write(f"{self._prefix()} {trial}: step {step}/{total}, val/acc {result.get(VAL_ACC, float('nan')):.3f}"
                   f"{eta}")

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.done += 1
        elapsed = time.time() - self.started.get(trial.trial_id, time.time())
        self.durations.append(elapsed)
        result = trial.last_result or {}
        shot = next((f", {k} {v:.3f}" for k, v in result.items() if k == FEWSHOT_5SHOT), "")
        best = result.get(BEST_VAL_ACC)
        best_text = f": best val/acc {best:.3f}" if best is not None else ""
        self.write(f"{self._prefix()} done   {trial}{best_text}{shot} in {_duration(elapsed)}{self._study_eta()}")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.done += 1
        cause = root_cause(getattr(trial, "error_file", None))
        self.write(f"{self._prefix()} FAILED {trial}{': ' + cause if cause else ''} (full traceback: "
                   f"{trial.local_path}/error.txt)")


# "pkg.module.SomeError: message" (or "SomeError: ...") at the start of a traceback line
_EXCEPTION_LINE = re.compile(r"^\s*(?:[A-Za-z_][\w.]*\.)?([A-Za-z_]\w*(?:Error|Exception)): (.+)$")
_WRAPPERS = {"TrainingFailedError", "WorkerGroupError", "RayTaskError", "RayActorError", "TuneError"}


def root_cause(error_file: str | None, limit: int = 600) -> str | None:
    """The innermost ``SomeError: message`` of a trial's error.txt (Ray wraps a worker's error in several layers),
    skipping Ray's own wrapper types; None if there is no file or no such line."""
    try:
        with open(error_file) as f:
            lines = f.read().splitlines()
    except (OSError, TypeError):
        return None
    causes = [m for m in map(_EXCEPTION_LINE.match, lines) if m and m.group(1) not in _WRAPPERS]
    if not causes:
        return None
    name, message = causes[-1].groups()
    return f"{name}: {message}"[:limit]
