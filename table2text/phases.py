"""Where a stage's wall time goes: process start-up (interpreter and imports), model load, preparation
(settings, reading, tokenisation, graph capture, compilation), the work itself and saving.

A stage calls begin(stage) first thing in main(), enter(phase) at each change of phase (the time until
the next enter() counts to that phase; a phase entered twice adds up) and finish() at the end, which adds
{"phases": {...}, "process_seconds": ...} to metrics/runtime/<stage>.json (table2text.runtime: git-ignored,
never a DVC-tracked output). bench/run_recipe.py reads it from there. Outside begin()/finish() (tests
and benches calling a stage's functions directly) enter() only moves the clock of a timer nobody writes.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from table2text.runtime import read_runtime, write_runtime

PHASES = ("startup", "load", "prepare", "work", "save")


def process_age() -> float | None:
    """Seconds since this process started (interpreter start-up and imports), None where psutil is missing."""
    try:
        import psutil
    except ImportError:  # a bare GPU host: the other phases still report; start-up then reads None
        return None
    return time.time() - psutil.Process().create_time()


class PhaseTimer:
    def __init__(self, stage: str | None = None):
        self.stage = stage
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.seconds["startup"] = process_age() if stage else 0.0
        self.current = "prepare"  # reading the settings and inputs, until the stage says otherwise
        self.since = time.perf_counter()

    def enter(self, phase: str) -> None:
        if phase not in PHASES[1:]:
            raise ValueError(f"unknown phase {phase!r} (one of {', '.join(PHASES[1:])})")
        now = time.perf_counter()
        self.seconds[self.current] += now - self.since
        self.current, self.since = phase, now

    def record(self) -> dict:
        self.enter(self.current)  # the running phase up to now
        total = sum(v for v in self.seconds.values() if v is not None)
        return {"phases": dict(self.seconds), "process_seconds": total if self.seconds["startup"] is not None else None}


_timer = PhaseTimer()


def begin(stage: str) -> PhaseTimer:
    """Start timing `stage` (its start-up is the process's age now); returns the timer."""
    global _timer
    _timer = PhaseTimer(stage)
    return _timer


def enter(phase: str) -> None:
    _timer.enter(phase)


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
