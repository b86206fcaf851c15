"""Train stage: LoRA / QLoRA (NF4) fine-tuning of the base model on data/processed/train.jsonl.

    python -m stages.train [--params params.yaml]

A nanoGPT-style loop rather than HF Trainer, because the vocabulary head dominates: logits are computed
only at completion positions (stages.batching.completion_loss). One optimiser step sees a fixed number
of examples (train.effective_batch), packed without padding into rows (stages.batching) and split into
micro-batches under a token budget, replayed as CUDA graphs on a GPU (stages.packed_forward). The loss
of a step is the summed cross-entropy divided by the completion tokens of the whole effective batch, so
accumulation gives the same gradient as one big batch. Checkpoints every train.save_steps let an
interrupted run resume with the same step count and data order.

With train.num_gpus = N > 1 the command re-executes itself under torchrun, one process per GPU
(stages.distributed): every process draws the same effective batch, computes its share, and the
gradients are summed across processes, so the step is the one-GPU step; only rank 0 writes outputs.

Outputs: models/adapter/ (+ training_info.json), metrics/train.json, metrics/train/ (dvclive: loss, learning
rate, gradient norm per step), all DVC-tracked and the same on every fresh run; how the run went (times,
throughput, memory, resume point) goes to metrics/runtime/train.json (stages.runtime). Resume points go to
checkpoints/, which is not a DVC output: DVC neither deletes it before a run nor hashes it in `dvc status`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from stages import distributed, model_sources
from stages import readers
from stages.atomic_io import StagedOutputs, check_writable, staged_dir, staged_outputs
from stages.config import check_target_modules, math_keys
from stages.atomic_io import write_json as _write_json
from stages.batching import (
    activation_bytes_per_token,
    budget_for_memory,
    collate_packed,
    completion_loss,
    encode_record,
    head_chunk_bytes,
    plan_packed_micro_batches,
)
from stages.errors import run_cli
from stages.nf4 import dequantize_frozen_nf4
from stages.packed_forward import GraphedDecoder, PackedDecoder, compile_layers
from stages.params import default_params_file, load_params, validate_params
from stages.runtime import write_runtime

TRAIN_FILE = Path("data/processed/train.jsonl")
ADAPTER_DIR = Path("models/adapter")
CHECKPOINT_DIR = Path("checkpoints")
METRICS_DIR = Path("metrics")
RUNTIME_FILE = METRICS_DIR / "runtime" / "train.json"
KEEP_CHECKPOINTS = 2
# Dense bf16 peak FLOP/s per device, for MFU (train.peak_flops overrides; unknown devices get no MFU).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}
# train.max_memory_gb: auto caps peak memory at the GPU's free memory (measured when the stage starts,
# before the model loads) less this margin: 10% of it and 0.5 GiB more. The cap bounds what PyTorch
# allocates; the margin leaves room for what it does not count (the caching allocator's fragmentation,
# memory another program such as Windows' desktop takes meanwhile).
AUTO_MEMORY_MARGIN = (0.10, 0.5)


def memory_cap_setting(value) -> float | str:
    """train.max_memory_gb checked: "auto" or a number of GiB >= 0 (0 = no cap)."""
    if value == "auto" or (isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0):
        return value
    raise ValueError(f"train.max_memory_gb must be auto or a number of GiB >= 0 (0 = no cap), got {value!r}")


def auto_memory_cap_gb(free_bytes: int) -> float:
    """The cap of max_memory_gb: auto on a GPU with `free_bytes` free (see AUTO_MEMORY_MARGIN)."""
    share, reserve_gb = AUTO_MEMORY_MARGIN
    return max(0.0, free_bytes * (1 - share) / 2**30 - reserve_gb)


def memory_cap(value, device: torch.device, mem_get_info=None) -> tuple[float, str]:
    """(cap in GiB, 0 = none; how it was chosen) for train.max_memory_gb=`value` on `device`."""
    value = memory_cap_setting(value)
    if value != "auto":
        return float(value), f"max_memory_gb={value}"
    if device.type != "cuda":
        return 0.0, "max_memory_gb=auto: no cap off a GPU"
    free, total = (mem_get_info or torch.cuda.mem_get_info)(device)
    cap = auto_memory_cap_gb(free)
    share, reserve_gb = AUTO_MEMORY_MARGIN
    return cap, (f"max_memory_gb=auto: {free / 2**30:.2f} GiB of {total / 2**30:.2f} GiB free on {device}, "
                 f"less {share:.0%} and {reserve_gb} GiB")


# ----------------------------------------------------------------------------------------------- I/O
def process_seconds() -> float | None:
    """Seconds since this process started (interpreter start-up and imports included), None if unknown."""
    try:
        import psutil

        return time.time() - psutil.Process().create_time()
    except Exception:  # psutil missing (a bare GPU host): the stage's own timers still report
        return None


def read_jsonl(path: Path) -> list[dict]:
    """The processed records of `path`, read and checked as every model stage reads them."""
    return readers.read_processed(path)


def records_sha256(records: list[dict]) -> str:
    """Identity of in-memory training data (what the loop reads: prompt and completion, in order)."""
    digest = hashlib.sha256()
    for r in records:
        digest.update(json.dumps([r["prompt"], r["completion"]], ensure_ascii=False).encode())
    return digest.hexdigest()


def write_json(path: Path, obj) -> None:
    _write_json(path, obj, sort_keys=True)


def peak_memory_gb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda_max_allocated"
    try:
        import resource  # not on Windows
    except ImportError:
        return float("nan"), "unavailable"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**30 if sys.platform == "darwin" else 2**20), "cpu_max_rss"


# ------------------------------------------------------------------------------------------- schedule
def steps_per_epoch(n_examples: int, effective_batch: int) -> int:
    return math.ceil(n_examples / effective_batch)


def total_steps(cfg: dict, n_examples: int) -> int:
    if cfg["max_steps"] > 0:
        return int(cfg["max_steps"])
    return steps_per_epoch(n_examples, cfg["effective_batch"]) * int(cfg["epochs"])


def batch_indices(step: int, n_examples: int, effective_batch: int, seed: int) -> list[int]:
    """Examples of optimiser step `step` (0-based): a seeded shuffle per epoch, a function of the step
    alone so that a resumed run reads exactly what the uninterrupted one would have."""
    per_epoch = steps_per_epoch(n_examples, effective_batch)
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return order[position * effective_batch : (position + 1) * effective_batch]


# ---------------------------------------------------------------------------------------------- model
def build_model(params: dict, model_dir: Path, device: torch.device, dtype: torch.dtype):
    """Base model (NF4 or bf16), frozen, with fresh LoRA adapters from params (seeded by the caller)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    cfg, lora = params["train"], params["lora"]
    model = model_sources.load_model(model_dir, quantization=cfg["quantization"], dtype=dtype, device=device)
    model.config.use_cache = False
    if cfg["quantization"] == "nf4" and cfg["nf4_fp32_upcast"]:
        # peft's recipe: freeze, cast the non-quantised weights (norms, embeddings = tied head) to fp32.
        # Gradient checkpointing is not forced here: the loop enables it only if the memory cap needs it.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model.requires_grad_(False)
    if cfg["quantization"] == "nf4" and cfg["nf4_dequantize_once"]:
        dequantize_frozen_nf4(model)  # after the upcast, which would otherwise cast these to fp32 too
    config = LoraConfig(
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=list(lora["target_modules"]),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)  # adapter weights in fp32 (peft's autocast_adapter_dtype)


def linear_params(config) -> int:
    """Weights of the decoder's linear layers (the matmuls every token goes through)."""
    h, a, kv, i = (
        config.hidden_size,
        config.num_attention_heads * config.head_dim,
        config.num_key_value_heads * config.head_dim,
        config.intermediate_size,
    )
    return config.num_hidden_layers * (2 * h * a + 2 * h * kv + 3 * h * i)


def train_flops(config, lengths: list[int], label_tokens: int) -> float:
    """FLOPs of one optimiser step with a frozen base (LoRA's own FLOPs are negligible):
    linears 4·N·tokens (forward 2N, backward only the input gradient 2N, no weight gradient);
    attention 3 × forward, forward = 4·layers·(heads·head_dim)·len² per sequence (QKᵀ and AV, causal
    half not subtracted, as nanoGPT); head 4·vocab·hidden per completion token (logits + input grad)."""
    attn = 12 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * sum(n * n for n in lengths)
    head = 4 * config.vocab_size * config.hidden_size * label_tokens
    return 4 * linear_params(config) * sum(lengths) + attn + head


def peak_flops(cfg: dict, device: torch.device) -> float | None:
    if cfg["peak_flops"]:
        return float(cfg["peak_flops"])
    if device.type != "cuda":
        return None  # MFU is reported on CUDA only
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


# ----------------------------------------------------------------------------------------- checkpoints
def run_key(params: dict, base_sha256: str, data_sha256: str) -> str:
    """What a checkpoint must match to be resumed from: the math of the run, not its speed knobs.

    Whole groups: the training data (its sha256: every data.* setting acts through it), the base model
    (its weights' sha256: model.name), lora.*, and the train.* fields marked math=True in stages.config.
    Anything else (logging, saving, devices, memory and speed knobs) leaves a checkpoint resumable; an
    unknown key cannot reach here (stages.config refuses it)."""
    train_cfg = {k: params["train"][k] for k in math_keys("train")}
    lora = {k: params["lora"][k] for k in math_keys("lora")}
    blob = json.dumps([train_cfg, lora, base_sha256, data_sha256], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def rng_state(device: torch.device) -> dict:
    """The random state dropout draws from: the CPU's, and that of the process's GPU."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and device.type == "cuda":
        cuda = state["cuda"]
        if cuda.dim() == 2:  # checkpoints before multi-GPU held one row per visible GPU
            cuda = cuda[device.index or 0]
        torch.cuda.set_rng_state(cuda, device)


def rng_file(rank: int) -> str:
    return "rng.pt" if rank == 0 else f"rng-rank{rank}.pt"


def save_checkpoint(
    folder: Path, step: int, key: str, model, optimizer, scheduler, extra: dict, rng_states: list[dict]
) -> None:
    """checkpoints/step-NNNNNN/, written in a temp folder then renamed: a half-written one never exists.
    rng_states: one per process (rank order); the model and optimiser are the same on every rank."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-step-", dir=folder))
    adapter = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    save_file(adapter, tmp / "adapter.safetensors")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    for rank, state in enumerate(rng_states):
        torch.save(state, tmp / rng_file(rank))
    # The sizes of its files, checked before resuming: a file cut short is never loaded.
    files = {p.name: p.stat().st_size for p in tmp.iterdir()}
    write_json(tmp / "state.json", {"step": step, "run_key": key, "files": files, **extra})
    os.replace(tmp, folder / f"step-{step:06d}")
    for old in sorted(folder.glob("step-*"))[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)


def checkpoint_complete(ckpt: Path, key: str) -> bool:
    """A checkpoint of this run whose state.json parses and whose files have the sizes it records."""
    try:
        state = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
        files = state["files"]
        return state["run_key"] == key and bool(files) and all(
            (ckpt / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def find_checkpoint(folder: Path, key: str) -> Path | None:
    """Latest complete checkpoint of this run; those of another run are removed (never resumable)."""
    found = None
    for ckpt in sorted(folder.glob("step-*")):
        if checkpoint_complete(ckpt, key):
            found = ckpt
        else:
            print(f"train: removing checkpoint {ckpt}: incomplete, or of another run (other params, data or base model)")
            shutil.rmtree(ckpt, ignore_errors=True)
    for tmp in folder.glob(".tmp-step-*"):  # left by a crash mid-write
        shutil.rmtree(tmp, ignore_errors=True)
    return found


def load_checkpoint(ckpt: Path, model, optimizer, scheduler, device: torch.device, rank: int = 0) -> dict:
    """Restore a checkpoint into this process (every rank reads the same folder); returns its state.json.
    The RNG state is this rank's; state["rng_restored"] is False if the checkpoint was written by fewer
    processes and has none for this rank."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(ckpt / "adapter.safetensors", device=str(device)))
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=True))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    state = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
    state["rng_restored"] = (ckpt / rng_file(rank)).is_file()
    if state["rng_restored"]:
        set_rng_state(torch.load(ckpt / rng_file(rank), weights_only=True), device)
    return state


# ------------------------------------------------------------------------------------------- the loop
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
    multi-GPU run passes its share of the batch and the whole batch's label_tokens."""
    if label_tokens is None:
        label_tokens = sum(len(ids) - p for ids, p in examples)
    total = torch.zeros((), dtype=torch.float32, device=device)
    lengths = [len(ids) for ids, _ in examples]
    for rows in plan_packed_micro_batches(lengths, row_tokens, rows_per_micro_batch):
        batch = {k: v.to(device, non_blocking=True)
                 for k, v in collate_packed(examples, rows, row_tokens, pad_id).items()}
        hidden = forward(batch["input_ids"], batch["position_ids"], batch["doc_ids"])
        loss_sum, _ = completion_loss(hidden, batch["targets"], head_weight, softcap=softcap,
                                      label_smoothing=label_smoothing)
        (loss_sum / label_tokens).backward()
        total += loss_sum.detach()
    return total.item() / label_tokens  # one device sync per step, not one per micro-batch


def steps_with_nonzero_lr(cfg: dict, n_steps: int) -> int:
    """How many of the run's optimiser steps have a learning rate above 0 under train.lr_scheduler and
    train.warmup_ratio (a linear warm-up starts at 0): with none, the adapter stays at its initialisation.
    Replays the schedule on a throwaway optimiser, so it is the scheduler's own arithmetic."""
    from transformers import get_scheduler

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=float(cfg["learning_rate"]))
    scheduler = get_scheduler(cfg["lr_scheduler"], optimizer,
                              num_warmup_steps=math.ceil(float(cfg["warmup_ratio"]) * n_steps),
                              num_training_steps=n_steps)
    count = 0
    for _ in range(n_steps):
        count += scheduler.get_last_lr()[0] > 0
        optimizer.step()
        scheduler.step()
    return count


def step_examples(examples, step: int, effective_batch: int, seed: int, rank: int = 0, world: int = 1):
    """(the whole effective batch of optimiser step `step`, this process's share of it).

    Every rank draws the whole batch and computes its share (stages.distributed.shard)."""
    chosen = [examples[i] for i in batch_indices(step, len(examples), effective_batch, seed)]
    return chosen, [chosen[i] for i in distributed.shard([len(ids) for ids, _ in chosen], rank, world)]


def micro_batch_shapes(examples, steps, effective_batch: int, seed: int, row_tokens: int,
                       rows_per_micro_batch: int, rank: int = 0, world: int = 1) -> set[int]:
    """The row counts of every micro-batch this process will run in `steps` (the data order is fixed)."""
    shapes = set()
    for step in steps:
        _, share = step_examples(examples, step, effective_batch, seed, rank, world)
        lengths = [len(ids) for ids, _ in share]
        shapes.update(len(micro) for micro in plan_packed_micro_batches(lengths, row_tokens, rows_per_micro_batch))
    return shapes


def row_length(lengths: list[int], multiple: int = 64) -> int:
    """Length of the packed rows: the longest example, rounded up (one shape for the whole run)."""
    return -(-max(lengths) // multiple) * multiple


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
    """Train LoRA adapters on `train_records` (processed records: prompt, completion) and return stats
    (those of metrics/train.json and metrics/runtime/train.json, plus "history": the logged rows of every
    logging step, throughput included).

    adapter_dir / checkpoint_dir / metrics_dir may be None to skip those outputs (benchmarks).
    dvclive=False keeps metrics/train.json but skips the per-step dvclive log (hosts without dvc).
    model_dir overrides params model.name (tests); tokenizer, if given, must be that model's (saves
    loading it again: seconds). on_step(step) is called after every optimiser step
    (1-based), after any checkpoint of that step; an exception from it stops the run like a crash.

    Inside a process group (a torchrun launch, see main) every rank calls this with the same arguments;
    rank 0 alone writes the adapter, checkpoints, metrics and the progress bar."""
    params = validate_params(params)  # settings built in code (tests, benchmarks) get the same checks
    cfg = params["train"]
    start_time = time.perf_counter()
    startup = process_seconds()  # what the train stage spent before train(): Python, imports, reading
    model_dir = Path(model_dir) if model_dir else model_sources.resolve_model(params["model"]["name"])
    # lora.target_modules against the model's module names (read from its config, no weights): a name
    # that matches nothing would otherwise leave that layer silently unadapted
    check_target_modules(params["lora"]["target_modules"], model_dir, params["model"]["name"])
    device = model_sources.pick_device(cfg["device"])
    dtype = model_sources.pick_dtype(device)
    cap_gb, cap_why = memory_cap(cfg["max_memory_gb"], device)  # before the model takes memory
    compiled = bool(cfg["compile_layers"])
    problem = model_sources.compile_problem("train.compile_layers", device) if compiled else None
    if problem:
        raise model_sources.DeviceError(problem)
    rank, world = distributed.rank_and_world()  # (0, 1) for a single process
    is_main = rank == 0
    if not is_main:  # the other ranks only read (checkpoints) and compute
        adapter_dir = metrics_dir = None
        progress = False
    if cfg["num_threads"]:
        torch.set_num_threads(int(cfg["num_threads"]))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    base_sha256 = model_sources.weights_sha256(model_dir)
    data_sha256 = data_sha256 or records_sha256(train_records)
    key = run_key(params, base_sha256, data_sha256)

    tokenizer = tokenizer or model_sources.load_tokenizer(model_dir)
    examples = [encode_record(tokenizer, r) for r in train_records]
    n_examples = len(examples)
    n_steps = total_steps(cfg, n_examples)
    effective_batch = int(cfg["effective_batch"])

    torch.manual_seed(int(cfg["seed"]))  # LoRA init and dropout
    model = build_model(params, model_dir, device, dtype)
    base = model.get_base_model()
    decoder, head = base.get_decoder(), base.get_output_embeddings().weight
    softcap = getattr(base.config, "final_logit_softcapping", None)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    if world > 1:
        distributed.broadcast_parameters(trainable)  # the same LoRA init on every rank, by construction
        torch.manual_seed(int(cfg["seed"]) + rank)  # but each rank its own dropout masks

    # Micro-batch token budget; under a memory cap, lower it by the estimate of stages.batching, and
    # only if not even the longest example fits, recompute activations (gradient checkpointing).
    # CPUs run faster with small micro-batches (cache-sized matmuls); GPUs want large ones.
    budget = int(cfg["micro_batch_tokens"])
    if device.type == "cpu" and cfg["cpu_micro_batch_tokens"]:
        budget = int(cfg["cpu_micro_batch_tokens"])
    checkpointing = False
    row_tokens = row_length([len(ids) for ids, _ in examples])
    if cap_gb:
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        # + LoRA's grads and Adam moments, and the head's loss chunk as completion_loss computes it
        fixed = weight_bytes + n_trainable * 4 * 3 + head_chunk_bytes(head.shape[0], softcap)
        act_bytes = 2 if dtype == torch.bfloat16 else 4
        per_token = activation_bytes_per_token(base.config, act_bytes)
        budget_before_cap = budget
        budget = budget_for_memory(budget, cap_gb, fixed_bytes=fixed, bytes_per_token=per_token, why=cap_why)
        if budget < row_tokens:  # not even one packed row fits
            checkpointing = True
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            per_token = base.config.num_hidden_layers * base.config.hidden_size * act_bytes + (
                per_token // base.config.num_hidden_layers
            )
            budget = budget_for_memory(budget_before_cap, cap_gb, fixed_bytes=fixed, bytes_per_token=per_token,
                                       why=cap_why)
    if is_main:
        print(f"train: memory cap {f'{cap_gb:.2f} GiB' if cap_gb else 'none'} ({cap_why}) -> "
              f"micro_batch_tokens={budget}, gradient checkpointing={checkpointing}")
    # Packed rows of one length (the longest example), as many per micro-batch as the budget holds.
    rows_per_micro_batch = max(1, budget // row_tokens)
    # CUDA graphs need fixed shapes (packed rows give them) and no RNG reads inside a capture
    # (checkpointing's recomputation makes some), so they are used on CUDA without checkpointing, and
    # in one process only: under torchrun they have not yet been run on several GPUs (the measured
    # multi-GPU path is the eager one), so each rank runs eager until that is measured.
    wanted_graphs = device.type == "cuda" and cfg["cuda_graphs"]
    cuda_graphs = wanted_graphs and not checkpointing and world == 1
    if wanted_graphs and world > 1 and is_main:
        print("train: CUDA graphs off with several processes (not yet measured on several GPUs)")
    if compiled:
        compile_layers(decoder)  # compiled at the first pass of each shape (for graphs: while capturing)
    forward = GraphedDecoder(decoder, device) if cuda_graphs else PackedDecoder(decoder)
    if cuda_graphs:
        # A graph's backward returns its gradients in the same buffers every replay; a .grad that autograd
        # adopted as-is would be overwritten by the next micro-batch, so .grad is kept allocated (zeroed,
        # never None) and every micro-batch adds into it.
        for p in trainable:
            p.grad = torch.zeros_like(p)
    if is_main:
        print(f"train: packed rows of {row_tokens} tokens, up to {rows_per_micro_batch} per micro-batch, "
              f"CUDA graphs {'on' if cuda_graphs else 'off'}, compiled layers {'on' if compiled else 'off'}")

    optimizer = torch.optim.AdamW(
        trainable,
        lr=float(cfg["learning_rate"]),
        weight_decay=float(cfg["weight_decay"]),
        fused=device.type == "cuda",
    )
    from transformers import get_scheduler  # imports peft and bitsandbytes (~2 s): after the checks

    scheduler = get_scheduler(
        cfg["lr_scheduler"],
        optimizer,
        num_warmup_steps=math.ceil(float(cfg["warmup_ratio"]) * n_steps),
        num_training_steps=n_steps,
    )

    start_step, state = 0, {}
    ckpt = find_checkpoint(Path(checkpoint_dir), key) if checkpoint_dir and is_main else None
    if world > 1:
        ckpt = distributed.broadcast_object(ckpt)  # rank 0 chose (and cleaned up); all resume from it
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, optimizer, scheduler, device, rank)
        start_step = state["step"]
        if is_main:
            print(f"train: resuming from {ckpt} (step {start_step} of {n_steps}, {world} process(es))")
        if not state["rng_restored"]:
            print(f"train: rank {rank}: {ckpt} was written by {state.get('world_size', 1)} process(es) and "
                  "holds no RNG state for this rank; its dropout masks start from a fresh seed")
            torch.manual_seed(int(cfg["seed"]) + rank + 1_000_003 * start_step)

    live = None
    if metrics_dir is not None and dvclive:
        from dvclive import Live

        # dvcyaml=False: plots are declared in the project's dvc.yaml, dvclive must not rewrite it.
        # A fresh log every run: DVC deletes the old one before the stage runs, so a resumed run replays
        # the history kept in its checkpoint and the plot always covers every step.
        live = Live(dir=str(Path(metrics_dir) / "train"), dvcyaml=False, save_dvc_exp=False)

    peak = peak_flops(cfg, device)
    logging_steps, save_steps = int(cfg["logging_steps"]), int(cfg["save_steps"])
    done_samples = state.get("samples", 0)
    done_tokens = state.get("tokens", 0)
    train_seconds = state.get("train_seconds", 0.0)
    loss_value = state.get("loss", float("nan"))
    window = {"tokens": 0, "samples": 0, "flops": 0.0, "seconds": 0.0}
    history = list(state.get("history", []))  # logged rows so far, kept in checkpoints
    if live is not None:
        for row in history:
            log_row(live, row)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    model.train()
    if cuda_graphs:  # every micro-batch shape of the run, captured before the first step is timed
        capture_start = time.perf_counter()
        shapes = micro_batch_shapes(examples, range(start_step, n_steps), effective_batch, int(cfg["seed"]),
                                    row_tokens, rows_per_micro_batch, rank, world)
        for rows in sorted(shapes, reverse=True):  # the largest first: the shared memory pool is sized once
            forward.capture(rows, row_tokens)
        if is_main:
            print(f"train: captured CUDA graphs for micro-batches of {sorted(shapes)} rows "
                  f"in {time.perf_counter() - capture_start:.1f} s")
    bar = tqdm(range(start_step, n_steps), initial=start_step, total=n_steps, desc="train", disable=not progress)
    for step in bar:
        t0 = time.perf_counter()
        chosen, share = step_examples(examples, step, effective_batch, int(cfg["seed"]), rank, world)
        lengths = [len(ids) for ids, _ in chosen]
        label_tokens = sum(len(ids) - p for ids, p in chosen)
        # Each share's loss is divided by the label tokens of the whole batch, so the ranks' gradients
        # SUM to the one-GPU one.
        step_loss = accumulate_gradients(forward, head, share, row_tokens, rows_per_micro_batch, pad_id, device,
                                         softcap, label_tokens, float(cfg["label_smoothing"]))
        if world > 1:
            step_loss = distributed.sum_gradients(trainable, step_loss)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, float(cfg["max_grad_norm"])).item()
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=not cuda_graphs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0

        loss_value = step_loss
        done_samples += len(chosen)
        done_tokens += sum(lengths)
        train_seconds += seconds
        window["tokens"] += sum(lengths)
        window["samples"] += len(chosen)
        window["flops"] += train_flops(base.config, lengths, label_tokens)
        window["seconds"] += seconds
        if (step + 1) % logging_steps == 0 or step + 1 == n_steps:
            row = {"step": step + 1, "loss": loss_value, "learning_rate": lr, "grad_norm": grad_norm,
                   "tokens_per_s": window["tokens"] / window["seconds"],
                   "samples_per_s": window["samples"] / window["seconds"]}
            if peak:
                row["mfu"] = window["flops"] / window["seconds"] / (peak * world)
            # the log line, as nanoGPT's: loss, time per step, throughput and model FLOPs utilisation
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{row['tokens_per_s']:,.0f}",
                            mfu=f"{row['mfu']:.1%}" if peak else "n/a")
            history.append(row)
            if live is not None:
                log_row(live, row)
            window = {"tokens": 0, "samples": 0, "flops": 0.0, "seconds": 0.0}
        # also at the last step: a rerun after a later crash (or a deleted output) skips the training
        if checkpoint_dir is not None and ((step + 1) % save_steps == 0 or step + 1 == n_steps):
            rng_states = distributed.gather_objects(rng_state(device)) if world > 1 else [rng_state(device)]
            if is_main:
                extra = {"history": history, "samples": done_samples, "tokens": done_tokens,
                         "train_seconds": train_seconds, "loss": loss_value, "world_size": world,
                         "epoch": (step + 1) // steps_per_epoch(n_examples, effective_batch),
                         "next_batch_in_epoch": (step + 1) % steps_per_epoch(n_examples, effective_batch)}
                save_checkpoint(Path(checkpoint_dir), step + 1, key, model, optimizer, scheduler, extra, rng_states)
        if on_step is not None:
            on_step(step + 1)
    bar.close()

    peak_gb, peak_kind = peak_memory_gb(device)
    if world > 1:
        distributed.check_in_sync(trainable)
        peak_gb = distributed.max_over_ranks(peak_gb, device)  # the fullest GPU
    # What the run computed (the same on every fresh run of these params on this kind of machine): the
    # DVC-tracked metrics/train.json and the adapter's training_info.json.
    stats = {
        "steps": n_steps,
        "samples": done_samples,
        "tokens": done_tokens,
        "final_loss": loss_value,
        "steps_with_nonzero_lr": steps_with_nonzero_lr(cfg, n_steps),
        "trainable_params": n_trainable,
    }
    # How it ran (times, throughput, memory, kernels, resume point): metrics/runtime/train.json only.
    runtime = {
        "resumed_from_step": start_step,
        "train_seconds": train_seconds,
        "wall_seconds": time.perf_counter() - start_time,
        "startup_seconds": startup,
        "tokens_per_s": done_tokens / train_seconds if train_seconds else float("nan"),  # all ranks together
        "samples_per_s": done_samples / train_seconds if train_seconds else float("nan"),
        "peak_memory_gb": peak_gb,
        "peak_memory_kind": peak_kind,
        "world_size": world,
        "micro_batch_tokens": budget,  # per process (GPU)
        "row_tokens": row_tokens,
        "rows_per_micro_batch": rows_per_micro_batch,
        "cuda_graphs": cuda_graphs,
        "compile_layers": compiled,
        "gradient_checkpointing": checkpointing,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
    }
    if live is not None:
        live.end()
    with staged_outputs() as stage:  # metrics/train.json and the adapter change together or not at all
        if metrics_dir is not None:
            stage.write_json(Path(metrics_dir) / "train.json", stats, sort_keys=True)
        if adapter_dir is not None:
            info = {
                "base_model": {"name": params["model"]["name"], "weights_sha256": base_sha256},
                "data_sha256": data_sha256,
                "params": {"train": params["train"], "lora": params["lora"], "model": params["model"]},
                "dtype": str(dtype).removeprefix("torch."),  # the compute dtype the base was held in (stages.finetuned)
                **stats,
            }
            save_adapter(model, tokenizer, Path(adapter_dir), info, stage)
    if metrics_dir is not None:  # how the run went (times, memory, device): not a DVC-tracked file
        write_runtime("train", {**stats, **runtime, "memory_cap_gb": cap_gb, "history": history},
                      Path(metrics_dir) / "runtime")
    if world > 1:
        distributed.barrier()  # every rank returns once rank 0's outputs exist
    return {**stats, **runtime, "history": history, "memory_cap_gb": cap_gb}  # everything, for benchmarks and main()


# The curves dvclive logs (DVC-tracked, plotted): what the optimisation did. Throughput and MFU vary from
# run to run, so they stay in the runtime file's history.
LIVE_METRICS = ("loss", "learning_rate", "grad_norm")


def log_row(live, row: dict) -> None:
    live.step = row["step"]
    for name in LIVE_METRICS:
        live.log_metric(name, row[name])
    live.next_step()


def save_adapter(model, tokenizer, adapter_dir: Path, info: dict, stage: StagedOutputs | None = None) -> None:
    """models/adapter/: adapter_model.safetensors, adapter_config.json, tokenizer, training_info.json,
    written to a temp folder that `stage` (with the stage's other outputs) or a staged_dir of its own
    renames into place, with a plain mkdir's permissions."""
    # PEFT holds target_modules as a set and writes it in set order, which follows Python's per-process
    # string hash seed: sorted, adapter_config.json (and so the folder's DVC hash) is the same every run.
    for config in getattr(model, "peft_config", {}).values():
        for name, value in vars(config).items():
            if isinstance(value, (set, frozenset)):
                setattr(config, name, sorted(value))
    with contextlib.nullcontext(stage.folder(adapter_dir)) if stage else staged_dir(adapter_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "training_info.json", info)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=default_params_file(),
                        help="params file (default: $TOTTO_PARAMS or params.yaml)")
    parser.add_argument("--no-dvclive", action="store_true",
                        help="skip the per-step dvclive log (for GPU hosts without dvc); metrics/train.json is kept")
    args = parser.parse_args(argv)

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
        records = read_jsonl(TRAIN_FILE)
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
                  "or schedule): the adapter is its initialisation and the model equals the base; train longer "
                  "(train.epochs / train.max_steps) or lower train.warmup_ratio")
        total = process_seconds()
        if total is not None:
            print(f"train: process wall {total:.1f} s: start-up {stats['startup_seconds']:.1f} s, train() "
                  f"{stats['wall_seconds']:.1f} s, saving and the rest {total - stats['startup_seconds'] - stats['wall_seconds']:.1f} s")


if __name__ == "__main__":
    # FileNotFoundError: data/processed/train.jsonl or model.name's folder missing
    sys.exit(run_cli(main, "train", user_errors=(FileNotFoundError,)))
