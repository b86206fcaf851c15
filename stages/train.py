"""Train stage: LoRA / QLoRA (NF4) fine-tuning of the base model on data/processed/train.jsonl, or with
train.method full, full fine-tuning of every weight.

    python -m stages.train [--params params.yaml]
    dvc exp run -S train.method=full -S train.quantization=none -S train.learning_rate=5e-5 -S train.epochs=3

train.method full trains every weight (the tied embedding/head as one) in fp32 master weights, the forward
under bf16 autocast on CUDA and in fp32 on CPUs, in the same loop, batching, loss, checkpoints and logs as
LoRA; it runs eager (no CUDA graphs; the log line and metrics/runtime/train.json say so) in one process,
and needs train.quantization none. models/adapter/ then holds the trained model itself (model.safetensors
in fp32, config, tokenizer, training_info.json with method: full), which the merge stage stores in merge.dtype.

The loop is table2text.training.loop (a torchtune-style recipe: setup phases, then one optimiser step per
iteration). Checkpoints every train.save_steps let an interrupted run resume with the same step count and
data order. With train.num_gpus = N > 1 this command re-executes itself under torchrun, one process per
GPU (table2text.training.distributed): every process draws the same effective batch, computes its share,
and the gradients are summed, so the step is the one-GPU step; only rank 0 writes outputs.

Outputs: models/adapter/ (the adapter, or under method full the trained weights; + training_info.json), metrics/train.json, metrics/train/ (dvclive: loss, learning
rate, gradient norm per step), all DVC-tracked and the same on every fresh run; how the run went (times,
throughput, memory, resume point) goes to metrics/runtime/train.json (table2text.runtime). Resume points go
to checkpoints/, which is not a DVC output: DVC neither deletes it before a run nor hashes it in `dvc status`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from table2text import phases
from table2text.errors import run_cli
from table2text.io import readers
from table2text.io.atomic import check_writable
from table2text.model import sources as model_sources
from table2text.params import default_params_file, load_params
from table2text.paths import ADAPTER_DIR, CHECKPOINT_DIR, METRICS_DIR, RUNTIME_DIR, TRAIN_FILE
from table2text.training import distributed
from table2text.training.loop import train
from table2text.phases import process_age

RUNTIME_FILE = RUNTIME_DIR / "train.json"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=default_params_file(),
                        help="params file (default: $TOTTO_PARAMS or params.yaml)")
    parser.add_argument("--no-dvclive", action="store_true",
                        help="skip the per-step dvclive log (for GPU hosts without dvc); metrics/train.json is kept")
    args = parser.parse_args(argv)

    phases.detail("settings, records")
    params = load_params(args.params)  # every setting checked here, before anything is loaded
    num_gpus, requested = params["train"]["num_gpus"], params["train"]["device"]
    if num_gpus > 1 and not distributed.launched():
        # One process per GPU: this same command again, under torchrun, as a child whose status we exit with.
        problem = distributed.device_problem(num_gpus, requested)
        if problem:
            parser.exit(2, f"train: {args.params}: {problem}\n")
        raise SystemExit(distributed.relaunch(num_gpus, "stages.train", sys.argv[1:] if argv is None else list(argv)))
    if distributed.launched():
        distributed.init(model_sources.pick_device(requested))
    rank, _ = distributed.rank_and_world()
    try:
        records = readers.read_processed(TRAIN_FILE)
        if rank == 0:  # before the long work: the outputs' folders must take files
            for folder in (ADAPTER_DIR.parent, METRICS_DIR, CHECKPOINT_DIR):
                check_writable(folder)
        stats = train(params, records, ADAPTER_DIR, data_sha256=readers.sha256_file(TRAIN_FILE),
                      dvclive=not args.no_dvclive)
    finally:
        distributed.shutdown()
    if rank == 0:
        print(
            f"train: {stats['steps']} steps, {stats['samples']} samples on {stats['world_size']} process(es) in "
            f"{stats['wall_seconds']:.1f} s ({stats['tokens_per_s']:.0f} tokens/s), final loss "
            f"{stats['final_loss']:.4f} -> {ADAPTER_DIR}"
        )
        resumed = f", resumed from step {stats['resumed_from_step']}" if stats["resumed_from_step"] else ""
        print(f"train: peak memory {stats['peak_memory_gb']:.2f} GB ({stats['peak_memory_kind']}) on {stats['device']}"
              f"{resumed}; times and throughput -> {RUNTIME_FILE.as_posix()}")
        if stats["steps_with_nonzero_lr"] == 0:
            print(f"train: warning: every one of the {stats['steps']} optimiser steps ran at learning rate 0 (warm-up "
                  "or schedule): the trained weights are their initialisation and the model equals the base; train longer "
                  "(train.epochs / train.max_steps) or lower train.warmup_ratio")
        total = process_age()
        if total is not None:
            print(f"train: process wall {total:.1f} s: start-up {stats['startup_seconds']:.1f} s, train() "
                  f"{stats['wall_seconds']:.1f} s, saving and the rest {total - stats['startup_seconds'] - stats['wall_seconds']:.1f} s")


if __name__ == "__main__":
    # FileNotFoundError: data/processed/train.jsonl or model.name's folder missing
    phases.exit_process(phases.timed("train", lambda: run_cli(main, "train", user_errors=(FileNotFoundError,))))
