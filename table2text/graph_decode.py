"""Greedy decoding by a hand-written loop over the model's forward, the one-token step a CUDA graph.

Why: `model.generate` spends ~40 ms of host work per decoding step at any batch size on an H200 (masks,
logits processors, stopping criteria, a host sync per token), 20-40x what the GPU needs for the step
(issue 23). Here the step is a fixed sequence of kernels over fixed buffers, so on CUDA it is captured
once per bucket as a torch.cuda.CUDAGraph and replayed; on CPU the very same step function runs eagerly
(the tests compare it with transformers' greedy `generate` token for token).

- Buckets: prompts sorted by length and cut where it saves padded work (plan_buckets), left-padded
  within a bucket, so every row's next token sits in one column (one cache slot per step for all rows).
- Cache: transformers' StaticLayer (the layer of its StaticCache) for every layer, max_cache_len =
  longest prompt + max_new_tokens; sliding-window layers keep the full length too and get the window
  from their mask, because StaticSlidingWindowLayer picks its code path by a Python counter that a
  captured graph could not follow. The masks are built on the device from tensors the step advances
  itself (slot index, positions), so replaying the graph needs no host work.
- Prefill and step: table2text.gemma3_step's lean Gemma 3 forward (~25 kernels a layer instead of ~95,
  the head on the last position only, one query's attention as matrix products) where the model is a
  plain Gemma 3, the prefill in chunks of similar length (PREFILL_CHUNK_SLOTS); other models take their
  own forward, one prefill per bucket (lean_step=False forces that).
- Stop: a done mask on the device (rows that emitted an end token get the pad token after it, as
  `generate` pads them); the host reads it only every `check_every` steps.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from table2text import gemma3_step

# A bucket's fixed cost in cache slots of decoding work: its decoding steps (max_new_tokens graph replays,
# each a few milliseconds however few rows: ~450 kernels) and its graph capture. A new bucket is cut where
# the padded slots it saves exceed this. With the prefill in chunks (below) 65536 (2 buckets for FeTaQA
# validation) was the fastest on the H200, every reference output identical (BENCHMARKS.md).
BUCKET_COST_SLOTS = 65536
CHECK_EVERY = 8
# The lean step's attention (gemma3_step.ATTENTIONS), read at call time; bench/decode_bench.py compares them:
# matmul_tf32 was the fastest on the H200 with every reference output identical (BENCHMARKS.md).
STEP_ATTENTION = "matmul_tf32"
# The lean prefill runs a bucket in chunks of similar length (plan_buckets over its prompts, this the cost
# of a chunk in prompt slots: one more eager forward's host work), so a few long prompts do not pad the
# whole bucket's prefill to their width; 0: one prefill per bucket. Read at call time. On the H200 2048
# was faster still but left 1 of 40 reference outputs different; 4096 kept all 40 (BENCHMARKS.md).
PREFILL_CHUNK_SLOTS = 4096


def plan_buckets(lengths: list[int], batch_size: int, batch_tokens: int = 0, new_tokens: int = 0,
                 bucket_cost: int = BUCKET_COST_SLOTS) -> list[list[int]]:
    """Indices of `lengths` in buckets of similar length, longest first, minimising the padded cache slots
    (rows x (longest prompt + new_tokens), summed) plus `bucket_cost` a bucket; each bucket holds at most
    batch_size prompts and, when batch_tokens > 0, at most batch_tokens slots (a single prompt over it
    still gets a bucket of its own: nothing is dropped)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    widths = np.array([lengths[i] + new_tokens for i in order], dtype=np.float64)
    n = len(order)
    best = np.full(n + 1, np.inf)
    best[0] = 0.0
    cut = np.zeros(n + 1, dtype=np.int64)
    for end in range(1, n + 1):  # best[end]: the cheapest split of the `end` longest prompts
        start = np.arange(max(0, end - batch_size), end)  # candidate first rows of the last bucket
        rows = end - start
        slots = rows * widths[start]  # sorted longest first: a bucket's first row is its widest
        cost = best[start] + slots + bucket_cost
        if batch_tokens:
            cost = np.where((slots <= batch_tokens) | (rows == 1), cost, np.inf)
        k = int(np.argmin(cost))
        best[end], cut[end] = cost[k], start[k]
    buckets, end = [], n
    while end > 0:
        buckets.append(order[cut[end]:end])
        end = int(cut[end])
    return buckets[::-1]


def _full_static_cache(model, max_cache_len: int):
    """A transformers Cache of StaticLayers, one per decoder layer, all of the full length (see above)."""
    from transformers.cache_utils import Cache, StaticLayer

    layers = model.config.get_text_config(decoder=True).num_hidden_layers
    return Cache(layers=[StaticLayer(max_cache_len=max_cache_len) for _ in range(layers)])


def _masks(key_valid: torch.Tensor, query_slots: torch.Tensor, layer_types: set[str], window: int | None) -> dict:
    """Boolean attention masks [rows, 1, queries, slots] per layer type: a query sees the valid slots at or
    before its own (and itself, so a pad query never has an empty row, whose softmax would be NaN), the
    sliding layers only those less than `window` slots back (transformers' sliding_window_overlay)."""
    slots = torch.arange(key_valid.shape[1], device=key_valid.device)
    q = query_slots.view(1, -1, 1)
    s = slots.view(1, 1, -1)
    full = (key_valid[:, None, :] & (s <= q)) | (s == q)
    masks = {"full_attention": full[:, None]}
    if "sliding_attention" in layer_types:
        masks["sliding_attention"] = (full & (s > q - window))[:, None] if window else full[:, None]
    return masks


class BucketDecoder:
    """The state of one bucket's greedy decoding: static buffers a step reads and advances in place."""

    def __init__(self, model, rows: list[list[int]], max_new_tokens: int, stop_ids: list[int], pad_id: int,
                 device: torch.device, lean=None):
        config = model.config.get_text_config(decoder=True)
        self.model = model
        self.lean = lean  # a Gemma3Step, or None: the model's own forward
        self.layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
        unknown = self.layer_types - {"full_attention", "sliding_attention"}
        if unknown:
            raise ValueError(f"the graph decoder handles full and sliding attention layers, not {sorted(unknown)}")
        self.window = getattr(config, "sliding_window", None)
        self.max_new = max_new_tokens
        width = max(len(r) for r in rows)
        n = len(rows)
        ids = torch.full((n, width), pad_id, dtype=torch.long)
        prompt_mask = torch.zeros((n, width), dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            prompt_mask[i, width - len(r):] = True
        self.ids, prompt_mask = ids.to(device), prompt_mask.to(device)
        self.prompt_width = width
        self.lengths = [len(r) for r in rows]
        self.cache = _full_static_cache(model, width + max_new_tokens)
        # slots past the prompt hold generated tokens: valid once written, and never seen before (causal)
        self.key_valid = torch.cat([prompt_mask, torch.ones((n, max_new_tokens), dtype=torch.bool, device=device)], 1)
        # positions as transformers' generate gives them: count of real tokens before, pads at 0
        self.prompt_positions = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)
        self.stop = torch.tensor(stop_ids, dtype=torch.long, device=device)
        self.pad_id = pad_id
        self.out = torch.full((n, max_new_tokens), pad_id, dtype=torch.long, device=device)
        self.token = torch.empty((n, 1), dtype=torch.long, device=device)
        self.position = prompt_mask.long().sum(-1, keepdim=True)  # the next token's position
        self.slot = torch.tensor(width, dtype=torch.long, device=device)  # the cache slot it is written to
        self.step_index = torch.tensor(1, dtype=torch.long, device=device)  # its column in `out`
        self.done = torch.zeros(n, dtype=torch.bool, device=device)

    def prefill(self) -> None:
        if self.lean is not None:
            first = self._lean_prefill()
        else:
            slots = torch.arange(self.prompt_width, device=self.ids.device)
            masks = _masks(self.key_valid, slots, self.layer_types, self.window)
            logits = self.model(input_ids=self.ids, attention_mask=masks, position_ids=self.prompt_positions,
                                cache=self.cache, use_cache=True, logits_to_keep=1).logits[:, -1]
            first = logits.argmax(-1)
        self.out[:, 0] = first
        self.token.copy_(first.view(-1, 1))
        self.done |= torch.isin(first, self.stop)

    def prefill_chunks(self) -> list[list[int]]:
        """The bucket's rows in prefill chunks of similar length (all in one where PREFILL_CHUNK_SLOTS is 0)."""
        if not PREFILL_CHUNK_SLOTS:
            return [list(range(len(self.lengths)))]
        return plan_buckets(self.lengths, len(self.lengths), bucket_cost=PREFILL_CHUNK_SLOTS)

    def _lean_prefill(self) -> torch.Tensor:
        """The first tokens, each chunk prefilled at its own longest prompt's width: left padding puts a
        chunk's prompts in the bucket's last `width` slots, so its keys and values go there, and the slots
        before stay masked (key_valid) for its rows."""
        device = self.ids.device
        first = torch.empty(len(self.lengths), dtype=torch.long, device=device)
        for chunk in self.prefill_chunks():
            rows = torch.tensor(chunk, dtype=torch.long, device=device)
            start = self.prompt_width - max(self.lengths[i] for i in chunk)
            valid = self.key_valid[rows, start:self.prompt_width]
            masks = _masks(valid, torch.arange(valid.shape[1], device=device), self.layer_types, self.window)
            logits = self.lean.prefill(self.ids[rows, start:], self.prompt_positions[rows, start:], masks,
                                       self.cache, rows=rows, start=start, cache_rows=len(self.lengths))
            first[rows] = logits.argmax(-1)
        return first

    def step(self) -> None:
        """One decoding step over the whole bucket; only tensor operations on fixed buffers (graph-safe)."""
        self.advance(self.next_logits())

    def next_logits(self) -> torch.Tensor:
        """The next token's logits [rows, vocabulary]; writes the current token's keys and values to the cache."""
        masks = _masks(self.key_valid, self.slot.view(1), self.layer_types, self.window)
        if self.lean is not None:
            return self.lean(self.token, self.position, masks, self.slot, self.cache)
        return self.model(input_ids=self.token, attention_mask=masks, position_ids=self.position,
                          cache=self.cache, use_cache=True).logits[:, -1]

    def advance(self, logits: torch.Tensor) -> None:
        """Take the greedy token of `logits` and move every buffer on by one step."""
        nxt = torch.where(self.done, self.pad_id, logits.argmax(-1))
        self.out.index_copy_(1, self.step_index.view(1), nxt.view(-1, 1))
        self.done |= torch.isin(nxt, self.stop)
        self.token.copy_(nxt.view(-1, 1))
        self.position.add_(1)
        self.slot.add_(1)
        self.step_index.add_(1)

    def capture_step(self) -> torch.cuda.CUDAGraph:
        """The step as a CUDA graph. The first step runs eagerly on a side stream (PyTorch's warm-up before
        capture: kernels chosen, workspaces allocated); the capture records without running, so state
        moves on only by that eager step and by the replays."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.step()
        return graph

    def run(self, use_graph: bool, check_every: int) -> torch.Tensor:
        self.prefill()
        steps = self.max_new - 1  # the prefill gave the first token
        done_at = 0
        if steps > 0 and use_graph:
            run_step, done_at = self.capture_step().replay, 1
        else:
            run_step = self.step
        for k in range(done_at, steps):
            if k % check_every == 0 and bool(self.done.all()):  # the only host sync of the loop
                break
            run_step()
        return self.out.cpu()


@torch.inference_mode()
def greedy_tokens(model, encoded: list[list[int]], max_new_tokens: int, stop_ids: list[int], pad_id: int,
                  batch_size: int, batch_tokens: int = 0, device: torch.device | None = None,
                  use_graph: bool | None = None, check_every: int = CHECK_EVERY,
                  bucket_cost: int | None = None, lean_step: bool | None = None,
                  on_bucket: Callable[[int], None] | None = None) -> list[list[int]]:
    """Greedy new tokens (max_new_tokens each, pad after the first end token) for token-id prompts, in the
    order given. use_graph: capture the step as a CUDA graph (default: on CUDA devices; CPU cannot).
    bucket_cost: plan_buckets' cost of a bucket (None: BUCKET_COST_SLOTS, read at call time).
    lean_step: take table2text.gemma3_step's step (None: where the model supports it; True: it must)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if check_every < 1:
        raise ValueError(f"check_every must be >= 1, got {check_every}")
    if not stop_ids:
        raise ValueError("no end tokens: generation could not stop")
    device = torch.device(device) if device is not None else model.device
    if use_graph is None:
        use_graph = device.type == "cuda"
    if use_graph and device.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
    reason = gemma3_step.unsupported(model) if lean_step is not False else "not asked for"
    if lean_step and reason:
        raise ValueError(f"lean_step: {reason}")
    lean = gemma3_step.Gemma3Step(model, attention=STEP_ATTENTION) if reason is None else None
    outputs: list[list[int] | None] = [None] * len(encoded)
    buckets = plan_buckets([len(e) for e in encoded], batch_size, batch_tokens, max_new_tokens,
                           BUCKET_COST_SLOTS if bucket_cost is None else bucket_cost)
    for indices in buckets:
        bucket = BucketDecoder(model, [encoded[i] for i in indices], max_new_tokens, stop_ids, pad_id, device, lean)
        tokens = bucket.run(use_graph, check_every).tolist()
        del bucket  # frees the bucket's cache and graph pool before the next one
        for i, t in zip(indices, tokens):
            outputs[i] = t
        if on_bucket is not None:
            on_bucket(len(indices))
    return outputs
