"""The decoder's forward over packed rows (table2text.training.batching.collate_packed), eager or as CUDA graphs.

Why CUDA graphs: a 270M model at a few thousand tokens a step is bound by launching kernels, not by
arithmetic: eager PyTorch issues thousands of small kernels a step (18 layers, 7 LoRA linears each,
norms, rotary, attention, and their backward) while the GPU waits on the CPU. Packed rows have one fixed
shape, so the forward and backward of each row count are captured once
(torch.cuda.make_graphed_callables) and then replayed as two launches per micro-batch: on an H200 a
step took 0.286 s eager and 0.081 s replayed (BENCHMARKS.md, 2026-12-02). The kernels are eager's, so the
losses are too (equal for the first steps of that run; later ones within 0.22%, as far as the attention
backward's atomic adds let two runs agree); dropout draws from the CUDA generator, which each replay
advances.
"""

from __future__ import annotations

import torch

from table2text.training.batching import packed_attention_masks
from table2text.training.compile_cache import use_compile_cache


def compile_layers(decoder: torch.nn.Module) -> int:
    """torch.compile every decoder layer in place (train.compile_layers); returns how many.

    Why: between the matmuls a layer runs dozens of small memory-bound kernels (per LoRA linear: cast,
    dropout, two small matmuls, scale and add; four RMS norms; rotary; residual adds) that CUDA graphs
    replay one by one; inductor fuses them. Layer by layer ("regional compilation") because the 18
    layers share one code object: one compilation (per layer type and shape) serves them all, where
    compiling the whole model unrolls all of them. The compiled layers still compute the same function:
    tests/test_packed_forward.py compares their loss and gradients with eager ones. On an H200 (NF4,
    FeTaQA, CUDA graphs over compiled layers): 0.055 s a step instead of 0.085, for ~22 s more start-up
    (compilation; BENCHMARKS.md, 2026-12-02), so it pays off on runs of more than ~800 steps."""
    use_compile_cache()  # a second run loads the compiled kernels from .cache/torch-compile (table2text.training.compile_cache)
    layers = list(decoder.layers)
    for layer in layers:
        layer.compile()
    return len(layers)


class PackedDecoder(torch.nn.Module):
    """decoder(input_ids, position_ids, doc_ids) -> final hidden states, attention kept within examples.

    The masks are built here, from doc_ids, so that a captured graph builds them too; they are handed to
    the model as its per-layer-type mask mapping, which transformers' Gemma 3 uses as given."""

    def __init__(self, decoder: torch.nn.Module):
        super().__init__()
        self.decoder = decoder
        config = decoder.config
        self.layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
        self.sliding_window = getattr(config, "sliding_window", None) if "sliding_attention" in self.layer_types else None

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
        masks = packed_attention_masks(doc_ids, position_ids, self.sliding_window)
        mask = {t: masks[t] for t in self.layer_types} if len(self.layer_types) > 1 else masks["full_attention"]
        return self.decoder(input_ids=input_ids, position_ids=position_ids, attention_mask=mask,
                            use_cache=False).last_hidden_state


class GraphedDecoder:
    """PackedDecoder as CUDA graphs, one pair (forward, backward) per row count, captured on first use.

    All graphs share one memory pool: a micro-batch's backward always runs before the next forward, so
    their working memory can be the same. Capturing runs warm-up passes, whose dropout draws would
    shift the random stream: the generator's state is put back afterwards, so a run draws the same masks
    whatever was captured when (a resumed run included)."""

    def __init__(self, decoder: torch.nn.Module, device: torch.device):
        self.decoder = decoder
        self.device = device
        self.graphs: dict[int, object] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def capture(self, rows: int, row_tokens: int) -> None:
        """Capture the graphs of micro-batches of `rows` packed rows (any input: graphs hold no data)."""
        if rows in self.graphs:
            return
        shape = (rows, row_tokens)
        sample = (torch.zeros(shape, dtype=torch.long, device=self.device),
                  torch.arange(row_tokens, device=self.device).expand(shape).contiguous(),
                  torch.zeros(shape, dtype=torch.long, device=self.device))
        state = torch.cuda.get_rng_state(self.device)
        # Warm-up passes let lazy initialisation (cuBLAS handles and workspaces, the autograd engine,
        # compiled layers' first compile) happen outside the capture. Only the first shape needs
        # torch's default of 3; each later shape runs its own kernels once before it is captured.
        warmups = 1 if self.graphs else 3
        # a fresh wrapper per shape: make_graphed_callables replaces the forward of the module it gets
        self.graphs[rows] = torch.cuda.make_graphed_callables(
            PackedDecoder(self.decoder), sample, num_warmup_iters=warmups, pool=self.pool)
        torch.cuda.set_rng_state(state, self.device)

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
        self.capture(input_ids.shape[0], input_ids.shape[1])  # a shape not captured beforehand: now
        return self.graphs[input_ids.shape[0]](input_ids, position_ids, doc_ids)
