"""Batched greedy or beam-search generation: the one decoding path of the evaluate stage and the inference CLI.

Speed comes from batching (prompts sorted by length so a batch holds similar lengths and little
padding), left padding (every sequence's next token sits in the last column, so the KV cache of
`model.generate` serves the whole batch) and stopping each sequence at its own end token. Greedy
decoding with left padding gives the same tokens as one prompt at a time (up to float rounding),
which tests/test_generation.py checks. Beam search (num_beams > 1) runs on the same batches: transformers
expands each prompt to num_beams rows, so a batch's cache holds num_beams times the slots.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from table2text.model.sources import compile_problem

END_OF_TURN = "<end_of_turn>"
CACHES = ("dynamic", "static")
# "generate": transformers' model.generate; "graph": table2text.graph_decode (a hand-written greedy loop over a
# static cache, its decoding step a CUDA graph on GPUs).
DECODERS = ("generate", "graph")
# eval.decoder's values: a decoder, or "auto" (resolve_decoder: graph where it applies and is faster, else generate)
DECODER_CHOICES = ("auto", *DECODERS)
# torch.set_float32_matmul_precision names of eval.fp32_matmul: "ieee" multiplies fp32 in fp32, "tf32" on
# the tensor cores with inputs rounded to TF32 (10-bit mantissa) and fp32 accumulation and outputs.
FP32_MATMUL = {"ieee": "highest", "tf32": "high"}


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


def left_pad(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """`sequences` as one batch padded on the left with pad_id (input_ids, attention_mask) on `device`:
    every sequence's next token then sits in the last column."""
    width = max(len(seq) for seq in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, width - len(seq):] = 1
    return input_ids.to(device), attention_mask.to(device)


def plan_batches(lengths: list[int], batch_size: int, batch_tokens: int = 0, new_tokens: int = 0) -> list[list[int]]:
    """Indices of `lengths` in batches, longest first: at most batch_size prompts a batch and, when
    batch_tokens > 0, at most batch_tokens cache slots (prompts x (longest prompt + new_tokens)), so a
    batch of short prompts holds more of them and little padding; a single prompt over the budget still
    forms a batch of its own (nothing is dropped)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    batches: list[list[int]] = []
    for i in order:
        # sorted longest first: a batch's first prompt is its longest, so its width is known at once
        if batches and len(batches[-1]) < batch_size and (
            not batch_tokens or (len(batches[-1]) + 1) * (lengths[batches[-1][0]] + new_tokens) <= batch_tokens
        ):
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


@contextmanager
def fp32_matmul_precision(fp32_matmul: str, device: torch.device):
    """While inside: fp32 matmuls on a CUDA `device` as FP32_MATMUL[fp32_matmul] says; CPUs keep IEEE fp32
    (the CPU pipeline's numbers stay as they were). The process's setting is put back afterwards."""
    if fp32_matmul not in FP32_MATMUL:
        raise ValueError(f"fp32_matmul must be one of {sorted(FP32_MATMUL)}, got {fp32_matmul!r}")
    before = torch.get_float32_matmul_precision()
    if device.type == "cuda":
        torch.set_float32_matmul_precision(FP32_MATMUL[fp32_matmul])
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def resolve_decoder(decoder: str, device, cache: str = "static", num_beams: int = 1,
                    compile_decoding: bool = False) -> str:
    """The decoder that `decoder` means on `device`: "generate" and "graph" as given; "auto" is "graph" on a
    CUDA device when greedy over a static cache (what it needs), "generate" otherwise. Why: on an H200 the
    graph decoder ran 300.6 vs 129.9 examples/s (500 FeTaQA prompts, batch 500, 40/40 identical to
    one-at-a-time decoding; BENCHMARKS.md); on a CPU it has no graph and its eager loop was slower than
    generate (demo, 15 prompts, 2 cores: 24.8 vs 19.6 s and 39.6 vs 32.8 s back to back, 15/15 identical)."""
    if decoder not in DECODER_CHOICES:
        raise ValueError(f"decoder must be one of {DECODER_CHOICES}, got {decoder!r}")
    if decoder != "auto":
        return decoder
    on_cuda = torch.device(device).type == "cuda" if device is not None else False
    return "graph" if on_cuda and cache == "static" and num_beams == 1 and not compile_decoding else "generate"


def decode_new_tokens(tokenizer, new_tokens: list[int], stop_ids: set[int]) -> str:
    """The text of generated tokens up to (without) the first of stop_ids, special tokens skipped, stripped."""
    for pos, token in enumerate(new_tokens):
        if token in stop_ids:  # everything after the first end token is padding
            new_tokens = new_tokens[:pos]
            break
    return tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


def _graph_generate(model, tokenizer, encoded, max_new_tokens, batch_size, batch_tokens, device, progress,
                    fp32_matmul, stop_ids, pad_id, lean_step) -> list[str]:
    from table2text.graph_decode import greedy_tokens  # imported here: generate's own path does not need it

    was_training = model.training
    model.eval()
    try:
        with fp32_matmul_precision(fp32_matmul, device), \
                tqdm(total=len(encoded), desc="generate", unit="ex", disable=not progress) as bar:
            tokens = greedy_tokens(model, encoded, max_new_tokens, stop_ids, pad_id, batch_size, batch_tokens,
                                   device, lean_step=lean_step, on_bucket=bar.update)
    finally:
        model.train(was_training)
    return [decode_new_tokens(tokenizer, t, set(stop_ids)) for t in tokens]


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
    batch_tokens: int = 0,
    fp32_matmul: str = "ieee",
    decoder: str = "generate",
    num_beams: int = 1,
    length_penalty: float = 1.0,
    lean_step: bool | None = None,
) -> list[str]:
    """Greedy (num_beams=1) or beam-search completions of `prompts` (text without BOS; BOS is added once
    by the tokenizer).

    cache: "dynamic" (transformers' default: the KV cache grows as tokens come) or "static" (transformers'
    StaticCache, allocated once for the batch's longest prompt + max_new_tokens and written in place).
    Both give the same tokens (tests/test_generation.py); on an H200 at batch 500 the static one peaked
    at 30 GiB instead of 37 and was not faster (BENCHMARKS.md, 2026-12-02). compile_decoding=True (static
    cache only) lets transformers compile the decoding step (torch.compile, CUDA graphs): each new batch
    shape then costs a compilation first (72 s there, for 1.1x).
    batch_tokens > 0 also caps each batch's prompts x (longest prompt + max_new_tokens) (plan_batches):
    the memory of the KV cache and the padded work of the prefill.
    fp32_matmul ("ieee" | "tf32", FP32_MATMUL) sets how an fp32 model multiplies on a GPU while generating.
    TF32 rounds each matmul's inputs alone and keeps fp32 sums and outputs, so a batch changes the
    rounding no more than in IEEE fp32 (unlike bf16, whose outputs are rounded): on an H200, 40 of 40
    outputs were identical to one-at-a-time TF32 decoding, 498 of 500 equal to IEEE fp32 ones, at 114
    examples/s instead of 84 (batch 500; BENCHMARKS.md, 2026-12-02).
    decoder ("auto" | "generate" | "graph", DECODER_CHOICES): "graph" decodes with table2text.graph_decode (static
    cache only, batches cut by length buckets within batch_size and batch_tokens); "auto" picks one
    (resolve_decoder: graph on CUDA when greedy over a static cache, else generate).
    num_beams > 1: beam search (transformers' generate), returning each prompt's best beam; length_penalty
    is its exponent on the length that divides a finished beam's log-probability (> 1 favours longer
    sentences, < 1 shorter). batch_tokens then counts every beam's slots (prompts x num_beams x width).
    Greedy decoding never reads length_penalty.
    lean_step (graph decoder only; None for the others): the graph decoder's step, passed to
    graph_decode.greedy_tokens: None takes table2text.gemma3_step's lean step where the model supports it,
    True requires it, False takes the model's own forward (the lean step's baseline in bench/decode_bench.py).
    Returns one stripped string per prompt, in the order given, without end tokens.
    """
    device = torch.device(device) if device is not None else model.device
    decoder = resolve_decoder(decoder, device, cache, num_beams, compile_decoding)
    check_generate_settings(model, max_new_tokens, batch_size, device, cache, compile_decoding, decoder, num_beams,
                            lean_step)
    if not prompts:
        return []
    stop_ids = end_token_ids(tokenizer)
    pad_id = pad_token_id(tokenizer)

    encoded = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    if decoder == "graph":
        return _graph_generate(model, tokenizer, encoded, max_new_tokens, batch_size, batch_tokens, device,
                               progress, fp32_matmul, stop_ids, pad_id, lean_step)
    return _generate_batches(model, tokenizer, encoded, max_new_tokens, batch_size, batch_tokens, device,
                             progress, cache, compile_decoding, fp32_matmul, num_beams, length_penalty,
                             stop_ids, pad_id)


def check_generate_settings(model, max_new_tokens: int, batch_size: int, device, cache: str, compile_decoding: bool,
                            decoder: str, num_beams: int, lean_step: bool | None = None) -> None:
    """generate()'s settings, each one checked: raises ValueError naming the first that is wrong."""
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    if lean_step is not None and decoder != "graph":  # decoder as resolved: "auto" may have picked generate
        raise ValueError(f"lean_step={lean_step!r} chooses the graph decoder's step: it needs decoder='graph', "
                         f"got decoder={decoder!r}")
    if decoder == "graph" and (cache != "static" or compile_decoding):
        raise ValueError("decoder='graph' needs cache='static' and no compile_decoding (it captures its own step)")
    if decoder == "graph" and num_beams > 1:
        raise ValueError("decoder='graph' decodes greedily: it takes num_beams=1")
    if cache not in CACHES:
        raise ValueError(f"cache must be one of {CACHES}, got {cache!r}")
    if compile_decoding and cache != "static":
        raise ValueError("compile_decoding needs cache='static' (transformers compiles only static-cache decoding)")
    if compile_decoding:
        problem = compile_problem("compile_decoding", torch.device(device) if device is not None else model.device)
        if problem:
            raise ValueError(problem)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")


def _generate_batches(model, tokenizer, encoded, max_new_tokens, batch_size, batch_tokens, device, progress, cache,
                      compile_decoding, fp32_matmul, num_beams, length_penalty, stop_ids, pad_id) -> list[str]:
    """generate() through transformers' model.generate, batch by batch (plan_batches); outputs in prompt order."""
    stop_set = set(stop_ids)
    # Longest first: the largest batch (and any out-of-memory error) comes at once, not at the end.
    # a prompt takes num_beams rows of the cache: the token budget is shared by its beams
    beam_budget = max(1, batch_tokens // num_beams) if batch_tokens else 0
    batches = plan_batches([len(ids) for ids in encoded], batch_size, beam_budget, max_new_tokens)
    # greedy passes nothing new, so today's greedy calls are unchanged
    beams = {"num_beams": num_beams, "length_penalty": float(length_penalty), "num_return_sequences": 1} if num_beams > 1 else {}
    outputs: list[str | None] = [None] * len(encoded)

    was_training = model.training
    model.eval()
    try:
        with fp32_matmul_precision(fp32_matmul, device), \
                tqdm(total=len(encoded), desc="generate", unit="ex", disable=not progress) as bar:
            for indices in batches:
                input_ids, attention_mask = left_pad([encoded[i] for i in indices], pad_id, device)
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
                    **beams,
                    **({"cache_implementation": "static", "disable_compile": not compile_decoding} if cache == "static" else {}),
                )
                new_tokens = generated[:, input_ids.shape[1]:].tolist()
                for i, tokens in zip(indices, new_tokens):
                    outputs[i] = decode_new_tokens(tokenizer, tokens, stop_set)
                bar.update(len(indices))
    finally:
        model.train(was_training)
    return outputs
