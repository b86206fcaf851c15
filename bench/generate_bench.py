"""Evaluation generation speed: greedy decoding of processed validation prompts, batched (the evaluate
stage's table2text.generation.generate) against one prompt at a time, and the share of identical outputs.

    python -m bench.generate_bench --data PROCESSED_VALIDATION.jsonl [--model DIR] [--batch-sizes 128 500]
        [--batch-tokens 0 65536] [--dtypes float32 bfloat16] [--fp32-matmul ieee tf32]
        [--caches dynamic static] [--sequential 40] [--sequential-for tf32]

For each dtype (and, in float32, each --fp32-matmul precision) the first --sequential prompts are decoded
one at a time (the reference; --sequential-for limits which precisions get one, it is slow), then every
(cache, batch size, batch token budget) variant decodes all prompts; identical_to_sequential compares a
variant with the reference of its own precision, same_as_first_precision with the same variant in the
first precision listed. prefill_s times the model's forward over the variant's batches alone (the prompt
pass of generation, logits of the last position only), so decoding is seconds - prefill_s. Writes
bench/results/<date>-<gpu>-generate.json and appends rows to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from bench import common
from table2text.model import sources as model_sources
from table2text.generation import FP32_MATMUL, left_pad, fp32_matmul_precision, generate, pad_token_id, plan_batches


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(model, tok, prompts, max_new, batch, cache, batch_tokens, fp32_matmul):
    sync()
    t = time.perf_counter()
    compiled = cache == "static_compiled"
    out = generate(model, tok, prompts, max_new, batch, progress=False, cache="static" if compiled else cache,
                   compile_decoding=compiled, batch_tokens=batch_tokens, fp32_matmul=fp32_matmul)
    sync()
    return out, time.perf_counter() - t


@torch.inference_mode()
def prefill_seconds(model, tok, prompts, batch, batch_tokens, max_new, fp32_matmul) -> tuple[float, int]:
    """(seconds of the prompt pass over generate's batches, padded prompt tokens it computed)."""
    encoded = tok(list(prompts), add_special_tokens=True)["input_ids"]
    batches = plan_batches([len(e) for e in encoded], batch, batch_tokens, max_new)
    with fp32_matmul_precision(fp32_matmul, model.device):  # as generate() multiplies
        sync()
        t, slots = time.perf_counter(), 0
        for indices in batches:
            ids, mask = left_pad([encoded[i] for i in indices], pad_token_id(tok), model.device)
            model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
            slots += ids.numel()
        sync()
        return time.perf_counter() - t, slots


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", default="packaged", help="model folder or model.name")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 500])
    parser.add_argument("--batch-tokens", type=int, nargs="+", default=[0], help="eval.batch_tokens values (0: none)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--fp32-matmul", nargs="+", default=["ieee"], choices=sorted(FP32_MATMUL),
                        help="eval.fp32_matmul values (float32 only)")
    parser.add_argument("--caches", nargs="+", default=["dynamic", "static"],
                        choices=["dynamic", "static", "static_compiled"],
                        help="static_compiled: transformers compiles the decoding step; a first untimed call "
                             "of the same batches pays the compilation (its time is recorded as compile_s)")
    parser.add_argument("--sequential", type=int, default=40, help="examples decoded one at a time (per precision)")
    parser.add_argument("--sequential-for", nargs="*", help="precisions (e.g. tf32, bfloat16) that get a "
                                                            "one-at-a-time reference (default: all)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke run)")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")

    prompts = [json.loads(line)["prompt"] for line in args.data.read_text(encoding="utf-8").splitlines() if line]
    model_dir = model_sources.resolve_model(args.model)
    tok = model_sources.load_tokenizer(model_dir)
    precisions = [(d, m) for d in args.dtypes for m in (args.fp32_matmul if d == "float32" else ["ieee"])]
    results, first_outputs = [], {}
    for dtype, matmul in precisions:
        label = dtype if dtype != "float32" else f"float32_{matmul}"
        model = model_sources.load_model(model_dir, dtype=getattr(torch, dtype), device=torch.device(args.device)).eval()
        for cache in args.caches:  # warm-up (CUDA context, kernels) of each cache kind
            if cache != "static_compiled":
                generate(model, tok, prompts[:8], 8, 8, progress=False, cache=cache, fp32_matmul=matmul)
        seq_out = None
        if args.sequential and (args.sequential_for is None or matmul in args.sequential_for
                                or dtype in args.sequential_for):
            seq_prompts = prompts[: args.sequential]
            seq_out, seq_s = timed(model, tok, seq_prompts, args.max_new_tokens, 1, "dynamic", 0, matmul)
            results.append({"name": f"{label}_one_at_a_time", "dtype": dtype, "fp32_matmul": matmul,
                            "cache": "dynamic", "batch_size": 1, "batch_tokens": 0, "examples": len(seq_prompts),
                            "seconds": seq_s, "examples_per_s": len(seq_prompts) / seq_s,
                            "identical_to_sequential": 1.0})
            print(json.dumps(results[-1]), flush=True)
        for cache in args.caches:
            for bs in args.batch_sizes:
                for budget in args.batch_tokens:
                    name = f"{label}_{cache}_batch_{bs}" + (f"_tokens_{budget}" if budget else "")
                    compile_s = None
                    try:
                        if cache == "static_compiled":
                            _, compile_s = timed(model, tok, prompts, args.max_new_tokens, bs, cache, budget, matmul)
                        if cuda:
                            torch.cuda.reset_peak_memory_stats()
                        out, secs = timed(model, tok, prompts, args.max_new_tokens, bs, cache, budget, matmul)
                        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
                        prefill_s, slots = prefill_seconds(model, tok, prompts, bs, budget, args.max_new_tokens,
                                                           matmul)
                    except Exception as err:  # recorded; the other variants still run
                        results.append({"name": name, "error": f"{type(err).__name__}: {err}"[:300]})
                        print(json.dumps(results[-1]), flush=True)
                        torch.cuda.empty_cache()
                        continue
                    key = (cache, bs, budget)
                    first = first_outputs.setdefault(key, out)
                    results.append({
                        "name": name, "dtype": dtype, "fp32_matmul": matmul, "cache": cache, "batch_size": bs,
                        "batch_tokens": budget, "examples": len(prompts), "seconds": secs,
                        "examples_per_s": len(prompts) / secs,
                        "identical_to_sequential": (sum(a == b for a, b in zip(out, seq_out)) / len(seq_out)
                                                    if seq_out else None),
                        "same_as_first_precision": sum(a == b for a, b in zip(out, first)) / len(out),
                        "prefill_s": prefill_s, "prefill_padded_tokens": slots,
                        "peak_allocated_gib": peak, "compile_s": compile_s,
                    })
                    print(json.dumps(results[-1]), flush=True)
        del model
        torch.cuda.empty_cache()
    common.write_results(args.out, "generate", results, {
        "data": str(args.data), "model": args.model, "max_new_tokens": args.max_new_tokens,
        "first_precision": list(precisions[0]),
        "command": "python -m bench.generate_bench " + " ".join(sys.argv[1:])})


if __name__ == "__main__":
    main()
