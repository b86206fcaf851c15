"""Phase times of a stage (table2text.phases) and how bench.run_recipe splits a stage's wall time with them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import run_recipe
from table2text import phases


class SteppedClock:
    """phases' clock, moved by the test: phase sums are exact, whatever the machine's load."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def step(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch):
    stepped = SteppedClock()
    monkeypatch.setattr(phases, "_clock", stepped)
    return stepped


def test_each_phase_gets_the_time_until_the_next_and_repeats_add_up(tmp_path, clock):
    timer = phases.begin("evaluate")
    assert timer.seconds["startup"] > 0  # this process's age: interpreter, imports, pytest so far
    phases.enter("load")
    clock.step(0.05)
    phases.enter("work")
    clock.step(0.02)
    phases.enter("load")  # the base model, later
    clock.step(0.05)
    phases.enter("save")
    (tmp_path / "evaluate.json").write_text(json.dumps({"generation": {"seconds": 1.0}}), encoding="utf-8")
    record = phases.finish(tmp_path)

    saved = json.loads((tmp_path / "evaluate.json").read_text(encoding="utf-8"))
    assert saved["generation"] == {"seconds": 1.0}  # the stage's own record is kept
    assert saved["phases"] == record["phases"] and set(saved["phases"]) == set(phases.PHASES)
    assert saved["phases"]["load"] == pytest.approx(0.10) and saved["phases"]["work"] == pytest.approx(0.02)
    assert saved["phases"]["prepare"] == 0.0 and saved["phases"]["save"] == 0.0  # the clock did not move
    assert saved["process_seconds"] == pytest.approx(sum(saved["phases"].values()))


def test_details_split_a_phase_and_unnamed_time_counts_only_to_the_phase(tmp_path, clock):
    phases.begin("train")
    phases.enter("load", "weights hash")
    clock.step(0.03)
    phases.detail("tokenizer")
    clock.step(0.05)
    phases.enter("prepare")  # nothing named
    clock.step(0.02)
    phases.detail("graph capture")
    clock.step(0.04)
    phases.enter("load", "weights hash")  # a label used twice adds up
    clock.step(0.03)
    record = phases.finish(tmp_path)
    details = record["details"]
    assert details == pytest.approx({"load/weights hash": 0.06, "load/tokenizer": 0.05,
                                     "prepare/graph capture": 0.04})
    assert record["phases"]["prepare"] == pytest.approx(0.06)  # 0.02 unnamed + 0.04 of graph capture
    assert sum(v for k, v in details.items() if k.startswith("load/")) == pytest.approx(record["phases"]["load"])
    table = run_recipe.phase_table({"train": {"wall_seconds": 1.0, "phases": {**record["phases"], "exit": 0.0},
                                              "metrics": record}})
    assert "train prepare/graph capture:" in table


def test_an_unknown_phase_is_refused():
    with pytest.raises(ValueError, match="unknown phase 'loading'"):
        phases.enter("loading")


def test_timed_writes_phases_only_for_a_successful_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert phases.timed("merge", lambda: 2) == 2
    assert not (tmp_path / "metrics" / "runtime" / "merge.json").exists()
    assert phases.timed("merge", lambda: 0) == 0
    saved = json.loads((tmp_path / "metrics" / "runtime" / "merge.json").read_text(encoding="utf-8"))
    assert set(saved["phases"]) == set(phases.PHASES)


def test_run_recipe_splits_the_wall_time_and_names_a_stage_without_phases():
    runtime = {"phases": {"startup": 3.0, "load": 2.0, "prepare": 1.0, "work": 10.0, "save": 0.5}}
    split = run_recipe.stage_phases("train", runtime, 17.0)
    assert split["exit"] == pytest.approx(0.5) and split["work"] == 10.0
    table = run_recipe.phase_table({"train": {"wall_seconds": 17.0, "phases": split}})
    assert table.splitlines()[0].split() == ["stage", "wall", *phases.PHASES, "exit"]
    assert "17.00" in table and "10.00" in table
    with pytest.raises(SystemExit, match="metrics/runtime/merge.json has no phase times"):
        run_recipe.stage_phases("merge", {}, 5.0)


EXITING_STAGE = r"""
import atexit, sys, threading, time
from table2text import phases

class Teardown:
    def __del__(self):  # runs only in the interpreter's teardown, which exit_process skips
        sys.stderr.write("torn down\n")

kept = Teardown()
atexit.register(lambda: open(sys.argv[1], "w", encoding="utf-8").write("atexit ran"))
threading.Thread(target=lambda: (time.sleep(0.3), open(sys.argv[2], "w", encoding="utf-8").write("joined"))).start()
print("buffered stdout", end="")  # no newline, stdout a pipe: still in the buffer at exit
phases.exit_process(phases.timed("merge", lambda: 3))
"""


def test_exit_process_keeps_the_status_flushes_runs_atexit_and_joins_threads_but_skips_teardown(tmp_path):
    root = Path(__file__).resolve().parents[1]
    done, joined = tmp_path / "atexit.txt", tmp_path / "thread.txt"
    run = subprocess.run([sys.executable, "-c", EXITING_STAGE, str(done), str(joined)], cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True,
                         text=True, encoding="utf-8", timeout=120)
    assert run.returncode == 3, run.stderr
    assert run.stdout == "buffered stdout"
    assert done.read_text(encoding="utf-8") == "atexit ran" and joined.read_text(encoding="utf-8") == "joined"
    assert "torn down" not in run.stderr  # the interpreter's teardown (1.1-1.3 s with torch loaded) was skipped
