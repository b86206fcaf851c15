"""The frozen NF4 base of QLoRA, held dequantised: what training computes with, and what the merge and the
evaluation of "the model that was trained" rebuild (table2text.model.finetuned)."""

from __future__ import annotations

import torch


class DequantizedLinear(torch.nn.Linear):
    """A frozen NF4 linear layer held dequantised: the weight is exactly what bitsandbytes dequantises on
    every pass (the NF4 values, in the compute dtype), and the forward casts as bitsandbytes' Linear4bit
    does (input to the compute dtype, output back), so a QLoRA adapter trains against the same numbers."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


def dequantize_frozen_nf4(model) -> int:
    """Replace every bitsandbytes Linear4bit of `model` by a DequantizedLinear; returns how many.

    Why: the base is frozen, so dequantising its 126 matrices on each forward and again in each backward
    (bitsandbytes' training path: dequantise, then a bf16 matmul) recomputes the same tensor ~4 times a
    micro-batch. Held dequantised, the 270M model costs 150 MB more memory (200 MB of bf16 linears
    instead of 50 MB of NF4), launches half the kernels, and has no bitsandbytes call left in the
    forward, which CUDA graphs need. train.nf4_dequantize_once: false keeps bitsandbytes' path."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, bnb.nn.Linear4bit):
                weight = dequantize_4bit(child.weight.data, child.weight.quant_state).to(child.compute_dtype)
                linear = DequantizedLinear(child.in_features, child.out_features, bias=child.bias is not None,
                                           device=weight.device, dtype=weight.dtype)
                linear.weight = torch.nn.Parameter(weight, requires_grad=False)
                if child.bias is not None:
                    linear.bias = torch.nn.Parameter(child.bias.data.to(weight.dtype), requires_grad=False)
                setattr(parent, name, linear)
                replaced += 1
    return replaced
