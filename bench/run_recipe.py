"""Run pipeline stages for one recipe (params.yaml plus overrides) and record what each stage produced
and how long it took: one row of the results table, reproducible by its command.

    python -m bench.run_recipe --name NAME [--set group.key=value ...] [--stages preprocess train merge evaluate]

Stages run as `python -m stages.<name> --params <tmp params>` (exactly what dvc.yaml runs), so this is
for hosts without DVC (GPU hosts) and for sweeps recorded outside `dvc exp`. Writes
bench/results/<date>-<gpu>-recipe-<NAME>.json (each stage's metrics file merged with its runtime record,
metrics/runtime/<stage>.json) and appends a row to BENCHMARKS.md. Each stage's wall time is split into
process start-up (interpreter and imports), model load, preparation, the work itself and saving
(table2text.phases); the rest of the wall time (launching the interpreter, exiting) shows as "exit".
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

from bench import common
from table2text.params import load_params
from table2text.phases import PHASES
from table2text.runtime import read_runtime
from table2text import warm_start

STAGES = ("preprocess", "train", "merge", "evaluate")
OUTPUTS = {"preprocess": "metrics/preprocess.json", "train": "metrics/train.json", "merge": "metrics/merge.json",
           "evaluate": "metrics/eval.json"}


def apply_override(params: dict, assignment: str) -> None:
    key, _, raw = assignment.partition("=")
    if not raw and "=" not in assignment:
        raise SystemExit(f"--set {assignment!r}: expected group.key=value")
    *groups, leaf = key.split(".")
    node = params
    for g in groups:
        node = node[g]
    if leaf not in node:
        raise SystemExit(f"--set {assignment!r}: params.yaml has no {key}")
    node[leaf] = yaml.safe_load(raw)


def stage_phases(stage: str, runtime: dict, wall_seconds: float) -> dict:
    """The stage's phase times (table2text.phases) plus "exit": the wall time the stage's own clock did not
    see (process launch before psutil's start time, interpreter shutdown)."""
    phases = runtime.get("phases")
    if not phases:
        raise SystemExit(f"{stage}: metrics/runtime/{stage}.json has no phase times (table2text.phases.timed not called?)")
    known = sum(v for v in phases.values() if v is not None)
    return {**phases, "exit": wall_seconds - known}


def phase_table(stages: dict) -> str:
    """One line per stage: wall time and its phases, in seconds."""
    names = (*PHASES, "exit")
    lines = [f"{'stage':<11}{'wall':>7}" + "".join(f"{n:>9}" for n in names)]
    for stage, entry in stages.items():
        cells = "".join(f"{entry['phases'][n]:>9.2f}" if entry["phases"].get(n) is not None else f"{'n/a':>9}"
                        for n in names)
        lines.append(f"{stage:<11}{entry['wall_seconds']:>7.2f}{cells}")
    total = sum(e["wall_seconds"] for e in stages.values())
    lines.append(f"{'total':<11}{total:>7.2f}")
    for stage, entry in stages.items():  # what the stages named inside their phases (table2text.phases)
        details = entry.get("metrics", {}).get("details") or {}
        lines.extend(f"  {stage} {key}: {seconds:.2f}" for key, seconds in details.items())
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)

    params = load_params()
    for assignment in args.set:
        apply_override(params, assignment)
    params_file = args.out / f"params-{args.name}.yaml"
    args.out.mkdir(parents=True, exist_ok=True)
    params_file.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")

    # warm start (table2text.warm_start): the stages after the first run in forks of a helper process
    row = {"name": args.name, "overrides": args.set, "warm_start": warm_start.enabled(), "stages": {}}
    for stage in args.stages:
        cmd = [sys.executable, "-m", f"stages.{stage}", "--params", str(params_file)]
        if stage == "train":
            try:
                import dvclive  # noqa: F401
            except ImportError:
                cmd.append("--no-dvclive")
        print("$", " ".join(cmd), flush=True)
        t = time.perf_counter()
        subprocess.run(cmd, check=True)
        seconds = time.perf_counter() - t
        # the stage's DVC-tracked metrics and how it ran (times, throughput, memory: metrics/runtime/<stage>.json)
        runtime = {k: v for k, v in read_runtime(stage).items() if k != "history"}
        metrics = json.loads(Path(OUTPUTS[stage]).read_text(encoding="utf-8"))
        row["stages"][stage] = {"wall_seconds": seconds, "phases": stage_phases(stage, runtime, seconds),
                                "metrics": {**metrics, **runtime}}
    print(phase_table(row["stages"]))
    common.write_results(args.out, f"recipe-{args.name}", [row], {
        "command": "python -m bench.run_recipe " + " ".join(sys.argv[1:])})


if __name__ == "__main__":
    main()
