"""Throughput: model FLOPs of a step (for MFU, nanoGPT's measure), the GPU's peak."""

from __future__ import annotations

import torch

# Dense bf16 peak FLOP/s per device, for MFU (train.peak_flops overrides; unknown devices get no MFU).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}


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


