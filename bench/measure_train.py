"""How the benches time the train stage's own loop (table2text.training.loop.train) on a GPU: its throughput
over measured steps (run_project, used by bench/train_bench.py and bench/profile_train.py) and a torch.profiler
trace of a few of its steps (profile, used by both too)."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from table2text.model import sources as model_sources
from table2text.training.loop import train


def run_project(name, params, records, model_dir, *, quant, steps, warmup, extra=None):
    """The train stage's own loop (stages.train.train) with outputs off; throughput after `warmup` steps."""
    p = copy.deepcopy(params)
    p["train"].update({"quantization": quant, "max_steps": steps + warmup, "device": "cuda", "logging_steps": 1})
    p["train"].update(extra or {})
    stamps = []

    def on_step(step):
        stamps.append((step, time.perf_counter()))

    # Dynamo's compiled code is kept per code object for the whole process: without a reset, the compiled
    # runs before this one use up its recompile limit (8) and this run's layers silently stay eager (what
    # happened to project_bf16_compiled in the 2026-12-02 "train-2" run).
    torch._dynamo.reset()
    torch.cuda.reset_peak_memory_stats()
    stats = train(p, records, None, checkpoint_dir=None, metrics_dir=None, model_dir=model_dir,
                  on_step=on_step, progress=False)
    # tokens and samples of the measured steps: the same batches the loop drew (stages.train.batch_indices)
    from table2text.training.batching import encode_record
    from table2text.training.schedule import batch_indices

    tok = model_sources.load_tokenizer(model_dir)  # the stage's own tokenizer: the same lengths
    lengths = [len(encode_record(tok, r)[0]) for r in records]
    eff = int(p["train"]["effective_batch"])
    measured = [batch_indices(s, len(records), eff, int(p["train"]["seed"])) for s in range(warmup, steps + warmup)]
    elapsed = stamps[-1][1] - stamps[warmup - 1][1]
    tokens = sum(lengths[i] for batch in measured for i in batch)
    samples = sum(len(b) for b in measured)
    return {
        "name": name,
        "steps_measured": steps,
        "step_time_s": elapsed / steps,
        "samples_per_s": samples / elapsed,
        "tokens_per_s": tokens / elapsed,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
        "final_loss": stats["final_loss"],
        "micro_batch_tokens": stats["micro_batch_tokens"],
        "row_tokens": stats["row_tokens"],
        "rows_per_micro_batch": stats["rows_per_micro_batch"],
        "cuda_graphs": stats["cuda_graphs"],
        "gradient_checkpointing": stats["gradient_checkpointing"],
        "train_wall_s": stats["wall_seconds"],  # model load, graph capture and every step
        "mfu": sum(r.get("mfu", 0.0) for r in stats["history"][warmup:]) / max(1, len(stats["history"][warmup:])),
        "loss_curve": [r["loss"] for r in stats["history"]],
    }


def profile(params, records, model_dir, out: Path, name: str, extra: dict) -> dict:
    from torch.profiler import ProfilerActivity, profile as torch_profile, schedule

    p = copy.deepcopy(params)
    p["train"].update({"max_steps": 8, "device": "cuda", **extra})
    sched = schedule(wait=2, warmup=2, active=4)
    stamps = []
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], schedule=sched) as prof:
        def on_step(step):
            stamps.append(time.perf_counter())
            prof.step()

        train(p, records, None, checkpoint_dir=None, metrics_dir=None, model_dir=model_dir,
              on_step=on_step, progress=False)
    events = prof.key_averages()
    wall = stamps[-1] - stamps[3]  # the 4 active steps
    # Kernels are the events without CPU time of their own; summing every event's device time would count
    # a kernel again in the op (or graph replay) that launched it.
    kernels = [e for e in events if e.self_cpu_time_total == 0 and e.self_device_time_total > 0
               and not e.key.startswith("ProfilerStep")]  # the step marker spans its kernels
    kernel_s = sum(e.self_device_time_total for e in kernels) / 1e6
    launched = sum(e.count for e in kernels)
    text = [f"variant {name} {extra}: 4 active steps, wall {wall:.3f} s, kernel time {kernel_s:.3f} s "
            f"(GPU busy {kernel_s / wall:.0%}), {launched} kernels ({launched / 4:.0f} a step)",
            events.table(sort_by="self_device_time_total", row_limit=30),
            events.table(sort_by="self_cpu_time_total", row_limit=30)]
    (out / f"profile-{name}.txt").write_text("\n\n".join(text), encoding="utf-8")
    print(text[0], flush=True)
    return {"name": f"profile_{name}", "wall_4_steps_s": wall, "kernel_s": kernel_s,
            "gpu_busy_fraction": kernel_s / wall, "kernels_per_step": launched / 4}
