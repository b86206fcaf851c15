"""The model being trained: the base (NF4 or bf16) frozen, with fresh LoRA adapters, and how its adapter
is saved (models/adapter/)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from table2text.io.atomic import StagedOutputs, staged_dir, write_json
from table2text.model import sources as model_sources
from table2text.model.nf4 import dequantize_frozen_nf4

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
    model = get_peft_model(model, config)  # adapter weights in fp32 (peft's autocast_adapter_dtype)
    compute = lora_compute_dtype(cfg["lora_compute_dtype"], dtype)
    if cfg["fuse_lora"] or compute != torch.float32:  # else PEFT's own forwards, untouched
        from table2text.training import fused_lora

        counts = fused_lora.apply(model, compute, bool(cfg["fuse_lora"]))
        print(f"train: LoRA computed in {str(compute).removeprefix('torch.')} on {counts['linears']} linears; "
              f"{counts['fused_groups']} q/k/v and gate/up groups fused, {counts['unfused_groups']} left apart")
    return model


def lora_compute_dtype(setting: str, base_dtype: torch.dtype) -> torch.dtype:
    """train.lora_compute_dtype as a dtype: auto = the base's compute dtype."""
    return base_dtype if setting == "auto" else getattr(torch, setting)


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
        write_json(tmp / "training_info.json", info, sort_keys=True)


