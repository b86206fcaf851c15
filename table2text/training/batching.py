"""Packed (padding-free) micro-batching, collation and the completion-only loss of the train stage.

Why a loss of our own: Gemma 3's vocabulary is 262,144 wide, so the vocabulary head dominates the cost of
a step if logits are computed for every token (a 1k-token sequence materialises 1 GiB of fp32 logits).
Only completion tokens carry loss, so we run the model body to hidden states, gather the positions whose
*next* token is a completion token, and apply the head there only, in chunks, with the gradient of the
hidden states computed in the forward pass (nothing vocabulary-wide is kept for backward).

Why packing: the examples of one step differ a lot in length (FeTaQA: tens to 1,024 tokens), and padding
16 of them to the longest costs two to four times the real tokens. They are packed instead into rows of
one fixed length, with attention masked so that no token sees another example; the fixed shape also lets
a GPU replay one captured CUDA graph per row count (table2text.training.packed_forward).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE = -100  # target of a position that carries no loss


def encode_record(tokenizer, record: dict) -> tuple[list[int], int]:
    """(input ids, number of prompt ids) of a processed record, as the data contract defines them:
    prompt with special tokens (BOS once) followed by the completion without special tokens."""
    prompt_ids = tokenizer(record["prompt"], add_special_tokens=True).input_ids
    completion_ids = tokenizer(record["completion"], add_special_tokens=False).input_ids
    if not completion_ids:
        raise ValueError(f"record {record.get('id')!r}: empty completion (nothing to learn)")
    return prompt_ids + completion_ids, len(prompt_ids)


def pack_rows(lengths: list[int], row_tokens: int) -> list[list[int]]:
    """Pack examples into rows of at most `row_tokens` tokens, first-fit decreasing (padding-free batching).

    Longest first, each into the first row that still has room: a row wastes little beyond its last
    example, and an effective batch of 16 FeTaQA examples (about 4k tokens) fills about five rows of 1,024.
    Returns lists of indices into `lengths`, longest row first."""
    if row_tokens < 1:
        raise ValueError(f"row length must be positive, got {row_tokens}")
    too_long = [n for n in lengths if n > row_tokens]
    if too_long:
        raise ValueError(f"an example of {max(too_long)} tokens does not fit a packed row of {row_tokens}")
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(row_tokens - lengths[i])
    return rows


def plan_packed_micro_batches(lengths: list[int], row_tokens: int, rows_per_micro_batch: int) -> list[list[list[int]]]:
    """The rows of pack_rows, grouped into micro-batches of at most `rows_per_micro_batch` rows."""
    if rows_per_micro_batch < 1:
        raise ValueError(f"rows per micro-batch must be positive, got {rows_per_micro_batch}")
    rows = pack_rows(lengths, row_tokens)
    return [rows[i : i + rows_per_micro_batch] for i in range(0, len(rows), rows_per_micro_batch)]


def collate_packed(
    examples: list[tuple[list[int], int]], rows: list[list[int]], row_tokens: int, pad_id: int
) -> dict[str, torch.Tensor]:
    """Packed rows [rows, row_tokens]: input_ids, position_ids (restarting at 0 for every example, as
    the model would see it alone), doc_ids (which example a token belongs to; -1 for the padding at
    the row's end) and targets (as in `collate`, per example: never a token of the next example)."""
    shape = (len(rows), row_tokens)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    doc_ids = torch.full(shape, -1, dtype=torch.long)
    targets = torch.full(shape, IGNORE, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            ids, prompt_len = examples[i]
            n = len(ids)
            if not 0 < prompt_len < n:
                raise ValueError(f"example {i}: prompt length {prompt_len} leaves no completion in {n} ids")
            input_ids[r, start : start + n] = torch.tensor(ids)
            position_ids[r, start : start + n] = torch.arange(n)
            doc_ids[r, start : start + n] = i
            targets[r, start + prompt_len - 1 : start + n - 1] = torch.tensor(ids[prompt_len:])
            start += n
        # the padding is one more causal "document": each pad attends at least to itself (no empty
        # softmax row, hence no NaN in its gradient), and it carries no loss
        position_ids[r, start:] = torch.arange(row_tokens - start)
    return {"input_ids": input_ids, "position_ids": position_ids, "doc_ids": doc_ids, "targets": targets}


def packed_attention_masks(
    doc_ids: torch.Tensor, position_ids: torch.Tensor, sliding_window: int | None
) -> dict[str, torch.Tensor]:
    """Boolean attention masks [rows, 1, T, T] (True = may attend) for packed rows: causal within each
    example and never across examples; the sliding-window layers also see at most `sliding_window`
    positions back (transformers' rule: key > query - window). Keys are Gemma 3's layer types."""
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    causal = torch.ones(doc_ids.shape[1], doc_ids.shape[1], dtype=torch.bool, device=doc_ids.device).tril()
    full = same & causal
    masks = {"full_attention": full[:, None]}
    if sliding_window:
        # within one example positions are consecutive, so the position difference is the distance
        near = (position_ids[:, :, None] - position_ids[:, None, :]) < sliding_window
        masks["sliding_attention"] = (full & near)[:, None]
    else:
        masks["sliding_attention"] = masks["full_attention"]
    return masks


def collate(examples: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad (ids, prompt_len) examples into input_ids, attention_mask and targets: the unpacked
    layout, the reference that the packed rows of collate_packed are tested against.

    targets[b, t] is the id that position t must predict (ids[t + 1]) where that id is a completion
    token, else IGNORE: the shift is done here once, so the loss needs no shifting."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    targets = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for b, (ids, prompt_len) in enumerate(examples):
        if not 0 < prompt_len < len(ids):
            raise ValueError(f"example {b}: prompt length {prompt_len} leaves no completion in {len(ids)} ids")
        n = len(ids)
        input_ids[b, :n] = torch.tensor(ids)
        attention_mask[b, :n] = 1
        # position t predicts token t+1; completion tokens are ids[prompt_len:]
        targets[b, prompt_len - 1 : n - 1] = torch.tensor(ids[prompt_len:])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "targets": targets}


# Logits per loss chunk: 2**26 fp32 values, 256 positions of Gemma's 262,144-word vocabulary. Small enough
# that the head's peak (head_chunk_bytes: 512 MiB here) fits a 6 GB card beside the model, large enough
# that each chunk's matmul still fills a GPU (256 x 640 x 262,144).
HEAD_CHUNK_LOGITS = 2**26


def head_chunk_positions(vocab_size: int) -> int:
    """Completion positions per chunk of the vocabulary head's loss (completion_loss's default)."""
    return max(1, HEAD_CHUNK_LOGITS // vocab_size)


def head_chunk_bytes(vocab_size: int, softcap: float | None = None, chunk_positions: int | None = None) -> int:
    """Peak bytes that the loss of one head chunk holds at once (_HeadCrossEntropy.forward), for the
    memory model of the train stage: per logit, the fp32 logits (4) and logsumexp's one fp32 temporary
    (4), plus the fp32 tanh values that the softcap derivative reuses (4) when the model caps its
    logits. The bf16 matmul output (2) and the bf16 softmax cast for the input gradient (2) come and
    go beside fewer live fp32 tensors, so they never raise the peak."""
    chunk_positions = chunk_positions or head_chunk_positions(vocab_size)
    return chunk_positions * vocab_size * (12 if softcap else 8)


class _HeadCrossEntropy(torch.autograd.Function):
    """sum of cross-entropy of (hidden @ weight.T) against targets, chunked over positions.

    The gradient w.r.t. hidden is computed chunk by chunk during the forward pass (softmax - onehot) @ W,
    so the vocabulary-wide logits never outlive their chunk. Under LoRA the head weight is frozen (tied to
    the embeddings, not trained); when it takes a gradient (train.method full), the weight's is summed the
    same way, chunk by chunk: (softmax - onehot).T @ hidden, into one [vocab, dim] buffer in the weight's
    dtype (the size of the .grad autograd keeps anyway). The elementwise steps run in place, and a
    chunk's tensors are freed before the next chunk's matmul, so the peak is head_chunk_bytes (the values
    are those of the out-of-place formulas: the same operations on the same numbers).

    smoothing e > 0: label smoothing as F.cross_entropy(label_smoothing=e) defines it, (1 - e) x the
    cross-entropy + e x the mean over the vocabulary of -log p; its logit gradient is softmax - (1 - e) x
    onehot - e / V. At e = 0 none of its operations run (the numbers are those of plain cross-entropy)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, softcap, smoothing=0.0):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start : start + chunk_size]
            y = targets[start : start + chunk_size]
            logits = (h @ weight.T).float()
            capped = None
            if softcap:  # logits = c * tanh(raw / c), keeping tanh(raw / c) for the derivative
                capped = logits.div_(softcap).tanh_()
                logits = capped * softcap
            log_z = torch.logsumexp(logits, dim=-1)
            if smoothing:
                vocab = logits.shape[1]
                total += ((1.0 - smoothing) * (log_z - logits.gather(1, y[:, None]).squeeze(1))
                          + smoothing * (log_z - logits.mean(dim=-1))).sum()
            else:
                total += (log_z - logits.gather(1, y[:, None]).squeeze(1)).sum()
            if grad_hidden is not None or grad_weight is not None:
                if softcap:  # d/dz [c * tanh(z / c)] = 1 - tanh^2, with tanh = logits / c as before
                    derivative = torch.div(logits, softcap, out=capped).square_().neg_().add_(1.0)
                grad = logits.sub_(log_z[:, None]).exp_()  # softmax, in the logits' memory
                if smoothing:
                    grad[torch.arange(len(y), device=y.device), y] -= 1.0 - smoothing
                    grad.sub_(smoothing / vocab)
                else:
                    grad[torch.arange(len(y), device=y.device), y] -= 1.0
                if softcap:
                    grad.mul_(derivative)
                grad = grad.to(weight.dtype)
                if grad_hidden is not None:
                    grad_hidden[start : start + chunk_size] = (grad @ weight).to(hidden.dtype)
                if grad_weight is not None:
                    grad_weight.add_((grad.T @ h.to(weight.dtype)).to(weight.dtype))
            del logits, capped  # before the next chunk's matmul: two chunks are never alive at once
            grad = derivative = None
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (None if grad_hidden is None else grad_hidden * grad_output.to(grad_hidden.dtype),
                None if grad_weight is None else grad_weight * grad_output.to(grad_weight.dtype),
                None, None, None, None)


def completion_loss(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head_weight: torch.Tensor,
    *,
    softcap: float | None = None,
    chunk_size: int | None = None,
    label_smoothing: float = 0.0,
    positions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy over completion positions, number of those positions).

    hidden: [batch, time, dim] final hidden states (after the final norm); targets from `collate`.
    chunk_size: positions per head chunk, by default head_chunk_positions(vocabulary), which the train
    stage's memory model (head_chunk_bytes) assumes.
    label_smoothing: 0 <= e < 1, as F.cross_entropy's (train.label_smoothing); 0 is plain cross-entropy.
    positions: the flat indices (into batch x time) of the positions whose target is set, if the caller
    has them (the train loop computes them on the host): a boolean mask on the device would make the
    host wait for the forward to finish, to learn how many positions it selects.
    head_weight may be trainable (train.method full): it then gets its gradient from these positions, added
    by autograd to what the same (tied) tensor gets as the input embedding.
    The caller divides by the completion-token count of the whole effective batch."""
    if positions is None:
        mask = targets != IGNORE
        picked = hidden[mask]  # [n, dim]: only the positions that carry loss reach the head
        wanted = targets[mask]
    else:  # the same rows in the same (row-major) order as the mask's
        picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
        wanted = targets.reshape(-1).index_select(0, positions)
    if picked.shape[0] == 0:
        return hidden.sum() * 0.0, 0
    chunk_size = chunk_size or head_chunk_positions(head_weight.shape[0])
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be 0 <= value < 1, got {label_smoothing}")
    loss = _HeadCrossEntropy.apply(picked, head_weight, wanted, chunk_size, softcap or 0.0, float(label_smoothing))
    return loss, int(picked.shape[0])


def naive_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """The reference: full logits at every position, summed cross-entropy where targets are set."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum",
                           label_smoothing=label_smoothing)


def activation_bytes_per_token(config, dtype_bytes: int = 2, lora_bytes: int = 4) -> int:
    """Rough bytes kept for backward per token of a micro-batch (frozen base, LoRA on all 7 linears).

    Counted per decoder layer from what autograd saves: the norm inputs/outputs (~14 x hidden), the
    q/k/v/attention tensors before and after norm/rope (~6 x (heads + kv_heads) x head_dim), the MLP
    gate/up/activation/product and down input (~6 x intermediate), and the input of each LoRA adapter,
    cast to the adapters' fp32 (5 x hidden for q/k/v/gate/up, heads x head_dim for o, intermediate for
    down); attention is memory-efficient (sdpa), so no seq^2 term. An estimate used to size
    micro-batches: on an H200 (2026-12-02) 4 packed rows of 1,024 tokens of Gemma 3 270M peaked at
    5.57 GiB in all, where this predicts 6.1 GiB of activations alone (about 20% high: on the safe side;
    without the LoRA term it was 1.5x low)."""
    per_layer = (
        14 * config.hidden_size
        + 6 * (config.num_attention_heads + config.num_key_value_heads) * config.head_dim
        + 6 * config.intermediate_size
    ) * dtype_bytes
    lora_inputs = (5 * config.hidden_size + config.num_attention_heads * config.head_dim
                   + config.intermediate_size) * lora_bytes
    return config.num_hidden_layers * (per_layer + lora_inputs)


def budget_for_memory(
    token_budget: int,
    max_memory_gb: float,
    *,
    fixed_bytes: int,
    bytes_per_token: int,
    why: str | None = None,
) -> int:
    """Lower `token_budget` so that fixed_bytes (weights, optimiser, head chunk: head_chunk_bytes) plus
    activations fit under max_memory_gb (0 = no cap). Raises if even one token does not fit; `why` says
    where the cap came from (default: train.max_memory_gb=<cap>)."""
    if not max_memory_gb:
        return token_budget
    free = max_memory_gb * 2**30 - fixed_bytes
    if free < bytes_per_token:
        raise ValueError(
            f"train.{why or f'max_memory_gb={max_memory_gb}'}: a cap of {max_memory_gb:.2f} GiB, but the model "
            f"alone needs about {fixed_bytes / 2**30:.2f} GiB"
        )
    return max(1, min(token_budget, math.floor(free / bytes_per_token)))
