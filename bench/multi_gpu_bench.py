"""Data-parallel scaling of the train stage: tokens/s on N GPUs against one GPU at the same per-GPU load,
and the loss curve against one GPU with the same effective batch and seed.

    python -m bench.multi_gpu_bench --data PROCESSED_TRAIN.jsonl [--gpus 1 2] [--per-gpu-batch 16]
        [--steps 40] [--warmup 5] [--set group.key=value ...]

Each run is `python -m stages.train --params <params> --no-dvclive` (what dvc.yaml runs; train.num_gpus
> 1 relaunches it under torchrun) in a fresh working folder holding only data/processed/train.jsonl, so
no checkpoint of another run is resumed. Runs, for --gpus 1 2: 1 GPU with effective batch 16, 2 GPUs
with 32 (the same 16 examples per GPU per step, same micro_batch_tokens), and 1 GPU with 32 (the same
batches as the 2-GPU run, for the loss curve). Throughput is over the steps after --warmup, from the
per-step log kept in the final checkpoint. Writes bench/results/<date>-<gpu>-multi-gpu.json and
appends a table to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench import common
from bench.run_recipe import apply_override
from table2text.params import load_params
from table2text.runtime import read_runtime
from table2text.training.schedule import batch_indices
from table2text.io.readers import read_processed

REPO = Path(__file__).resolve().parents[1]


def run_stage(params: dict, data: Path, folder: Path) -> dict:
    """Run the train stage in `folder`; returns metrics/train.json with metrics/runtime/train.json, and the
    per-step log."""
    (folder / "data" / "processed").mkdir(parents=True)
    try:
        (folder / "data" / "processed" / "train.jsonl").symlink_to(data.resolve())
    except OSError:  # Windows without the symlink privilege: a copy reads the same
        shutil.copyfile(data, folder / "data" / "processed" / "train.jsonl")
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    cmd = [sys.executable, "-m", "stages.train", "--params", "params.yaml", "--no-dvclive"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    print(f"$ (cd {folder} && {' '.join(cmd)})  # num_gpus={params['train']['num_gpus']}", flush=True)
    t = time.perf_counter()
    subprocess.run(cmd, cwd=folder, env=env, check=True)
    wall = time.perf_counter() - t
    stats = {**json.loads((folder / "metrics" / "train.json").read_text(encoding="utf-8")),
             **read_runtime("train", folder / "metrics" / "runtime")}  # world size, memory, times
    last = sorted((folder / "checkpoints").glob("step-*"))[-1]
    history = json.loads((last / "state.json").read_text(encoding="utf-8"))["history"]
    return {"stats": stats, "history": history, "wall": wall}


def steady_throughput(history: list[dict], sizes: list[int], warmup: int) -> tuple[float, float, float]:
    """(tokens/s, samples/s, seconds per step) over the logged steps after `warmup`; sizes[i] is the
    number of examples of step i+1 (each row logs one step: logging_steps 1)."""
    rows = [r for r in history if r["step"] > warmup]
    seconds = [sizes[r["step"] - 1] / r["samples_per_s"] for r in rows]
    tokens = sum(r["tokens_per_s"] * s for r, s in zip(rows, seconds))
    return tokens / sum(seconds), sum(sizes[r["step"] - 1] for r in rows) / sum(seconds), sum(seconds) / len(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="processed train.jsonl (stages.preprocess output)")
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2], help="GPU counts to run (1 is always run)")
    parser.add_argument("--per-gpu-batch", type=int, default=16, help="examples per GPU per optimiser step")
    parser.add_argument("--steps", type=int, default=40, help="measured optimiser steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the throughput")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="params override")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)

    base = load_params(REPO / "params.yaml")
    for assignment in args.set:
        apply_override(base, assignment)
    n_records = len(read_processed(args.data))
    gpus = sorted(set(args.gpus) | {1})
    # (GPUs, effective batch): each count at the same per-GPU load, and one GPU at each multi-GPU batch
    plan = [(n, args.per_gpu_batch * n) for n in gpus] + [(1, args.per_gpu_batch * n) for n in gpus if n > 1]
    work = Path(tempfile.mkdtemp(prefix="multi-gpu-bench-"))
    runs = {}
    for n, batch in plan:
        params = json.loads(json.dumps(base))
        params["train"].update(num_gpus=n, effective_batch=batch, max_steps=args.steps + args.warmup,
                               save_steps=args.steps + args.warmup, logging_steps=1)
        params["train"].setdefault("device", "auto")
        runs[(n, batch)] = run_stage(params, args.data, work / f"{n}gpu-eb{batch}")

    seed = int(base["train"]["seed"])
    results = []
    for (n, batch), run in runs.items():
        sizes = [len(batch_indices(s, n_records, batch, seed)) for s in range(args.steps + args.warmup)]
        tokens_per_s, samples_per_s, step_s = steady_throughput(run["history"], sizes, args.warmup)
        results.append({"name": f"{n}gpu-eb{batch}", "num_gpus": n, "effective_batch": batch,
                        "micro_batch_tokens": run["stats"]["micro_batch_tokens"], "tokens_per_s": tokens_per_s,
                        "samples_per_s": samples_per_s, "step_time_s": step_s,
                        "peak_memory_gb": run["stats"]["peak_memory_gb"], "final_loss": run["stats"]["final_loss"],
                        "stage_wall_s": run["wall"], "loss_curve": [r["loss"] for r in run["history"]]})
    by_name = {r["name"]: r for r in results}
    one_gpu = by_name[f"1gpu-eb{args.per_gpu_batch}"]
    for r in results:
        # scaling: against one GPU doing the same examples per GPU per step
        same_load = r["effective_batch"] // r["num_gpus"] == args.per_gpu_batch
        r["scaling_vs_1gpu"] = r["tokens_per_s"] / one_gpu["tokens_per_s"] if same_load else None
        # loss: against one GPU with the same effective batch (the same batches, the same schedule)
        ref = by_name[f"1gpu-eb{r['effective_batch']}"]
        diffs = [abs(a - b) for a, b in zip(r["loss_curve"], ref["loss_curve"])]
        r["loss_max_abs_diff_vs_1gpu"] = max(diffs) if r["num_gpus"] > 1 else None
        print(json.dumps({k: v for k, v in r.items() if k != "loss_curve"}), flush=True)
    common.write_results(args.out, "multi-gpu", results, {
        "data": str(args.data), "records": n_records, "steps_measured": args.steps, "warmup_steps": args.warmup,
        "command": "python -m bench.multi_gpu_bench " + " ".join(sys.argv[1:] if argv is None else argv)})


if __name__ == "__main__":
    main()
