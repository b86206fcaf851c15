"""Unsloth as a training peer: its FastLanguageModel path for Gemma 3 270M, LoRA r=8 on q/k/v/o/gate/up/
down, on the same processed data and effective batch (16) as bench.train_bench, through its patched TRL
SFTTrainer with the loss on the completion only.

    PYTHONPATH=/root/unsloth-pkgs python3 -m bench.unsloth_baseline --model-dir DIR --data TRAIN.jsonl \
        [--quant nf4|none] [--steps N] [--warmup N] [--batch 16] [--lora-dropout 0.0] [--grad-ckpt unsloth|off]

Unsloth pins transformers <= 5.17 and trl <= 1.15 (the project runs 5.24 / 1.16), so it runs in a process
of its own over a package folder of its own (--target install, PYTHONPATH; the commands in BENCHMARKS.md),
never in the project's environment. `import unsloth` must come before transformers, trl and peft (it
patches them), so this file imports nothing else of the project before it. --model-dir is the converted
local HF folder (table2text.model.sources.resolve_model('packaged'), resolved in the project's environment).
Writes bench/results/<date>-<gpu>-train-unsloth-<name>.json and a BENCHMARKS.md table; tokens/s counts
the data set's mean length x samples (the trainer shuffles internally), as bench.baselines' TRL row does.
"""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")  # no network: nothing to report home to
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# its generated, compiled trainer code: a temp folder, not unsloth_compiled_cache/ in the working tree
os.environ.setdefault("UNSLOTH_COMPILE_LOCATION", os.path.join(tempfile.gettempdir(), "unsloth_compiled_cache"))

import unsloth  # noqa: E402,F401  (first: it patches transformers, trl and peft on import)
from unsloth import FastLanguageModel  # noqa: E402

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def read_records(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def peak_gib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    import psutil  # CPU (a check run here): the process's resident memory

    return psutil.Process().memory_info().rss / 2**30


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True, help="local HF folder of Gemma 3 270M")
    parser.add_argument("--data", type=Path, required=True, help="processed train.jsonl (prompt, completion)")
    parser.add_argument("--quant", default="nf4", choices=("nf4", "none"), help="nf4: load_in_4bit; none: bf16 LoRA")
    parser.add_argument("--steps", type=int, default=30, help="measured optimiser steps")
    parser.add_argument("--warmup", type=int, default=3, help="optimiser steps before the clock starts")
    parser.add_argument("--batch", type=int, default=16, help="per-device batch; accumulation makes up 16")
    parser.add_argument("--effective-batch", type=int, default=16)
    parser.add_argument("--lora-dropout", type=float, default=0.0,
                        help="0.0: Unsloth's fused LoRA kernels apply (its recommendation); the project uses 0.05")
    parser.add_argument("--grad-ckpt", default="unsloth", choices=("unsloth", "off"),
                        help="use_gradient_checkpointing: 'unsloth' (its default, offloaded) or off")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--name", default=None)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    if args.effective_batch % args.batch:
        parser.error(f"--effective-batch {args.effective_batch} is not a multiple of --batch {args.batch}")
    name = args.name or f"unsloth_{args.quant}_b{args.batch}_drop{args.lora_dropout:g}_ckpt-{args.grad_ckpt}"
    device = "cuda" if torch.cuda.is_available() else "cpu"

    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    started = time.perf_counter()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=str(args.model_dir), max_seq_length=1024, dtype=torch.bfloat16,
        load_in_4bit=args.quant == "nf4", local_files_only=True)
    model = FastLanguageModel.get_peft_model(
        model, r=8, lora_alpha=16, lora_dropout=args.lora_dropout, target_modules=TARGETS, bias="none",
        use_gradient_checkpointing="unsloth" if args.grad_ckpt == "unsloth" else False, random_state=42)
    loaded = time.perf_counter()

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.losses = [], []

        def on_step_end(self, targs, state, control, **kw):
            if device == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())
            # as it goes: a run cut short by its time limit still shows how far it got
            print(f"unsloth: step {len(self.times)} done at {self.times[-1] - started:.1f} s", flush=True)

        def on_log(self, targs, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    records = read_records(args.data)
    data = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in records])
    total = args.steps + args.warmup + 1
    accum = args.effective_batch // args.batch
    config = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="unsloth-"), per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=accum, bf16=True, learning_rate=args.lr, lr_scheduler_type="cosine",
        warmup_steps=max(1, round(0.06 * total)), max_steps=total, logging_steps=1, save_strategy="no",
        report_to="none", completion_only_loss=True, max_length=1024, packing=False, seed=42,
        dataset_num_proc=None, use_cpu=device == "cpu",
    )
    timer = StepTimer()
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                         callbacks=[timer])
    lengths = [len(x) for x in trainer.train_dataset["input_ids"]]
    mean_tokens = sum(lengths) / len(lengths)
    prepared = time.perf_counter()
    trainer.train()

    times = timer.times
    measured = len(times) - 1 - args.warmup
    if measured < 1:
        raise SystemExit(f"only {len(times)} optimiser steps were timed; need --warmup + 2 at least")
    elapsed = times[-1] - times[args.warmup]
    samples = measured * args.effective_batch
    result = {
        "name": name,
        "steps_measured": measured,
        "step_time_s": elapsed / measured,
        "samples_per_s": samples / elapsed,
        "tokens_per_s": samples * mean_tokens / elapsed,
        "peak_allocated_gib": peak_gib(device),
        "final_loss": timer.losses[-1] if timer.losses else math.nan,
        "loss_curve": timer.losses,
        "load_s": loaded - started,  # FastLanguageModel.from_pretrained + get_peft_model
        "prepare_s": prepared - loaded,  # the trainer: tokenising the data set
        "tokens_note": "tokens/s from the data set's mean length x samples (the trainer shuffles internally)",
        "settings": {"quant": args.quant, "batch": args.batch, "accumulation": accum, "lora_r": 8,
                     "lora_alpha": 16, "lora_dropout": args.lora_dropout, "target_modules": TARGETS,
                     "gradient_checkpointing": args.grad_ckpt, "lr": args.lr, "device": device},
    }
    print(json.dumps({k: v for k, v in result.items() if k != "loss_curve"}), flush=True)
    from bench import common
    from importlib import metadata

    common.write_results(args.out, f"train-unsloth-{name}", [result], {
        "data": str(args.data), "records": len(records),
        "unsloth": metadata.version("unsloth"), "unsloth_zoo": metadata.version("unsloth_zoo"),
        "command": "python3 -m bench.unsloth_baseline " + " ".join(sys.argv[1:] if argv is None else argv)})
    return result


if __name__ == "__main__":
    main()
