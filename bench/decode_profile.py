"""Where the graph decoder's time goes: per bucket, its prefill and its graphed steps timed apart (CUDA
events), with the lean Gemma 3 forward (one query's attention as matrix products, the default, or through
SDPA) and with the model's own forward; then torch.profiler's top kernels of one eager prefill and of one
eager step of each kind, in the largest bucket and in the bucket of the longest prompts.

    python -m bench.decode_profile --data PROCESSED_VALIDATION.jsonl [--dtype float32] [--batch-size 500]
        [--max-new-tokens 64] [--out bench/results]

Writes <out>/<date>-<gpu>-decode-profile.json and prints the tables.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import torch

from bench import common
from table2text import gemma3_step, graph_decode
from table2text.generation import end_token_ids, fp32_matmul_precision, pad_token_id
from table2text.model import sources as model_sources


def timed_buckets(model, encoded, args, stop, pad, device, lean=None) -> list[dict]:
    """Each bucket's prefill, graph capture and replayed steps, in seconds (events around each)."""
    rows = []
    for indices in graph_decode.plan_buckets([len(e) for e in encoded], args.batch_size, 0, args.max_new_tokens):
        bucket = graph_decode.BucketDecoder(model, [encoded[i] for i in indices], args.max_new_tokens, stop, pad,
                                             device, lean)
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        marks[0].record()
        bucket.prefill()
        marks[1].record()
        graph = bucket.capture_step()  # as the decoder's run() captures it
        marks[2].record()
        steps = args.max_new_tokens - 2
        for _ in range(steps):
            graph.replay()
        marks[3].record()
        torch.cuda.synchronize()
        rows.append({"rows": len(indices), "width": bucket.prompt_width,
                     "prompt_tokens": sum(len(encoded[i]) for i in indices),
                     "prefill_s": marks[0].elapsed_time(marks[1]) / 1000,
                     "capture_s": marks[1].elapsed_time(marks[2]) / 1000,
                     "steps": steps, "steps_s": marks[2].elapsed_time(marks[3]) / 1000})
        del bucket, graph
    return rows


def kernel_table(fn, limit: int = 20) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)
    return [{"name": e.key[:90], "calls": e.count, "cuda_ms": e.device_time_total / 1000,
             "cpu_ms": e.cpu_time_total / 1000} for e in events[:limit]]


@torch.inference_mode()
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", default="packaged")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    prompts = [json.loads(line)["prompt"] for line in args.data.read_text(encoding="utf-8").splitlines() if line]
    model_dir = model_sources.resolve_model(args.model)
    tok = model_sources.load_tokenizer(model_dir)
    model = model_sources.load_model(model_dir, dtype=getattr(torch, args.dtype), device=device).eval()
    encoded = tok(prompts, add_special_tokens=True)["input_ids"]
    stop, pad = end_token_ids(tok), pad_token_id(tok)
    with fp32_matmul_precision("tf32" if args.dtype == "float32" else "ieee", device):
        variants = (*((f"lean_{a}", gemma3_step.Gemma3Step(model, attention=a)) for a in gemma3_step.ATTENTIONS),
                    ("model", None))
        results = []
        for name, step in variants:
            timed_buckets(model, encoded[:16], args, stop, pad, device, step)  # warm-up
            buckets = timed_buckets(model, encoded, args, stop, pad, device, step)
            total = {k: sum(b[k] for b in buckets) for k in ("prefill_s", "capture_s", "steps_s")}
            results.append({"name": f"{name}_buckets", "buckets": buckets, "total": total})
        planned = graph_decode.plan_buckets([len(e) for e in encoded], args.batch_size, 0, args.max_new_tokens)
        for which, indices in (("largest", max(planned, key=len)),
                               ("longest", max(planned, key=lambda b: max(len(encoded[i]) for i in b)))):
            def fresh(step=None):  # a static cache takes one prefill: each profiled prefill gets a new bucket
                return graph_decode.BucketDecoder(model, [encoded[i] for i in indices], args.max_new_tokens, stop,
                                                   pad, device, step)

            for name, step in variants:
                if name in ("lean_matmul", "model"):  # the lean prefill is the same for every attention
                    results.append({"name": f"{which}_{name}_prefill_kernels", "rows": len(indices),
                                    "kernels": kernel_table(lambda: fresh(step).prefill())})
                bucket = fresh(step)
                bucket.prefill()
                results.append({"name": f"{which}_{name}_step_kernels", "rows": len(indices),
                                "kernels": kernel_table(bucket.step)})
    meta = {"prompts": len(prompts), "dtype": args.dtype, "max_new_tokens": args.max_new_tokens,
            "command": "python -m bench.decode_profile " + " ".join(sys.argv[1:] if argv is None else argv)}
    env = common.environment()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{dt.date.today().isoformat()}-{env['gpu'].replace(' ', '-')}-decode-profile.json"
    path.write_text(json.dumps({"kind": "decode-profile", "env": env, **meta, "results": results}, indent=2) + "\n",
                    encoding="utf-8")
    for row in results:
        print(f"== {row['name']}")
        if "total" in row:
            print(json.dumps(row["total"]))
            for b in row["buckets"]:
                print(json.dumps(b))
        for k in row.get("kernels", []):
            print(f"{k['cuda_ms']:9.3f} ms {k['calls']:5d}  {k['name']}")
    print(f"results: {path}")
    return path


if __name__ == "__main__":
    main()
