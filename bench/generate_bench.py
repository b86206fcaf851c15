"""Evaluation generation speed: greedy decoding of processed validation prompts, batched (the evaluate
stage's stages.generation.generate) against one prompt at a time, and the share of identical outputs.

    python -m bench.generate_bench --data PROCESSED_VALIDATION.jsonl [--model DIR] [--batch-sizes 128 500]
        [--dtypes float32 bfloat16] [--caches dynamic static] [--sequential 40]

For each dtype the first --sequential prompts are decoded one at a time (the reference), then every
(cache, batch size) variant decodes all prompts; a variant's identical_to_sequential compares it with the
reference of its own dtype. Writes bench/results/<date>-<gpu>-generate.json and appends rows to
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from bench import common
from stages import model_sources
from stages.generation import generate


def timed(model, tok, prompts, max_new, batch, cache):
    torch.cuda.synchronize()
    t = time.perf_counter()
    compiled = cache == "static_compiled"
    out = generate(model, tok, prompts, max_new, batch, progress=False, cache="static" if compiled else cache,
                   compile_decoding=compiled)
    torch.cuda.synchronize()
    return out, time.perf_counter() - t


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", default="packaged", help="model folder or model.name")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 500])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--caches", nargs="+", default=["dynamic", "static"],
                        choices=["dynamic", "static", "static_compiled"],
                        help="static_compiled: transformers compiles the decoding step; a first untimed call "
                             "of the same batches pays the compilation (its time is recorded as compile_s)")
    parser.add_argument("--sequential", type=int, default=40, help="examples decoded one at a time (per dtype)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)

    prompts = [json.loads(line)["prompt"] for line in args.data.read_text(encoding="utf-8").splitlines() if line]
    model_dir = model_sources.resolve_model(args.model)
    tok = model_sources.load_tokenizer(model_dir)
    results = []
    for dtype in args.dtypes:
        model = model_sources.load_model(model_dir, dtype=getattr(torch, dtype), device=torch.device("cuda")).eval()
        for cache in args.caches:  # warm-up (CUDA context, kernels) of each cache kind
            if cache != "static_compiled":
                generate(model, tok, prompts[:8], 8, 8, progress=False, cache=cache)
        seq_prompts = prompts[: args.sequential]
        seq_out, seq_s = timed(model, tok, seq_prompts, args.max_new_tokens, 1, "dynamic")
        results.append({"name": f"{dtype}_one_at_a_time", "dtype": dtype, "cache": "dynamic", "batch_size": 1,
                        "examples": len(seq_prompts), "seconds": seq_s,
                        "examples_per_s": len(seq_prompts) / seq_s, "identical_to_sequential": 1.0,
                        "peak_allocated_gib": None, "compile_s": None})
        print(json.dumps(results[-1]), flush=True)
        for cache in args.caches:
            for bs in args.batch_sizes:
                compile_s = None
                if cache == "static_compiled":
                    try:
                        _, compile_s = timed(model, tok, prompts, args.max_new_tokens, bs, cache)
                    except Exception as err:  # recorded; the other variants still run
                        results.append({"name": f"{dtype}_{cache}_batch_{bs}", "error": f"{type(err).__name__}: {err}"[:300]})
                        continue
                torch.cuda.reset_peak_memory_stats()
                out, secs = timed(model, tok, prompts, args.max_new_tokens, bs, cache)
                same = sum(a == b for a, b in zip(out[: len(seq_out)], seq_out)) / len(seq_out)
                results.append({"name": f"{dtype}_{cache}_batch_{bs}", "dtype": dtype, "cache": cache,
                                "batch_size": bs, "examples": len(prompts), "seconds": secs,
                                "examples_per_s": len(prompts) / secs, "identical_to_sequential": same,
                                "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                                "compile_s": compile_s})
                print(json.dumps(results[-1]), flush=True)
        del model
        torch.cuda.empty_cache()
    common.write_results(args.out, "generate", results, {
        "data": str(args.data), "model": args.model, "max_new_tokens": args.max_new_tokens,
        "command": "python -m bench.generate_bench " + " ".join(sys.argv[1:])})


if __name__ == "__main__":
    main()
