"""The training loop, as torchtune's LoRA recipe: `setup()` runs the `_setup_*` phases (device, data,
model, batching, optimiser, resume point, logging, graph capture), then `run()` is the loop, one optimiser
step per iteration, and `finish()` writes the outputs.

train.method picks what is trained, in the same loop: `lora`, adapters on the frozen (NF4 or bf16) base;
`full`, every weight, as fp32 master weights (table2text.model.full), the forward under bf16 autocast on
CUDA and in fp32 on CPUs, the tied embedding/head one parameter whose head gradient completion_loss
computes. A full run is eager: CUDA graphs (captured and measured for LoRA's frozen base) are not used,
and the log line and the runtime file (cuda_graphs, cuda_graphs_note) say so.

A nanoGPT-style loop rather than HF Trainer, because the vocabulary head dominates: logits are computed
only at completion positions (table2text.training.batching.completion_loss). One optimiser step sees a
fixed number of examples (train.effective_batch), packed without padding into rows and split into
micro-batches under a token budget, replayed as CUDA graphs on a GPU (packed_forward). The loss of a step
is the summed cross-entropy divided by the completion tokens of the whole effective batch, so
accumulation gives the same gradient as one big batch. Inside a process group (torchrun, see
stages/train.py) every rank runs the same recipe on its share of each batch; rank 0 alone writes.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from table2text.config import check_target_modules
from table2text.io.atomic import staged_outputs
from table2text.model import full as full_model
from table2text.model import sources as model_sources
from table2text.model.lora import build_model, save_adapter
from table2text.params import validate_params
from table2text import phases
from table2text.paths import ADAPTER_DIR, CHECKPOINT_DIR, METRICS_DIR
from table2text.runtime import write_runtime
from table2text.training import checkpoints, distributed
from table2text.training.batching import (
    IGNORE,
    activation_bytes_per_token,
    budget_for_memory,
    collate_packed,
    completion_loss,
    encode_record,
    head_chunk_bytes,
    plan_packed_micro_batches,
)
from table2text.training.memory import memory_cap, peak_memory_gb
from table2text.training.packed_forward import GraphedDecoder, PackedDecoder, compile_layers
from table2text.training.schedule import (
    lr_scheduler,
    micro_batch_shapes,
    row_length,
    step_examples,
    steps_per_epoch,
    steps_with_nonzero_lr,
    total_steps,
)
from table2text.training.throughput import peak_flops, train_flops

# The curves dvclive logs (DVC-tracked, plotted): what the optimisation did. Throughput and MFU vary from
# run to run, so they stay in the runtime file's history.
LIVE_METRICS = ("loss", "learning_rate", "grad_norm")


def train(
    params: dict,
    train_records: list[dict],
    adapter_dir: Path | None = ADAPTER_DIR,
    *,
    checkpoint_dir: Path | None = CHECKPOINT_DIR,
    metrics_dir: Path | None = METRICS_DIR,
    dvclive: bool = True,
    model_dir: Path | None = None,
    data_sha256: str | None = None,
    on_step: Callable[[int], None] | None = None,
    progress: bool = True,
    tokenizer=None,
) -> dict:
    """Train LoRA adapters (or, with train.method full, every weight) on `train_records` (processed
    records: prompt, completion) and return stats
    (those of metrics/train.json and metrics/runtime/train.json, plus "history": the logged rows of every
    logging step, throughput included).

    adapter_dir / checkpoint_dir / metrics_dir may be None to skip those outputs (benchmarks).
    dvclive=False keeps metrics/train.json but skips the per-step dvclive log (hosts without dvc).
    model_dir overrides params model.name (tests); tokenizer, if given, must be that model's (saves
    loading it again: seconds). on_step(step) is called after every optimiser step (1-based), after any
    checkpoint of that step; an exception from it stops the run like a crash."""
    recipe = LoRARecipe(params, train_records, adapter_dir=adapter_dir, checkpoint_dir=checkpoint_dir,
                        metrics_dir=metrics_dir, dvclive=dvclive, model_dir=model_dir, data_sha256=data_sha256,
                        on_step=on_step, progress=progress, tokenizer=tokenizer)
    recipe.setup()
    recipe.run()
    return recipe.finish()


class LoRARecipe:
    def __init__(self, params: dict, train_records: list[dict], *, adapter_dir, checkpoint_dir, metrics_dir,
                 dvclive, model_dir, data_sha256, on_step, progress, tokenizer):
        self.params = validate_params(params)  # settings built in code (tests, benchmarks) get the same checks
        self.cfg = self.params["train"]
        self.records = train_records
        self.adapter_dir, self.checkpoint_dir, self.metrics_dir = adapter_dir, checkpoint_dir, metrics_dir
        self.dvclive, self.on_step, self.progress = dvclive, on_step, progress
        self.model_dir, self.data_sha256, self.tokenizer = model_dir, data_sha256, tokenizer
        self.start_time = time.perf_counter()
        self.startup = phases.process_age()  # what the process spent before: Python, imports, reading

    # ------------------------------------------------------------------------------------ setup phases
    def setup(self) -> None:
        phases.detail("model folder, target modules")  # before: the stage's settings and records
        self._setup_device()
        self._setup_data()
        self._setup_model()
        phases.detail("batching, compilation set-up")
        self._setup_batching()
        phases.detail("optimizer, resume, logging")
        self._setup_optimizer()
        self._setup_resume()
        self._setup_logging()
        phases.detail("graph capture")
        self._capture_graphs()
        phases.detail(None)

    def _setup_device(self) -> None:
        cfg, params = self.cfg, self.params
        self.model_dir = Path(self.model_dir) if self.model_dir else model_sources.resolve_model(params["model"]["name"])
        self.full = cfg["method"] == full_model.METHOD
        if not self.full:
            # lora.target_modules against the model's module names (read from its config, no weights): a
            # name that matches nothing would otherwise leave that layer silently unadapted
            check_target_modules(params["lora"]["target_modules"], self.model_dir, params["model"]["name"])
        phases.detail("device, CUDA context")
        self.device = model_sources.pick_device(cfg["device"])
        # the weights' dtype; a full run keeps fp32 master weights and computes under autocast (on CUDA)
        self.dtype = torch.float32 if self.full else model_sources.pick_dtype(self.device)
        self.autocast = full_model.autocast_dtype(self.device) if self.full else None
        self.cap_gb, self.cap_why = memory_cap(cfg["max_memory_gb"], self.device)  # before the model takes memory
        self.compiled = bool(cfg["compile_layers"])
        problem = model_sources.compile_problem("train.compile_layers", self.device) if self.compiled else None
        if problem:
            raise model_sources.DeviceError(problem)
        self.rank, self.world = distributed.rank_and_world()  # (0, 1) for a single process
        self.is_main = self.rank == 0
        if not self.is_main:  # the other ranks only read (checkpoints) and compute
            self.adapter_dir = self.metrics_dir = None
            self.progress = False
        if cfg["num_threads"]:
            torch.set_num_threads(int(cfg["num_threads"]))
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def _setup_data(self) -> None:
        phases.enter("load", "weights hash")
        self.base_sha256 = model_sources.weights_sha256(self.model_dir)
        self.data_sha256 = self.data_sha256 or records_sha256(self.records)
        self.key = checkpoints.run_key(self.params, self.base_sha256, self.data_sha256)
        phases.detail("tokenizer")
        self.tokenizer = self.tokenizer or model_sources.load_tokenizer(self.model_dir)
        phases.enter("prepare", "tokenising")
        self.examples = [encode_record(self.tokenizer, r) for r in self.records]
        self.n_steps = total_steps(self.cfg, len(self.examples))
        self.effective_batch = int(self.cfg["effective_batch"])
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def _setup_model(self) -> None:
        seed = int(self.cfg["seed"])
        torch.manual_seed(seed)  # LoRA init and dropout
        if self.full:
            phases.enter("load", "model (fp32, every weight trainable)")
            self.model = self.base = full_model.build_full_model(self.model_dir, self.device)
        else:
            phases.enter("load", "model (quantised, LoRA)")
            self.model = build_model(self.params, self.model_dir, self.device, self.dtype)
            self.base = self.model.get_base_model()
        phases.enter("prepare", "model set-up")  # then budgets, compilation, graph capture
        self.decoder, self.head = self.base.get_decoder(), self.base.get_output_embeddings().weight
        self.softcap = getattr(self.base.config, "final_logit_softcapping", None)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.n_trainable = sum(p.numel() for p in self.trainable)
        if self.world > 1:
            distributed.broadcast_parameters(self.trainable)  # the same LoRA init on every rank, by construction
            torch.manual_seed(seed + self.rank)  # but each rank its own dropout masks

    def _setup_batching(self) -> None:
        """Micro-batch token budget; under a memory cap, lower it by the estimate of batching, and only if
        not even the longest example fits, recompute activations (gradient checkpointing). CPUs run faster
        with small micro-batches (cache-sized matmuls); GPUs want large ones."""
        cfg, device, config = self.cfg, self.device, self.base.config
        budget = int(cfg["micro_batch_tokens"])
        if device.type == "cpu" and cfg["cpu_micro_batch_tokens"]:
            budget = int(cfg["cpu_micro_batch_tokens"])
        self.checkpointing = False
        self.row_tokens = row_length([len(ids) for ids, _ in self.examples])
        if self.cap_gb:
            weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
            # + the trained weights' grads and Adam moments (fp32), and the head's loss chunk as completion_loss computes it
            fixed = weight_bytes + self.n_trainable * 4 * 3 + head_chunk_bytes(self.head.shape[0], self.softcap)
            if self.full:  # the head's gradient, summed by completion_loss beside the .grad it then joins
                fixed += self.head.numel() * 4
            act_bytes = 2 if self.dtype == torch.bfloat16 else 4
            per_token = activation_bytes_per_token(config, act_bytes)
            budget_before_cap = budget
            budget = budget_for_memory(budget, self.cap_gb, fixed_bytes=fixed, bytes_per_token=per_token,
                                       why=self.cap_why)
            if budget < self.row_tokens:  # not even one packed row fits
                self.checkpointing = True
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                per_token = config.num_hidden_layers * config.hidden_size * act_bytes + (
                    per_token // config.num_hidden_layers)
                budget = budget_for_memory(budget_before_cap, self.cap_gb, fixed_bytes=fixed,
                                           bytes_per_token=per_token, why=self.cap_why)
        self.budget = budget
        self._say(f"memory cap {f'{self.cap_gb:.2f} GiB' if self.cap_gb else 'none'} ({self.cap_why}) -> "
                  f"micro_batch_tokens={budget}, gradient checkpointing={self.checkpointing}")
        # Packed rows of one length (the longest example), as many per micro-batch as the budget holds.
        self.rows_per_micro_batch = max(1, budget // self.row_tokens)
        # CUDA graphs need fixed shapes (packed rows give them) and no RNG reads inside a capture
        # (checkpointing's recomputation makes some), so they are used on CUDA without checkpointing, and
        # in one process only: under torchrun they have not yet been run on several GPUs (the measured
        # multi-GPU path is the eager one), so each rank runs eager until that is measured.
        # A full run is eager too: its graphs would hold the backward of every weight (the tied embedding's
        # included) and run under autocast, a path never captured nor measured.
        wanted_graphs = device.type == "cuda" and cfg["cuda_graphs"]
        self.cuda_graphs = wanted_graphs and not self.checkpointing and self.world == 1 and not self.full
        self.graphs_note = None
        if wanted_graphs and self.world > 1:
            self.graphs_note = "CUDA graphs off with several processes (not yet measured on several GPUs)"
        elif wanted_graphs and self.full:
            self.graphs_note = "CUDA graphs off with train.method full (captured and measured for LoRA only): eager"
        if self.graphs_note:
            self._say(self.graphs_note)
        if self.compiled:
            compile_layers(self.decoder)  # compiled at the first pass of each shape (for graphs: while capturing)
        self.forward = GraphedDecoder(self.decoder, device) if self.cuda_graphs else PackedDecoder(self.decoder)
        if self.cuda_graphs:
            # A graph's backward returns its gradients in the same buffers every replay; a .grad that autograd
            # adopted as-is would be overwritten by the next micro-batch, so .grad is kept allocated (zeroed,
            # never None) and every micro-batch adds into it.
            for p in self.trainable:
                p.grad = torch.zeros_like(p)
        self._say(f"{self.method_line()}; packed rows of {self.row_tokens} tokens, up to "
                  f"{self.rows_per_micro_batch} per micro-batch, CUDA graphs {'on' if self.cuda_graphs else 'off'}, "
                  f"compiled layers {'on' if self.compiled else 'off'}")

    def method_line(self) -> str:
        """What is trained and in which precision (the log line and the runtime file)."""
        if not self.full:
            return f"method lora: {self.n_trainable:,} adapter weights on the frozen base"
        compute = "bf16 autocast" if self.autocast is not None else "fp32 compute"
        return f"method full: all {self.n_trainable:,} weights in fp32 master weights, {compute}"

    def _setup_optimizer(self) -> None:
        cfg = self.cfg
        self.optimizer = torch.optim.AdamW(self.trainable, lr=float(cfg["learning_rate"]),
                                           weight_decay=float(cfg["weight_decay"]), fused=self.device.type == "cuda")
        self.scheduler = lr_scheduler(cfg, self.optimizer, self.n_steps)

    def _setup_resume(self) -> None:
        self.start_step, state = 0, {}
        folder = Path(self.checkpoint_dir) if self.checkpoint_dir else None
        ckpt = checkpoints.find_checkpoint(folder, self.key) if folder and self.is_main else None
        if self.world > 1:
            ckpt = distributed.broadcast_object(ckpt)  # rank 0 chose (and cleaned up); all resume from it
        if ckpt is not None:
            state = checkpoints.load_checkpoint(ckpt, self.model, self.optimizer, self.scheduler, self.device, self.rank)
            self.start_step = state["step"]
            self._say(f"resuming from {ckpt} (step {self.start_step} of {self.n_steps}, {self.world} process(es))")
            if not state["rng_restored"]:
                print(f"train: rank {self.rank}: {ckpt} was written by {state.get('world_size', 1)} process(es) "
                      "and holds no RNG state for this rank; its dropout masks start from a fresh seed")
                torch.manual_seed(int(self.cfg["seed"]) + self.rank + 1_000_003 * self.start_step)
        self.done_samples = state.get("samples", 0)
        self.done_tokens = state.get("tokens", 0)
        self.train_seconds = state.get("train_seconds", 0.0)
        self.loss = state.get("loss", float("nan"))
        self.history = list(state.get("history", []))  # logged rows so far, kept in checkpoints

    def _setup_logging(self) -> None:
        self.live = None
        if self.metrics_dir is not None and self.dvclive:
            from dvclive import Live

            # dvcyaml=False: plots are declared in the project's dvc.yaml, dvclive must not rewrite it.
            # A fresh log every run: DVC deletes the old one before the stage runs, so a resumed run replays
            # the history kept in its checkpoint and the plot always covers every step.
            self.live = Live(dir=str(Path(self.metrics_dir) / "train"), dvcyaml=False, save_dvc_exp=False)
            for row in self.history:
                log_row(self.live, row)
        self.peak = peak_flops(self.cfg, self.device)
        self.window = new_window()

    def _capture_graphs(self) -> None:
        """Every micro-batch shape of the run, captured before the first step is timed."""
        if not self.cuda_graphs:
            return
        start = time.perf_counter()
        shapes = micro_batch_shapes(self.examples, range(self.start_step, self.n_steps), self.effective_batch,
                                    int(self.cfg["seed"]), self.row_tokens, self.rows_per_micro_batch,
                                    self.rank, self.world)
        each = {}
        for rows in sorted(shapes, reverse=True):  # the largest first: the shared memory pool is sized once
            self.forward.capture(rows, self.row_tokens)
            each[rows], start = time.perf_counter() - start, time.perf_counter()
        self._say(f"captured CUDA graphs for micro-batches of {sorted(shapes)} rows in {sum(each.values()):.1f} s ("
                  + ", ".join(f"{rows} rows {seconds:.1f} s" for rows, seconds in each.items()) + ")")

    # -------------------------------------------------------------------------------------- the loop
    def run(self) -> None:
        phases.enter("work")  # the optimiser steps (compiled layers without graphs compile in the first ones)
        cfg, device = self.cfg, self.device
        logging_steps, save_steps = int(cfg["logging_steps"]), int(cfg["save_steps"])
        self.model.train()
        bar = tqdm(range(self.start_step, self.n_steps), initial=self.start_step, total=self.n_steps, desc="train",
                   disable=not self.progress)
        batches = self._stage(self.start_step) if self.start_step < self.n_steps else None
        for step in bar:
            t0 = time.perf_counter()
            # 1. this step's examples (the whole effective batch), its share's micro-batches already on the device
            chosen, share, label_tokens, micro_batches = batches
            # 2. forward and backward in micro-batches; each share's loss is divided by the label tokens of
            #    the whole batch, so the ranks' gradients SUM to the one-GPU one. The loss and the gradient
            #    norm stay on the device until the step has run: reading them earlier would stall the host
            #    mid-step, with the GPU idle until it queues the next kernels.
            total = accumulate_micro_batches(self.forward, self.head, micro_batches, self.softcap, label_tokens,
                                             float(cfg["label_smoothing"]), autocast=self.autocast)
            loss = None
            if self.world > 1:
                loss = distributed.sum_gradients(self.trainable, total.item() / label_tokens)
            # 3. clip, step, schedule
            grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, float(cfg["max_grad_norm"]))
            lr = self.scheduler.get_last_lr()[0]
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=not self.cuda_graphs)
            # the next step's micro-batches, collated and sent while the GPU runs this step
            batches = self._stage(step + 1) if step + 1 < self.n_steps else None
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            # read after the step has run (no wait left): the values as before, the summed loss / the label
            # tokens as a Python float, the norm only for a log row
            loss = total.item() / label_tokens if loss is None else loss
            # 4. count, log (loss, lr, throughput, MFU), checkpoint
            self._count(chosen, label_tokens, loss, time.perf_counter() - t0)
            if (step + 1) % logging_steps == 0 or step + 1 == self.n_steps:
                self._log(step + 1, lr, grad_norm.item(), bar)
            # also at the last step: a rerun after a later crash (or a deleted output) skips the training
            if self.checkpoint_dir is not None and ((step + 1) % save_steps == 0 or step + 1 == self.n_steps):
                self._checkpoint(step + 1)
            if self.on_step is not None:
                self.on_step(step + 1)
        bar.close()

    def _stage(self, step: int):
        """Step `step`'s examples, this process's share of them, the batch's label tokens, and the share's
        packed micro-batches on the device (stage_micro_batches)."""
        chosen, share = step_examples(self.examples, step, self.effective_batch, int(self.cfg["seed"]),
                                      self.rank, self.world)
        label_tokens = sum(len(ids) - p for ids, p in chosen)
        return chosen, share, label_tokens, stage_micro_batches(share, self.row_tokens, self.rows_per_micro_batch,
                                                                self.pad_id, self.device)

    def _count(self, chosen, label_tokens: int, loss: float, seconds: float) -> None:
        lengths = [len(ids) for ids, _ in chosen]
        self.loss = loss
        self.done_samples += len(chosen)
        self.done_tokens += sum(lengths)
        self.train_seconds += seconds
        w = self.window
        w["tokens"] += sum(lengths)
        w["samples"] += len(chosen)
        w["flops"] += train_flops(self.base.config, lengths, label_tokens)
        w["seconds"] += seconds

    def _log(self, step: int, lr: float, grad_norm: float, bar) -> None:
        w = self.window
        row = {"step": step, "loss": self.loss, "learning_rate": lr, "grad_norm": grad_norm,
               "tokens_per_s": w["tokens"] / w["seconds"], "samples_per_s": w["samples"] / w["seconds"]}
        if self.peak:
            row["mfu"] = w["flops"] / w["seconds"] / (self.peak * self.world)
        # the log line, as nanoGPT's: loss, time per step, throughput and model FLOPs utilisation
        bar.set_postfix(loss=f"{self.loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{row['tokens_per_s']:,.0f}",
                        mfu=f"{row['mfu']:.1%}" if self.peak else "n/a")
        self.history.append(row)
        if self.live is not None:
            log_row(self.live, row)
        self.window = new_window()

    def _checkpoint(self, step: int) -> None:
        rng = checkpoints.rng_state(self.device)
        rng_states = distributed.gather_objects(rng) if self.world > 1 else [rng]
        if self.is_main:
            per_epoch = steps_per_epoch(len(self.examples), self.effective_batch)
            extra = {"history": self.history, "samples": self.done_samples, "tokens": self.done_tokens,
                     "train_seconds": self.train_seconds, "loss": self.loss, "world_size": self.world,
                     "epoch": step // per_epoch, "next_batch_in_epoch": step % per_epoch}
            checkpoints.save_checkpoint(Path(self.checkpoint_dir), step, self.key, self.model, self.optimizer,
                                        self.scheduler, extra, rng_states)

    # ---------------------------------------------------------------------------------------- outputs
    def finish(self) -> dict:
        phases.enter("save")
        peak_gb, peak_kind = peak_memory_gb(self.device)
        if self.world > 1:
            distributed.check_in_sync(self.trainable)
            peak_gb = distributed.max_over_ranks(peak_gb, self.device)  # the fullest GPU
        # What the run computed (the same on every fresh run of these params on this kind of machine): the
        # DVC-tracked metrics/train.json and the adapter's training_info.json.
        stats = {
            "steps": self.n_steps,
            "samples": self.done_samples,
            "tokens": self.done_tokens,
            "final_loss": self.loss,
            "steps_with_nonzero_lr": steps_with_nonzero_lr(self.cfg, self.n_steps),
            "trainable_params": self.n_trainable,
        }
        # How it ran (times, throughput, memory, kernels, resume point): metrics/runtime/train.json only.
        seconds = self.train_seconds
        runtime = {
            "resumed_from_step": self.start_step,
            "train_seconds": seconds,
            "wall_seconds": time.perf_counter() - self.start_time,
            "startup_seconds": self.startup,
            "tokens_per_s": self.done_tokens / seconds if seconds else float("nan"),  # all ranks together
            "samples_per_s": self.done_samples / seconds if seconds else float("nan"),
            "peak_memory_gb": peak_gb,
            "peak_memory_kind": peak_kind,
            "world_size": self.world,
            "micro_batch_tokens": self.budget,  # per process (GPU)
            "row_tokens": self.row_tokens,
            "rows_per_micro_batch": self.rows_per_micro_batch,
            "method": self.cfg["method"],
            "precision": self.method_line(),
            "autocast": str(self.autocast).removeprefix("torch.") if self.autocast else None,
            "cuda_graphs": self.cuda_graphs,
            "cuda_graphs_note": self.graphs_note,
            "compile_layers": self.compiled,
            "gradient_checkpointing": self.checkpointing,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
        }
        if self.live is not None:
            self.live.end()
        self._save_outputs(stats)
        if self.metrics_dir is not None:  # how the run went (times, memory, device): not a DVC-tracked file
            write_runtime("train", {**stats, **runtime, "memory_cap_gb": self.cap_gb, "history": self.history},
                          Path(self.metrics_dir) / "runtime")
        if self.world > 1:
            distributed.barrier()  # every rank returns once rank 0's outputs exist
        return {**stats, **runtime, "history": self.history, "memory_cap_gb": self.cap_gb}

    def _save_outputs(self, stats: dict) -> None:
        """metrics/train.json and models/adapter/ (the adapter, or under train.method full the whole trained
        model in fp32), renamed into place together or not at all."""
        with staged_outputs() as stage:
            if self.metrics_dir is not None:
                stage.write_json(Path(self.metrics_dir) / "train.json", stats, sort_keys=True)
            if self.adapter_dir is not None:
                info = {
                    "method": self.cfg["method"],  # what the folder holds: lora (an adapter) | full (the weights)
                    "base_model": {"name": self.params["model"]["name"], "weights_sha256": self.base_sha256},
                    "data_sha256": self.data_sha256,
                    "params": {k: self.params[k] for k in ("train", "lora", "model")},
                    # the dtype the base was held in (table2text.model.finetuned rebuilds it); full: the weights'
                    "dtype": str(self.dtype).removeprefix("torch."),
                    **stats,
                }
                save = full_model.save_full_model if self.full else save_adapter
                save(self.model, self.tokenizer, Path(self.adapter_dir), info, stage)

    def _say(self, message: str) -> None:
        if self.is_main:
            print(f"train: {message}")


def new_window() -> dict:
    """Counters of the steps since the last log line (its throughput and MFU)."""
    return {"tokens": 0, "samples": 0, "flops": 0.0, "seconds": 0.0}


def accumulate_gradients(
    forward, head_weight, examples: list[tuple[list[int], int]], row_tokens: int, rows_per_micro_batch: int,
    pad_id: int, device: torch.device, softcap: float | None = None, label_tokens: int | None = None,
    label_smoothing: float = 0.0,
) -> float:
    """Forward and backward `examples` in packed micro-batches; returns their summed loss / label_tokens.

    forward(input_ids, position_ids, doc_ids) -> hidden states: a PackedDecoder, or its CUDA graphs.
    Each micro-batch's summed loss is divided by the completion tokens of the WHOLE effective batch
    (label_tokens; by default those of `examples`), so the accumulated gradient equals that of one big
    batch (a per-micro-batch mean would weight the tokens of short micro-batches more). A process of a
    multi-GPU run passes its share of the batch and the whole batch's label_tokens. The loop itself calls
    the two halves (stage_micro_batches, accumulate_micro_batches) a step apart."""
    if label_tokens is None:
        label_tokens = sum(len(ids) - p for ids, p in examples)
    batches = stage_micro_batches(examples, row_tokens, rows_per_micro_batch, pad_id, device)
    total = accumulate_micro_batches(forward, head_weight, batches, softcap, label_tokens, label_smoothing)
    return total.item() / label_tokens  # one device sync per step, not one per micro-batch


def stage_micro_batches(examples: list[tuple[list[int], int]], row_tokens: int, rows_per_micro_batch: int,
                        pad_id: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """The packed micro-batches of `examples` (collate_packed) on `device`, each with "positions": the flat
    indices of its completion positions, found on the host, so that the loss need not read a mask back
    from the device. On CUDA the host tensors are pinned and copied without blocking: the copies queue
    behind the work already sent, and the host goes on."""
    batches = []
    for rows in plan_packed_micro_batches([len(ids) for ids, _ in examples], row_tokens, rows_per_micro_batch):
        host = collate_packed(examples, rows, row_tokens, pad_id)
        host["positions"] = (host["targets"].reshape(-1) != IGNORE).nonzero().squeeze(1)
        if device.type == "cuda":
            host = {k: v.pin_memory() for k, v in host.items()}
        batches.append({k: v.to(device, non_blocking=True) for k, v in host.items()})
    return batches


def accumulate_micro_batches(forward, head_weight, batches: list[dict[str, torch.Tensor]], softcap: float | None,
                             label_tokens: int, label_smoothing: float = 0.0,
                             autocast: torch.dtype | None = None) -> torch.Tensor:
    """Forward and backward staged micro-batches (stage_micro_batches); returns their summed loss as a
    device tensor (not divided: the caller reads it, once, when the step has run). autocast: the dtype
    the forward (and the head's loss) computes in over fp32 weights (train.method full on CUDA: bf16);
    the backward runs outside the autocast region, as PyTorch recommends."""
    total = None
    device_type = head_weight.device.type
    for batch in batches:
        with torch.autocast(device_type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            hidden = forward(batch["input_ids"], batch["position_ids"], batch["doc_ids"])
            loss_sum, _ = completion_loss(hidden, batch["targets"], head_weight, softcap=softcap,
                                          label_smoothing=label_smoothing, positions=batch["positions"])
        (loss_sum / label_tokens).backward()
        total = loss_sum.detach() if total is None else total + loss_sum.detach()
    return total if total is not None else torch.zeros((), dtype=torch.float32, device=head_weight.device)


def records_sha256(records: list[dict]) -> str:
    """Identity of in-memory training data (what the loop reads: prompt and completion, in order)."""
    digest = hashlib.sha256()
    for r in records:
        digest.update(json.dumps([r["prompt"], r["completion"]], ensure_ascii=False).encode())
    return digest.hexdigest()


def log_row(live, row: dict) -> None:
    live.step = row["step"]
    for name in LIVE_METRICS:
        live.log_metric(name, row[name])
    live.next_step()
