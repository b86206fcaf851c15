"""Full fine-tuning (train.method full): the model whose every weight is trained, and how its weights are
saved (models/adapter/, the train stage's output folder, which then holds the whole trained model).

Precision: the weights are fp32 master weights, and stay fp32 in the saved files (merge.dtype decides
what the merged model stores). On CUDA the forward runs under bf16 autocast (table2text.training.loop);
pure bf16 weights would lose the update: AdamW moves a weight by about lr a step, and at lr 5e-5 that is
below half of bf16's spacing for any weight of magnitude 1/64 or more, so it would round back. fp16 is
never used: Gemma 3's activations overflow it. CPUs compute in fp32.

Tied embedding: Gemma 3's input embedding is its output head (one [vocab, dim] tensor, 168M of the 268M
weights). It stays one parameter: its gradient is the head's (completion positions, through
table2text.training.batching.completion_loss) plus the embedding lookup's, summed by autograd.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from table2text.io.atomic import StagedOutputs, staged_dir, write_json
from table2text.model import sources as model_sources

METHOD = "full"


def build_full_model(model_dir: Path, device: torch.device):
    """The base model in fp32 with every weight trainable (the tied embedding/head once)."""
    model = model_sources.load_model(model_dir, quantization="none", dtype=torch.float32, device=device)
    model.config.use_cache = False  # training needs no KV cache
    model.requires_grad_(True)
    head, embedding = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    if model.config.tie_word_embeddings and head is not embedding:
        raise RuntimeError("the model's config ties its embedding and head, but they are two tensors")
    return model


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The compute dtype of a full run's forward: bf16 autocast on a CUDA GPU that has it, else none (fp32)."""
    if device.type == "cuda" and model_sources.pick_dtype(device) == torch.bfloat16:
        return torch.bfloat16
    return None


def trainable_state(model) -> dict[str, torch.Tensor]:
    """Every parameter by name, the tied head once (named_parameters lists a shared tensor once), on the CPU."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters()}


@torch.no_grad()
def load_trainable_state(model, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` (trainable_state of the same architecture) into `model`; refuses missing or extra names."""
    params = dict(model.named_parameters())
    if set(params) != set(state):
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise ValueError(f"checkpoint weights do not match the model: missing {missing[:3]}, extra {extra[:3]}")
    for name, p in params.items():
        p.copy_(state[name])


def save_full_model(model, tokenizer, out_dir: Path, info: dict, stage: StagedOutputs | None = None) -> None:
    """models/adapter/ of a full run: model.safetensors (fp32, the tied head stored once), config.json,
    generation_config.json, the tokenizer and training_info.json, renamed into place with the stage's
    other outputs (or a staged_dir of its own)."""
    with contextlib.nullcontext(stage.folder(out_dir)) if stage else staged_dir(out_dir) as tmp:
        model.config.use_cache = True  # as a loaded model decodes; training had turned it off
        try:
            model.save_pretrained(tmp, safe_serialization=True)
        finally:
            model.config.use_cache = False
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "training_info.json", info, sort_keys=True)
