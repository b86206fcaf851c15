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
import json
import sys
from pathlib import Path

import torch

from bench import common
from bench.measure_train import profile, run_project
from table2text.model import sources as model_sources
from table2text.params import load_params
from table2text.io.readers import read_processed


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
