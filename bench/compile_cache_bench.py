"""Start-up of the train stage with compiled layers: a first run that compiles into an empty compile
cache, then the same run again in a new process that finds the cache filled (table2text.training.compile_cache).

    python -m bench.train_bench --compile-cache --data PROCESSED_TRAIN.jsonl [--steps N]
    python -m bench.compile_cache_bench --data PROCESSED_TRAIN.jsonl [--steps N] [--quant nf4|none]

Each run is a fresh Python process (as `dvc repro` starts the stage) running stages.train.train with
train.compile_layers true and CUDA graphs (the defaults otherwise), outputs off, for a few steps; it
reports the seconds from process start to the end of its first optimiser step, train()'s time outside
the steps (model load, tokenising, graph capture and compilation), the steady step time, and inductor's
cache hits and misses, which show whether the second run compiled or loaded. Writes
bench/results/<date>-<gpu>-compile-cache.json and a BENCHMARKS.md table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULT = "COMPILE_CACHE_RESULT "


def child(args) -> None:
    """One run in this process (the cache folder comes from TORCHINDUCTOR_CACHE_DIR)."""
    from table2text.training.compile_cache import cache_counters
    from table2text.phases import process_age
    from table2text.params import load_params
    from table2text.io.readers import read_processed
    from table2text.training.loop import train

    params = load_params()
    params["train"].update({"quantization": args.quant, "compile_layers": True, "max_steps": args.steps,
                            "device": "cuda", "logging_steps": 1})
    records = read_processed(args.data)
    stamps = []
    stats = train(params, records, None, checkpoint_dir=None, metrics_dir=None, dvclive=False,
                  on_step=lambda step: stamps.append((process_age(), time.perf_counter())), progress=False)
    steady = (stamps[-1][1] - stamps[1][1]) / (len(stamps) - 2) if len(stamps) > 2 else None
    print(RESULT + json.dumps({
        "first_step_done_s": stamps[0][0],  # since the process started: interpreter, imports, load, compile
        "train_outside_steps_s": stats["wall_seconds"] - stats["train_seconds"],
        "startup_before_train_s": stats["startup_seconds"],
        "steady_step_s": steady,
        "tokens_per_s": stats["tokens_per_s"],
        "cache": cache_counters(),
        "cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
    }), flush=True)


def run_twice(data: Path, steps: int, quant: str, cache_dir: Path) -> list[dict]:
    cache_dir.mkdir(parents=True, exist_ok=True)
    if any(cache_dir.iterdir()):
        raise SystemExit(f"--cache-dir {cache_dir} is not empty: the first run must compile")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache_dir.resolve())}
    results = []
    for name in ("first_run_empty_cache", "second_run_filled_cache"):
        cmd = [sys.executable, "-m", "bench.compile_cache_bench", "--child", "--data", str(data),
               "--steps", str(steps), "--quant", quant]
        print("$", " ".join(cmd), flush=True)
        t = time.perf_counter()
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, encoding="utf-8")
        wall = time.perf_counter() - t
        sys.stdout.write(proc.stdout)
        lines = [l for l in proc.stdout.splitlines() if l.startswith(RESULT)]
        if proc.returncode or not lines:
            results.append({"name": name, "error": f"exit status {proc.returncode}"})
            continue
        res = {"name": name, "process_wall_s": wall, **json.loads(lines[-1][len(RESULT):])}
        print(json.dumps(res), flush=True)
        results.append(res)
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="processed train.jsonl")
    parser.add_argument("--steps", type=int, default=12, help="optimiser steps per run")
    parser.add_argument("--quant", default="nf4", choices=("nf4", "none"))
    parser.add_argument("--cache-dir", type=Path, help="an empty folder for the cache (default: a new temp folder)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    from bench import common

    cache_dir = args.cache_dir or Path(tempfile.mkdtemp(prefix="torch-compile-"))
    results = run_twice(args.data, args.steps, args.quant, cache_dir)
    common.write_results(args.out, "compile-cache", results, {
        "data": str(args.data), "steps": args.steps, "quantization": args.quant,
        "command": "python -m bench.compile_cache_bench " + " ".join(sys.argv[1:])})


if __name__ == "__main__":
    main()
