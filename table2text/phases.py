"""Where a stage's wall time goes: process start-up (interpreter and imports), model load, preparation
(settings, reading, tokenisation, graph capture, compilation), the work itself and saving.

A stage's `if __name__ == "__main__"` is `phases.exit_process(phases.timed(stage, cli))`.
A stage calls begin(stage) first thing in main(), enter(phase) at each change of phase (the time until
the next enter() counts to that phase; a phase entered twice adds up) and finish() at the end, which adds
{"phases": {...}, "details": {...}, "process_seconds": ...} to metrics/runtime/<stage>.json (table2text.runtime: git-ignored,
never a DVC-tracked output). bench/run_recipe.py reads it from there. Outside begin()/finish() (tests
and benches calling a stage's functions directly) enter() only moves the clock of a timer nobody writes. enter(phase, detail) and detail(label) also
name what a phase is doing, so a phase's time splits further ("details", keyed "phase/label": the time
with no label set is in the phase's total only).
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from pathlib import Path
from typing import NoReturn

from table2text.runtime import read_runtime, write_runtime
from table2text.warm_start import process_started

PHASES = ("startup", "load", "prepare", "work", "save")
_clock = time.perf_counter  # a module attribute, so that tests can step a fake clock instead of sleeping


def process_age() -> float | None:
    """Seconds since this stage's process started (interpreter start-up and imports; under warm start the
    stage's own process, not its forked child), None where psutil is missing."""
    started = process_started()
    return None if started is None else time.time() - started


class PhaseTimer:
    def __init__(self, stage: str | None = None):
        self.stage = stage
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.seconds["startup"] = process_age() if stage else 0.0
        self.current = "prepare"  # reading the settings and inputs, until the stage says otherwise
        self.label: str | None = None
        self.details: dict[str, float] = {}
        self.since = _clock()

    def enter(self, phase: str, detail: str | None = None) -> None:
        if phase not in PHASES[1:]:
            raise ValueError(f"unknown phase {phase!r} (one of {', '.join(PHASES[1:])})")
        now = _clock()
        self.seconds[self.current] += now - self.since
        if self.label is not None:
            key = f"{self.current}/{self.label}"
            self.details[key] = self.details.get(key, 0.0) + now - self.since
        self.current, self.label, self.since = phase, detail, now

    def detail(self, label: str | None) -> None:
        """Name what the running phase does from now on (None: nothing named)."""
        self.enter(self.current, label)

    def record(self) -> dict:
        self.enter(self.current, self.label)  # the running phase up to now
        total = sum(v for v in self.seconds.values() if v is not None)
        return {"phases": dict(self.seconds), "details": dict(self.details),
                "process_seconds": total if self.seconds["startup"] is not None else None}


_timer = PhaseTimer()


def begin(stage: str) -> PhaseTimer:
    """Start timing `stage` (its start-up is the process's age now); returns the timer."""
    global _timer
    _timer = PhaseTimer(stage)
    return _timer


def enter(phase: str, detail: str | None = None) -> None:
    _timer.enter(phase, detail)


def detail(label: str | None) -> None:
    _timer.detail(label)


def finish(folder: Path | None = None) -> dict:
    """Add the phase times to the stage's runtime record (metrics/runtime/<stage>.json); returns them."""
    if _timer.stage is None:
        raise RuntimeError("phases.finish() without phases.begin(stage)")
    record = _timer.record()
    write_runtime(_timer.stage, {**read_runtime(_timer.stage, folder), **record}, folder)
    return record


def timed(stage: str, cli) -> int:
    """A stage's `if __name__ == "__main__"`: run cli() (returns an exit status) between begin() and
    finish(); a failed run writes no phase times. Under torchrun only rank 0 writes them."""
    begin(stage)
    status = cli()
    if not status and os.environ.get("RANK", "0") == "0":
        finish()
    return status


def exit_process(status: int) -> NoReturn:
    """End a stage's process with `status` once everything is written, without the interpreter's teardown.

    Why: a normal exit of a process holding torch, transformers and a model frees every module and
    object one by one and runs the C++ static destructors (and on a GPU destroys the CUDA context):
    1.1-1.3 s measured on this project's CPU host and on an H200, every stage, for nothing: the
    operating system reclaims the memory, the files and the GPU at once. Safe because every output is
    already closed and on disk when the stage returns (table2text.io.atomic writes, fsyncs and renames;
    safetensors and tokenizer saves close their files; dvclive's Live.end() ran), and what a normal exit
    would still do is done here first: the other non-daemon threads are joined, the atexit handlers run
    (logging.shutdown flushes the log handlers, filelock releases its locks, weakref finalizers such as
    temporary folders' cleanup run) and stdout / stderr are flushed; the status is kept. os._exit is
    the same call on Windows and Linux. Under a tracer or profiler (coverage, `python -m cProfile`),
    which write their results at interpreter exit, the normal exit is kept."""
    status = int(status or 0)
    if sys.gettrace() is not None or sys.getprofile() is not None:
        sys.exit(status)
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # CPython's own exit path (the handlers run once: os._exit runs none again)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):  # a closed or missing stream (pythonw): nothing to flush
            pass
    os._exit(status)
