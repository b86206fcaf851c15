"""Evaluation generation speed: greedy decoding of processed validation prompts, batched (the evaluate
stage's stages.generation.generate) against one prompt at a time, and the share of identical outputs.

    python -m bench.generate_bench --data PROCESSED_VALIDATION.jsonl [--model DIR] [--batch-sizes 64 256]

Writes bench/results/<date>-<gpu>-generate.json and appends rows to BENCHMARKS.md.
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


def timed(model, tok, prompts, max_new, batch):
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = generate(model, tok, prompts, max_new, batch, progress=False)
    torch.cuda.synchronize()
    return out, time.perf_counter() - t


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", default="packaged", help="model folder or model.name")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256, 512])
    parser.add_argument("--sequential", type=int, default=100, help="examples decoded one at a time")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)

    prompts = [json.loads(line)["prompt"] for line in args.data.read_text(encoding="utf-8").splitlines() if line]
    model_dir = model_sources.resolve_model(args.model)
    tok = model_sources.load_tokenizer(model_dir)
    model = model_sources.load_model(model_dir, device=torch.device("cuda")).eval()

    generate(model, tok, prompts[:8], 8, 8, progress=False)  # warm-up (CUDA context, kernels)
    seq_prompts = prompts[: args.sequential]
    seq_out, seq_s = timed(model, tok, seq_prompts, args.max_new_tokens, 1)
    results = [{"name": "one_at_a_time", "examples": len(seq_prompts), "seconds": seq_s,
                "examples_per_s": len(seq_prompts) / seq_s, "identical_to_sequential": 1.0}]
    for bs in args.batch_sizes:
        torch.cuda.reset_peak_memory_stats()
        out, secs = timed(model, tok, prompts, args.max_new_tokens, bs)
        same = sum(a == b for a, b in zip(out[: len(seq_out)], seq_out)) / len(seq_out)
        results.append({"name": f"batched_{bs}", "examples": len(prompts), "seconds": secs,
                        "examples_per_s": len(prompts) / secs, "identical_to_sequential": same,
                        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30})
        print(json.dumps(results[-1]), flush=True)
    common.write_results(args.out, "generate", results, {
        "data": str(args.data), "max_new_tokens": args.max_new_tokens,
        "command": "python -m bench.generate_bench " + " ".join(sys.argv[1:])})


if __name__ == "__main__":
    main()
