"""Training throughput: the original recipe, a plain Trainer, TRL + Liger, and the project's train stage,
in one process, on one GPU, on the same processed data, each for a fixed number of optimiser steps with
an effective batch of 16.

    python -m bench.train_bench --data PROCESSED_TRAIN.jsonl [--only NAME ...] [--steps N]
    python -m bench.train_bench --compile-cache --data PROCESSED_TRAIN.jsonl [--steps N]   (bench.compile_cache_bench)

Writes bench/results/<date>-<gpu>-train.json and appends rows to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import torch

from bench import common
from bench.measure_train import profile, run_project
from table2text.model import sources as model_sources
from table2text.params import load_params
from table2text.io.readers import read_processed
from table2text.training.loop import train


# train settings of the LoRA levers' runs (NF4, CUDA graphs as by default)
LORA_LEVERS = {
    "project_nf4_bf16lora": {"lora_compute_dtype": "auto"},
    "project_nf4_fused": {"fuse_lora": True},
    "project_nf4_fused_bf16lora": {"fuse_lora": True, "lora_compute_dtype": "auto"},
    "project_nf4_fused_compiled": {"fuse_lora": True, "lora_compute_dtype": "auto", "compile_layers": True},
}


def check_graphs(params, records, model_dir, steps=4, variants=None) -> dict:
    """Each variant (by default: CUDA graphs; CUDA graphs over compiled layers; and those two with the LoRA
    levers) against eager PEFT on the same steps without dropout: per-step losses and the trained adapters."""
    from safetensors.torch import load_file

    levers = {"fuse_lora": True, "lora_compute_dtype": "auto"}
    variants = variants or {"graphs": {"cuda_graphs": True},
                            "compiled_graphs": {"cuda_graphs": True, "compile_layers": True},
                            "fused_bf16lora_graphs": {"cuda_graphs": True, **levers},
                            "fused_bf16lora_compiled_graphs": {"cuda_graphs": True, "compile_layers": True, **levers}}
    runs = {}
    for name, extra in {"eager": {"cuda_graphs": False}, **variants}.items():
        p = copy.deepcopy(params)
        p["lora"]["dropout"] = 0.0
        p["train"].update({"max_steps": steps, "device": "cuda", "logging_steps": 1, **extra})
        torch._dynamo.reset()  # each variant compiles afresh (see run_project)
        out = Path(tempfile.mkdtemp(prefix="graphs-check-"))
        stats = train(p, records, out / "adapter", checkpoint_dir=None, metrics_dir=None, model_dir=model_dir,
                      progress=False)
        runs[name] = ([r["loss"] for r in stats["history"]], load_file(out / "adapter" / "adapter_model.safetensors"))
    loss_e, ad_e = runs.pop("eager")
    report = {"steps": steps, "loss_eager": loss_e}
    for name, (loss, adapter) in runs.items():
        report[name] = {"loss": loss,
                        "loss_max_rel_diff": max(abs(a - b) / abs(b) for a, b in zip(loss, loss_e)),
                        "adapter_max_abs_diff": max(float((adapter[k] - ad_e[k]).abs().max()) for k in ad_e)}
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="processed train.jsonl (stages.preprocess output)")
    parser.add_argument("--model", default="packaged", help="model.name (default: the packaged Gemma 3 270M)")
    parser.add_argument("--steps", type=int, default=30, help="measured optimiser steps per run")
    parser.add_argument("--only", nargs="*", help="run only these names")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--check-graphs", action="store_true",
                        help="first compare CUDA graphs, and graphs over compiled layers, with eager")
    parser.add_argument("--profile", action="store_true",
                        help="first profile the project's NF4 step: eager, as CUDA graphs, and compiled layers under graphs "
                             "(bench.profile_train)")
    parser.add_argument("--compile-cache", action="store_true",
                        help="only measure start-up with compiled layers, first (empty compile cache) vs second run "
                             "(bench.compile_cache_bench)")
    args = parser.parse_args(argv)
    if args.compile_cache:
        from bench import compile_cache_bench

        return compile_cache_bench.main(["--data", str(args.data), "--steps", str(min(args.steps, 12)),
                                         "--out", str(args.out)])

    from bench.baselines import run_hf_trainer, run_trl_liger

    params = load_params()
    records = read_processed(args.data)
    model_dir = model_sources.resolve_model(args.model)
    tokenizer = model_sources.load_tokenizer(model_dir)
    lora, lr = params["lora"], float(params["train"]["learning_rate"])
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    short = max(4, args.steps // 5)  # the original recipe is ~30x slower: fewer steps
    runs = {  # the project first: a call cut short by its time limit still has its numbers
        "project_nf4": lambda: run_project("project_nf4", params, records, model_dir, quant="nf4",
                                           steps=args.steps * 3, warmup=3),
        "project_nf4_eager": lambda: run_project("project_nf4_eager", params, records, model_dir, quant="nf4",
                                                 steps=args.steps * 3, warmup=3, extra={"cuda_graphs": False}),
        "project_nf4_bnb_eager": lambda: run_project(
            "project_nf4_bnb_eager", params, records, model_dir, quant="nf4", steps=args.steps, warmup=3,
            extra={"cuda_graphs": False, "nf4_dequantize_once": False}),
        "project_nf4_compiled": lambda: run_project("project_nf4_compiled", params, records, model_dir,
                                                    quant="nf4", steps=args.steps * 3, warmup=3,
                                                    extra={"compile_layers": True}),
        # the LoRA levers (table2text.training.fused_lora): adapters in bf16, q/k/v and gate/up fused, both,
        # and both under compiled layers
        **{name: (lambda name=name, extra=extra: run_project(name, params, records, model_dir, quant="nf4",
                                                            steps=args.steps * 3, warmup=3, extra=extra))
           for name, extra in LORA_LEVERS.items()},
        "project_bf16": lambda: run_project("project_bf16", params, records, model_dir, quant="none",
                                            steps=args.steps * 3, warmup=3),
        "project_bf16_compiled": lambda: run_project("project_bf16_compiled", params, records, model_dir,
                                                     quant="none", steps=args.steps * 3, warmup=3,
                                                     extra={"compile_layers": True}),
        "project_nf4_5gb": lambda: run_project("project_nf4_5gb", params, records, model_dir, quant="nf4",
                                               steps=args.steps * 3, warmup=3, extra={"max_memory_gb": 5}),
        "original_recipe": lambda: run_hf_trainer(
            "original_recipe", model_dir, tokenizer, records, steps=short, warmup=1, batch=1, accum=16,
            grad_ckpt=True, attn="eager", quant="nf4", lora=lora, lr=lr, out_dir=work / "a"),
        "plain_trainer_b16": lambda: run_hf_trainer(
            "plain_trainer_b16", model_dir, tokenizer, records, steps=args.steps, warmup=2, batch=16, accum=1,
            grad_ckpt=False, attn="sdpa", quant="nf4", lora=lora, lr=lr, out_dir=work / "b"),
        "trl_liger_b16": lambda: run_trl_liger(
            "trl_liger_b16", model_dir, tokenizer, records, steps=args.steps, warmup=2, batch=16, quant="nf4",
            lora=lora, lr=lr, out_dir=work / "c"),
        "trl_liger_bf16_b16": lambda: run_trl_liger(
            "trl_liger_bf16_b16", model_dir, tokenizer, records, steps=args.steps, warmup=2, batch=16, quant="none",
            lora=lora, lr=lr, out_dir=work / "d"),
        # not the recipe's effective batch: the peer's best throughput at any batch
        "trl_liger_b64": lambda: run_trl_liger(
            "trl_liger_b64", model_dir, tokenizer, records, steps=args.steps, warmup=2, batch=64, quant="nf4",
            lora=lora, lr=lr, out_dir=work / "e", effective_batch=64),
    }
    checks = {}
    if args.check_graphs:
        try:
            checks["graphs_vs_eager"] = check_graphs(params, records, model_dir)
        except Exception:  # recorded; the throughput runs still run
            import traceback

            checks["graphs_vs_eager"] = {"error": traceback.format_exc()[-3000:]}
        print(json.dumps(checks), flush=True)
    if args.profile:
        args.out.mkdir(parents=True, exist_ok=True)
        profiles = []
        levers = {"fuse_lora": True, "lora_compute_dtype": "auto"}
        for name, extra in (("nf4_graphs", {}), ("nf4_eager", {"cuda_graphs": False}),
                            ("nf4_compiled_graphs", {"compile_layers": True}),
                            ("nf4_fused_bf16lora_graphs", levers),
                            ("nf4_fused_bf16lora_compiled_graphs", {"compile_layers": True, **levers})):
            try:
                profiles.append(profile(params, records, model_dir, args.out, name, extra))
            except Exception as err:  # recorded; the throughput runs still run
                profiles.append({"name": f"profile_{name}", "error": f"{type(err).__name__}: {err}"[:500]})
            print(json.dumps(profiles[-1]), flush=True)
        checks["profiles"] = profiles
    results = []
    for name, fn in runs.items():
        if args.only and name not in args.only:
            continue
        print(f"== {name}", flush=True)
        try:
            res = fn()
        except Exception as err:  # one failing baseline must not hide the others; the error is recorded
            import traceback

            traceback.print_exc()
            res = {"name": name, "error": f"{type(err).__name__}: {err}"}
        print(json.dumps({k: v for k, v in res.items() if k != "loss_curve"}), flush=True)
        results.append(res)
        torch.cuda.empty_cache()
    common.write_results(args.out, "train", results, {"data": str(args.data), "records": len(records), **checks,
                                                      "command": "python -m bench.train_bench " + " ".join(sys.argv[1:])})


if __name__ == "__main__":
    main()
