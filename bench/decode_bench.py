"""Decoding speed of the three greedy decoders on the same prompts in one process: today's path
(table2text.generation.generate, transformers' generate), the graph decoder (table2text.graph_decode, its step a
CUDA graph) and transformers' continuous batching (model.generate_batch); each with examples/s and the
share of outputs identical to one-at-a-time decoding in the same precision.

    python -m bench.decode_bench --data PROCESSED_VALIDATION.jsonl [--model packaged] [--dtypes float32]
        [--fp32-matmul tf32] [--batch-size 500] [--batch-tokens 0] [--max-new-tokens 64] [--sequential 50]
        [--decoders generate graph generate_batch] [--repeats 2] [--out bench/results]
    python -m bench.decode_bench --tiny --data FILE --out DIR    # CPU dry run: a tiny random Gemma 3

The reference: --sequential prompts spread evenly over the data, each decoded alone by today's path
(batch 1). Each decoder then decodes all prompts --repeats times (the first run pays CUDA-graph captures
and allocations, recorded as first_s); examples_per_s is from the fastest run; identical_to_sequential
compares its outputs on the reference prompts, same_as_generate all its outputs with today's path's. A
decoder that fails is recorded with its error and the others still run. Writes
<out>/<date>-<gpu>-decode.json (and a BENCHMARKS.md table, except --tiny) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import common
from table2text import gemma3_step, graph_decode
from table2text.model import sources as model_sources
from table2text.generation import FP32_MATMUL, decode_new_tokens, end_token_ids, fp32_matmul_precision, generate, pad_token_id

DECODERS = ("generate", "graph", "graph_model_step", "generate_batch")
# The tiny model of --tiny: Gemma 3's architecture and vocabulary (the real tokenizer), everything else
# small (as tests/conftest.py's), so the dry run takes seconds on a CPU.
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
            intermediate_size=128, vocab_size=262144, layer_types=["sliding_attention", "full_attention"],
            sliding_window=16, max_position_embeddings=2048, bos_token_id=2, eos_token_id=1, pad_token_id=0,
            tie_word_embeddings=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tiny_model_dir(folder: Path) -> Path:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    Gemma3ForCausalLM(Gemma3TextConfig(**TINY)).save_pretrained(folder, safe_serialization=True)
    model_sources.load_tokenizer(model_sources.resolve_model("packaged")).save_pretrained(folder)
    return folder


def sample_indices(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n) (all of them when k >= n)."""
    if k >= n:
        return list(range(n))
    return sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)})


@torch.inference_mode()
def generate_batch(model, tokenizer, prompts: list[str], max_new_tokens: int, small: bool = False) -> list[str]:
    """transformers' continuous batching, greedy, the project's end tokens; one string per prompt, in order.
    small: a fixed small paged cache (its default sizing, meant for GPU memory, filled a CPU's RAM)."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    stop = end_token_ids(tokenizer)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop,
                              pad_token_id=pad_token_id(tokenizer))
    encoded = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    cb_config = ContinuousBatchingConfig(num_blocks=16, max_batch_tokens=256, max_requests_per_batch=4) if small else None
    results = model.generate_batch(inputs=encoded, generation_config=config, continuous_batching_config=cb_config,
                                   progress_bar=False)
    outputs = list(results.values())  # generate_batch orders them as the inputs
    failed = [o.request_id for o in outputs if o.error is not None]
    if len(outputs) != len(prompts) or failed:
        raise RuntimeError(f"generate_batch returned {len(outputs)} of {len(prompts)} results, {len(failed)} failed")
    return [decode_new_tokens(tokenizer, list(o.generated_tokens), set(stop)) for o in outputs]


def run_decoder(name, model, tok, prompts, args, matmul, device):
    if name == "generate_batch":
        with fp32_matmul_precision(matmul, device):
            return generate_batch(model, tok, prompts, args.max_new_tokens, small=device.type == "cpu")
    # graph_model_step: the graph decoder with the model's own forward as its step (the lean step's baseline)
    decoder, lean_step = ("graph", False) if name == "graph_model_step" else (name, None)
    return generate(model, tok, prompts, args.max_new_tokens, args.batch_size, device=device, progress=False,
                    cache="static", batch_tokens=args.batch_tokens, fp32_matmul=matmul, decoder=decoder,
                    lean_step=lean_step)


def markdown(rows: list[dict]) -> str:
    lines = ["| run | examples/s | first run (s) | fastest run (s) | identical to one at a time | "
             "same as generate | peak allocated (GiB) | buckets |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['name']} | failed: {r['error'][:120]} | | | | | | |")
            continue
        fmt = (lambda v, f: "–" if v is None else format(v, f))
        lines.append(f"| {r['name']} | {fmt(r['examples_per_s'], '.1f')} | {fmt(r['first_s'], '.2f')} | "
                     f"{fmt(r['seconds'], '.2f')} | {r['identical']} | {r['same_as_generate']} | "
                     f"{fmt(r['peak_allocated_gib'], '.2f')} | {r['buckets'] or '–'} |")
    return "\n".join(lines)


def main(argv=None):
    planned = graph_decode.BUCKET_COST_SLOTS, graph_decode.STEP_ATTENTION, graph_decode.PREFILL_CHUNK_SLOTS
    try:
        return _main(argv)
    finally:  # the bench sets them per variant; put back for whatever runs next in this process
        graph_decode.BUCKET_COST_SLOTS, graph_decode.STEP_ATTENTION, graph_decode.PREFILL_CHUNK_SLOTS = planned


def _main(argv):
    planned_attention, planned_chunk = graph_decode.STEP_ATTENTION, graph_decode.PREFILL_CHUNK_SLOTS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="processed validation jsonl (a 'prompt' a line)")
    parser.add_argument("--model", default="packaged", help="model folder or model.name")
    parser.add_argument("--limit", type=int, default=0, help="first N prompts only (0: all)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--batch-tokens", type=int, default=0, help="eval.batch_tokens (0: none)")
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    parser.add_argument("--fp32-matmul", default="tf32", choices=sorted(FP32_MATMUL))
    parser.add_argument("--decoders", nargs="+", default=list(DECODERS), choices=DECODERS)
    parser.add_argument("--bucket-costs", type=int, nargs="+", default=[graph_decode.BUCKET_COST_SLOTS],
                        help="graph decoder: its cost of a length bucket in cache slots (one run each)")
    parser.add_argument("--attentions", nargs="+", default=[graph_decode.STEP_ATTENTION],
                        choices=gemma3_step.ATTENTIONS, help="graph decoder: its lean step's attention (one run each)")
    parser.add_argument("--prefill-chunks", type=int, nargs="+", default=[graph_decode.PREFILL_CHUNK_SLOTS],
                        help="graph decoder: its cost of a prefill chunk in slots, 0 = one prefill a bucket "
                             "(one run each)")
    parser.add_argument("--sequential", type=int, default=50, help="reference prompts decoded one at a time")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each decoder")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="CPU dry run on a tiny random Gemma 3 (seconds)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    device = torch.device("cpu" if args.tiny else args.device)
    cuda = device.type == "cuda"

    prompts = [json.loads(line)["prompt"] for line in args.data.read_text(encoding="utf-8").splitlines() if line]
    if args.limit:
        prompts = prompts[: args.limit]
    scratch = tempfile.TemporaryDirectory()
    model_dir = tiny_model_dir(Path(scratch.name)) if args.tiny else model_sources.resolve_model(args.model)
    tok = model_sources.load_tokenizer(model_dir)
    ref_idx = sample_indices(len(prompts), args.sequential)
    results = []
    for dtype in args.dtypes:
        matmul = args.fp32_matmul if dtype == "float32" else "ieee"
        label = f"{dtype}_{matmul}" if dtype == "float32" else dtype
        model = model_sources.load_model(model_dir, dtype=getattr(torch, dtype), device=device).eval()
        for name in args.decoders:  # warm-up: CUDA context, kernels, cuBLAS workspaces
            if name != "generate_batch":
                run_decoder(name, model, tok, prompts[:8], argparse.Namespace(**{**vars(args), "max_new_tokens": 8}),
                            matmul, device)
        sync(device)
        t = time.perf_counter()
        reference = [generate(model, tok, [prompts[i]], args.max_new_tokens, 1, device=device, progress=False,
                              cache="dynamic", fp32_matmul=matmul)[0] for i in ref_idx]
        sync(device)
        ref_s = time.perf_counter() - t
        results.append({"name": f"{label}_one_at_a_time", "dtype": dtype, "fp32_matmul": matmul,
                        "decoder": "generate", "buckets": None, "bucket_cost": None, "examples": len(ref_idx), "first_s": ref_s, "seconds": ref_s,
                        "examples_per_s": len(ref_idx) / ref_s, "identical": f"{len(ref_idx)}/{len(ref_idx)}",
                        "identical_to_sequential": 1.0, "same_as_generate": None, "peak_allocated_gib": None,
                        "error": None})
        print(json.dumps(results[-1]), flush=True)
        baseline = None
        variants = [(name, cost, attention, chunk) for name in args.decoders
                    for cost in (args.bucket_costs if name.startswith("graph") else [None])
                    for attention in (args.attentions if name == "graph" else [None])
                    for chunk in (args.prefill_chunks if name == "graph" else [None])]
        for name, cost, attention, chunk in variants:
            batching = "" if name == "generate_batch" else f"_batch_{args.batch_size}"  # it sizes its own batches
            row = {"name": f"{label}_{name}{batching}" + (f"_bucket_cost_{cost}" if len(args.bucket_costs) > 1
                                                          and cost is not None else "")
                   + (f"_{attention}" if len(args.attentions) > 1 and attention is not None else "")
                   + (f"_prefill_chunk_{chunk}" if len(args.prefill_chunks) > 1 and chunk is not None else ""),
                   "dtype": dtype, "fp32_matmul": matmul, "decoder": name, "buckets": None, "bucket_cost": None,
                   "attention": attention, "prefill_chunk": chunk, "examples": len(prompts)}
            graph_decode.STEP_ATTENTION = attention or planned_attention  # what generate(decoder="graph") steps with
            graph_decode.PREFILL_CHUNK_SLOTS = planned_chunk if chunk is None else chunk
            if cost is not None:
                graph_decode.BUCKET_COST_SLOTS = cost  # what generate(decoder="graph") plans its buckets with
                encoded = tok(prompts, add_special_tokens=True)["input_ids"]
                row["buckets"] = len(graph_decode.plan_buckets([len(e) for e in encoded], args.batch_size,
                                                               args.batch_tokens, args.max_new_tokens, cost))
                row["bucket_cost"] = cost
            try:
                times = []
                if cuda:
                    torch.cuda.empty_cache()  # generate_batch sizes its cache by the free memory it sees
                    torch.cuda.reset_peak_memory_stats(device)
                for _ in range(args.repeats):
                    sync(device)
                    t = time.perf_counter()
                    out = run_decoder(name, model, tok, prompts, args, matmul, device)
                    sync(device)
                    times.append(time.perf_counter() - t)
            except Exception as err:  # recorded; the other decoders still run
                results.append({**row, "first_s": None, "seconds": None, "examples_per_s": None, "identical": None,
                                "identical_to_sequential": None, "same_as_generate": None,
                                "peak_allocated_gib": None, "error": f"{type(err).__name__}: {err}"[:300]})
                print(json.dumps(results[-1]), flush=True)
                if cuda:
                    torch.cuda.empty_cache()
                continue
            if name == "generate":
                baseline = out
            same = sum(out[i] == r for i, r in zip(ref_idx, reference))
            results.append({**row, "first_s": times[0], "seconds": min(times),
                            "examples_per_s": len(prompts) / min(times), "identical": f"{same}/{len(ref_idx)}",
                            "identical_to_sequential": same / len(ref_idx) if ref_idx else None,
                            "same_as_generate": (f"{sum(a == b for a, b in zip(out, baseline))}/{len(out)}"
                                                 if baseline is not None else None),
                            "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
                            "error": None})
            print(json.dumps(results[-1]), flush=True)
        del model
        if cuda:
            torch.cuda.empty_cache()
    meta = {"data": str(args.data), "model": "tiny-random" if args.tiny else args.model, "prompts": len(prompts),
            "max_new_tokens": args.max_new_tokens, "reference_indices": ref_idx,
            "command": "python -m bench.decode_bench " + " ".join(sys.argv[1:] if argv is None else argv)}
    if args.tiny:  # a dry run: its numbers are no benchmark, so BENCHMARKS.md gets no table
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / "decode-tiny.json"
        path.write_text(json.dumps({"kind": "decode-tiny", "env": common.environment(), **meta,
                                    "results": results}, indent=2) + "\n", encoding="utf-8")
    else:
        path = common.write_results(args.out, "decode", results, meta)
    print(markdown(results))
    print(f"results: {path}")
    scratch.cleanup()
    return path


if __name__ == "__main__":
    main()
