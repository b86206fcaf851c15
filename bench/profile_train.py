"""Where the train stage's step time goes on a GPU, and what the cheap levers change (issue #6).

    python -m bench.profile_train --data PROCESSED_TRAIN.jsonl --out OUT [--steps N]

1. torch.profiler over a few steps of stages.train.train (NF4, the default settings): the top operators
   by self CUDA time and by self CPU time, and the GPU-busy fraction of the step (kernel time / wall time),
   written to OUT/profile-<variant>.txt.
2. Throughput of variants of the same loop (micro-batch token budgets, nf4_fp32_upcast on, bf16,
   train.compile_layers), each measured like bench/train_bench.py's project rows;
   written to bench/results/<date>-<gpu>-train-variants.json and BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from bench import common
from bench.train_bench import run_project
from table2text.model import sources as model_sources
from table2text.params import load_params
from table2text.io.readers import read_processed
from table2text.training import loop


def profile(params, records, model_dir, out: Path, name: str, extra: dict) -> dict:
    from torch.profiler import ProfilerActivity, profile as torch_profile, schedule

    p = copy.deepcopy(params)
    p["train"].update({"max_steps": 8, "device": "cuda", **extra})
    sched = schedule(wait=2, warmup=2, active=4)
    stamps = []
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], schedule=sched) as prof:
        def on_step(step):
            stamps.append(time.perf_counter())
            prof.step()

        loop.train(p, records, None, checkpoint_dir=None, metrics_dir=None, model_dir=model_dir,
                          on_step=on_step, progress=False)
    events = prof.key_averages()
    wall = stamps[-1] - stamps[3]  # the 4 active steps
    # Kernels are the events without CPU time of their own; summing every event's device time would count
    # a kernel again in the op (or graph replay) that launched it.
    kernels = [e for e in events if e.self_cpu_time_total == 0 and e.self_device_time_total > 0
               and not e.key.startswith("ProfilerStep")]  # the step marker spans its kernels
    kernel_s = sum(e.self_device_time_total for e in kernels) / 1e6
    launched = sum(e.count for e in kernels)
    text = [f"variant {name} {extra}: 4 active steps, wall {wall:.3f} s, kernel time {kernel_s:.3f} s "
            f"(GPU busy {kernel_s / wall:.0%}), {launched} kernels ({launched / 4:.0f} a step)",
            events.table(sort_by="self_device_time_total", row_limit=30),
            events.table(sort_by="self_cpu_time_total", row_limit=30)]
    (out / f"profile-{name}.txt").write_text("\n\n".join(text), encoding="utf-8")
    print(text[0], flush=True)
    return {"name": f"profile_{name}", "wall_4_steps_s": wall, "kernel_s": kernel_s,
            "gpu_busy_fraction": kernel_s / wall, "kernels_per_step": launched / 4}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--skip-profile", action="store_true")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    params = load_params()
    records = read_processed(args.data)
    model_dir = model_sources.resolve_model("packaged")
    profiles, results = [], []
    if not args.skip_profile:
        for name, extra in (("nf4", {}), ("bf16", {"quantization": "none"})):
            try:
                profiles.append(profile(params, records, model_dir, args.out, name, extra))
            except Exception as err:  # recorded; the throughput variants still run
                profiles.append({"name": f"profile_{name}", "error": f"{type(err).__name__}: {err}"})
    variants = {
        "nf4_default": ("nf4", {}),
        "nf4_tokens_2048": ("nf4", {"micro_batch_tokens": 2048}),
        "nf4_tokens_8192": ("nf4", {"micro_batch_tokens": 8192}),
        "nf4_fp32_upcast": ("nf4", {"nf4_fp32_upcast": True}),
        "bf16_default": ("none", {}),
        "nf4_compiled_layers": ("nf4", {"compile_layers": True}),
        "bf16_compiled_layers": ("none", {"compile_layers": True}),
    }
    for name, (quant, extra) in variants.items():
        try:
            res = run_project(name, params, records, model_dir, quant=quant, steps=args.steps,
                              warmup=5 if extra.get("compile_layers") else 3, extra=extra)
        except Exception as err:  # recorded, the other variants still run
            res = {"name": name, "error": f"{type(err).__name__}: {str(err)[:300]}"}
        print(json.dumps(res), flush=True)
        results.append(res)
        torch.cuda.empty_cache()
    common.write_results(args.out, "train-variants", results, {
        "data": str(args.data), "records": len(records), "profiles": profiles,
        "command": "python -m bench.profile_train " + " ".join(sys.argv[1:])})


if __name__ == "__main__":
    main()
