"""Batched greedy generation: the one decoding path used by the evaluate stage and the inference CLI.

Speed comes from batching (prompts sorted by length so a batch holds similar lengths and little
padding), left padding (every sequence's next token sits in the last column, so the KV cache of
`model.generate` serves the whole batch) and stopping each sequence at its own end token. Greedy
decoding with left padding gives the same tokens as one prompt at a time (up to float rounding),
which tests/test_generation.py checks.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

END_OF_TURN = "<end_of_turn>"
CACHES = ("dynamic", "static")


def end_token_ids(tokenizer) -> list[int]:
    """Every token that ends an answer: the EOS token, and <end_of_turn> where the vocabulary has it."""
    ids = []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    eot = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if isinstance(eot, int) and eot != tokenizer.unk_token_id and eot not in ids:
        ids.append(eot)
    if not ids:
        raise ValueError("tokenizer has neither an EOS token nor <end_of_turn>: generation could not stop")
    return ids


def pad_token_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    # Pad positions are masked out, so any id works; EOS is the usual stand-in.
    return end_token_ids(tokenizer)[0]


def _left_pad(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(seq) for seq in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, width - len(seq):] = 1
    return input_ids.to(device), attention_mask.to(device)


def _decode(tokenizer, new_tokens: list[int], stop_ids: set[int]) -> str:
    for pos, token in enumerate(new_tokens):
        if token in stop_ids:  # everything after the first end token is padding
            new_tokens = new_tokens[:pos]
            break
    return tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int,
    device: torch.device | str | None = None,
    progress: bool = True,
    cache: str = "dynamic",
    compile_decoding: bool = False,
) -> list[str]:
    """Greedy completions of `prompts` (text without BOS; BOS is added once by the tokenizer).

    cache: "dynamic" (transformers' default: the KV cache grows as tokens come) or "static" (transformers'
    StaticCache, allocated once for the batch's longest prompt + max_new_tokens and written in place).
    Both give the same tokens (tests/test_generation.py); on an H200 at batch 500 the static one peaked
    at 30 GiB instead of 37 and was not faster (BENCHMARKS.md, 2026-12-02). compile_decoding=True (static
    cache only) lets transformers compile the decoding step (torch.compile, CUDA graphs): each new batch
    shape then costs a compilation first (72 s there, for 1.1x).
    Returns one stripped string per prompt, in the order given, without end tokens.
    """
    if cache not in CACHES:
        raise ValueError(f"cache must be one of {CACHES}, got {cache!r}")
    if compile_decoding and cache != "static":
        raise ValueError("compile_decoding needs cache='static' (transformers compiles only static-cache decoding)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not prompts:
        return []
    device = torch.device(device) if device is not None else model.device
    stop_ids = end_token_ids(tokenizer)
    pad_id = pad_token_id(tokenizer)

    encoded = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    # Longest first: the largest batch (and any out-of-memory error) comes at once, not at the end.
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]), reverse=True)
    outputs: list[str | None] = [None] * len(prompts)

    was_training = model.training
    model.eval()
    try:
        with tqdm(total=len(prompts), desc="generate", unit="ex", disable=not progress) as bar:
            for start in range(0, len(order), batch_size):
                indices = order[start:start + batch_size]
                input_ids, attention_mask = _left_pad([encoded[i] for i in indices], pad_id, device)
                generated = model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    do_sample=False,
                    max_new_tokens=max_new_tokens,
                    eos_token_id=stop_ids,
                    pad_token_id=pad_id,
                    # The model's saved generation config may hold sampling settings; greedy ignores them
                    # but transformers warns, so clear them.
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    **({"cache_implementation": "static", "disable_compile": not compile_decoding} if cache == "static" else {}),
                )
                new_tokens = generated[:, input_ids.shape[1]:].tolist()
                for i, tokens in zip(indices, new_tokens):
                    outputs[i] = _decode(tokenizer, tokens, set(stop_ids))
                bar.update(len(indices))
    finally:
        model.train(was_training)
    return outputs
