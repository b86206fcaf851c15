"""Does train.max_memory_gb hold? The train stage's step (stages.train.train) on synthetic batches with long
completions, under a fixed cap (default 5 GiB, the 6 GB laptop card's budget) and under `auto`; reports
each run's peak allocated memory against its cap.

    python -m bench.memory_bench --out FILE.json [--cap-gb 5] [--completion-tokens 128,512,1024]
                                 [--steps 3] [--device auto] [--model packaged] [--append-benchmarks]

Long completions are what the head's loss chunks cost memory for (every completion position reaches the
262,144-word head): before the chunk size and the memory model agreed, 512 completion positions went
1.45 GiB over a 5 GiB cap on an H200. On a CPU (`--device cpu`, with small sizes) it is a smoke test:
the peak there is the process's RSS, not comparable with a cap.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import gc
import json
import random
import sys
from pathlib import Path

import torch

from bench import common
from table2text.model import sources as model_sources
from table2text.training.batching import encode_record
from table2text.params import load_params
from table2text.training.loop import train

WORDS = ("team", "season", "scored", "points", "league", "match", "goals", "record", "title", "home", "away",
         "final", "round", "player", "club", "year", "won", "lost", "cup", "table", "rank", "games")


def synthetic_records(tokenizer, n: int, prompt_tokens: int, completion_tokens: int, seed: int = 0) -> list[dict]:
    """`n` processed records (prompt, completion) whose prompt and completion are at least the given
    numbers of tokens: random words, grown until the tokenizer says they are long enough."""
    rng = random.Random(seed)

    def text(tokens: int) -> str:
        words = []
        while True:
            words.extend(rng.choice(WORDS) for _ in range(max(8, tokens // 4)))
            candidate = " ".join(words)
            if len(tokenizer(candidate, add_special_tokens=False).input_ids) >= tokens:
                return candidate

    return [{"id": f"mem-{i}", "prompt": "Describe the table.\n" + text(prompt_tokens) + "\n",
             "completion": text(completion_tokens) + "<eos>"} for i in range(n)]


def run_one(name: str, params: dict, records: list[dict], model_dir: Path, tokenizer, cap, steps: int) -> dict:
    p = copy.deepcopy(params)
    p["train"].update({"max_memory_gb": cap, "max_steps": steps, "logging_steps": 1})
    stats = train(p, records, None, checkpoint_dir=None, metrics_dir=None, dvclive=False, model_dir=model_dir,
                  progress=False, tokenizer=tokenizer)
    completions = [len(ids) - prompt for ids, prompt in (encode_record(tokenizer, r) for r in records)]
    cap_used = stats["memory_cap_gb"]
    on_gpu = stats["peak_memory_kind"] == "cuda_max_allocated"
    return {
        "name": name,
        "max_memory_gb": cap,
        "cap_gb": cap_used,
        "peak_gb": stats["peak_memory_gb"],
        "peak_kind": stats["peak_memory_kind"],
        "under_cap": (stats["peak_memory_gb"] <= cap_used) if on_gpu and cap_used else None,
        "micro_batch_tokens": stats["micro_batch_tokens"],
        "row_tokens": stats["row_tokens"],
        "rows_per_micro_batch": stats["rows_per_micro_batch"],
        "gradient_checkpointing": stats["gradient_checkpointing"],
        "completion_tokens_min": min(completions),
        "completion_tokens_max": max(completions),
        "examples": len(records),
        "steps": stats["steps"],
        "final_loss": stats["final_loss"],
        "device": stats["device"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="results JSON file to write")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--model", default=None, help="model.name override (default: params.yaml's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quantization", default=None, help="train.quantization override (default: params.yaml's)")
    parser.add_argument("--cap-gb", type=float, default=5.0, help="the fixed cap to test (GiB)")
    parser.add_argument("--completion-tokens", default="128,512,1024",
                        help="comma-separated completion lengths; each is one run under --cap-gb")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--examples", type=int, default=16, help="examples (= one effective batch)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--no-auto", action="store_true", help="skip the max_memory_gb=auto run")
    parser.add_argument("--append-benchmarks", action="store_true", help="also append a table to BENCHMARKS.md")
    args = parser.parse_args(argv)

    params = load_params(args.params)
    params["train"].update({"device": args.device, "effective_batch": args.examples})
    if args.quantization:
        params["train"]["quantization"] = args.quantization
    model_dir = model_sources.resolve_model(args.model or params["model"]["name"])
    tokenizer = model_sources.load_tokenizer(model_dir)
    lengths = [int(x) for x in args.completion_tokens.split(",") if x.strip()]
    results = []
    for n in lengths:
        records = synthetic_records(tokenizer, args.examples, args.prompt_tokens, n)
        results.append(run_one(f"cap{args.cap_gb:g}-completion{n}", params, records, model_dir, tokenizer,
                               args.cap_gb, args.steps))
        gc.collect()  # the run's model and CUDA graph pools, before the next run (and auto's free-memory reading)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        print(json.dumps(results[-1]), flush=True)
    if not args.no_auto:
        records = synthetic_records(tokenizer, args.examples, args.prompt_tokens, max(lengths))
        results.append(run_one(f"auto-completion{max(lengths)}", params, records, model_dir, tokenizer, "auto",
                               args.steps))
        print(json.dumps(results[-1]), flush=True)
    doc = {"date": dt.date.today().isoformat(), "kind": "memory", "env": common.environment(),
           "command": "python -m bench.memory_bench " + " ".join(sys.argv[1:] if argv is None else argv),
           "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    if args.append_benchmarks:
        common.append_markdown(args.out)
    print(f"wrote {args.out}")
    # a run over its cap fails the bench: the cap is a promise
    return 1 if any(r["under_cap"] is False for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
