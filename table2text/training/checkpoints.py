"""Resume points: checkpoints/step-NNNNNN/ (the trained weights: the adapter under LoRA, every weight under
train.method full; optimiser, scheduler, every rank's RNG state), written atomically, checked by file sizes
and by the run key (the math of the run) before resuming."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from table2text.config import math_keys
from table2text.io.atomic import write_json
from table2text.model import full
from table2text.model.finetuned import is_peft

KEEP_CHECKPOINTS = 2
ADAPTER_FILE = "adapter.safetensors"  # LoRA: the adapter's weights (PEFT's state dict)
WEIGHTS_FILE = "weights.safetensors"  # train.method full: every weight, the tied head once


def run_key(params: dict, base_sha256: str, data_sha256: str) -> str:
    """What a checkpoint must match to be resumed from: the math of the run, not its speed knobs.

    Whole groups: the training data (its sha256: every data.* setting acts through it), the base model
    (its weights' sha256: model.name), lora.*, and the train.* fields marked math=True in table2text.config.
    Anything else (logging, saving, devices, memory and speed knobs) leaves a checkpoint resumable; an
    unknown key cannot reach here (table2text.config refuses it)."""
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
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-step-", dir=folder))
    if is_peft(model):
        from peft import get_peft_model_state_dict

        adapter = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}
        save_file(adapter, tmp / ADAPTER_FILE)
    else:
        save_file(full.trainable_state(model), tmp / WEIGHTS_FILE)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    for rank, state in enumerate(rng_states):
        torch.save(state, tmp / rng_file(rank))
    # The sizes of its files, checked before resuming: a file cut short is never loaded.
    files = {p.name: p.stat().st_size for p in tmp.iterdir()}
    write_json(tmp / "state.json", {"step": step, "run_key": key, "files": files, **extra}, sort_keys=True)
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
    from safetensors.torch import load_file

    if is_peft(model):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(ckpt / ADAPTER_FILE, device=str(device)))
    else:
        full.load_trainable_state(model, load_file(ckpt / WEIGHTS_FILE, device=str(device)))
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=True))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    state = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
    state["rng_restored"] = (ckpt / rng_file(rank)).is_file()
    if state["rng_restored"]:
        set_rng_state(torch.load(ckpt / rng_file(rank), weights_only=True), device)
    return state

