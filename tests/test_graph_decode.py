"""The hand-written greedy loop gives transformers' greedy `generate` tokens, token for token (fp32, CPU);
on CUDA the same loop with its step captured as a CUDA graph gives the eager loop's tokens."""

import pytest
import torch

from table2text import graph_decode
from table2text.generation import end_token_ids, generate, pad_token_id
from table2text.graph_decode import greedy_tokens, plan_buckets
from table2text.model.sources import load_model
from tests.test_generation import PROMPTS, short_window_model_dir, tiny  # noqa: F401 (fixtures)


def hf_greedy(model, ids, max_new, stop_ids, pad_id):
    """transformers' greedy generate for one prompt, padded to max_new with pad_id as generate pads."""
    out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         do_sample=False, max_new_tokens=max_new, eos_token_id=stop_ids, pad_token_id=pad_id,
                         temperature=None, top_p=None, top_k=None)
    new = out[0, len(ids):].tolist()
    return new + [pad_id] * (max_new - len(new))


def encode(tokenizer, prompts):
    return tokenizer(list(prompts), add_special_tokens=True)["input_ids"]


def test_equals_transformers_greedy_for_mixed_lengths_in_one_batch(tiny):
    model, tokenizer = tiny
    stop, pad = end_token_ids(tokenizer), pad_token_id(tokenizer)
    encoded = encode(tokenizer, PROMPTS)
    assert len({len(e) for e in encoded}) == len(PROMPTS), "mixed prompt lengths: left padding is exercised"
    # the 8-token sliding window of this model is shorter than most prompts: the window mask matters
    ours = greedy_tokens(model, encoded, 12, stop, pad, batch_size=len(PROMPTS), bucket_cost=10**9)
    assert ours == [hf_greedy(model, e, 12, stop, pad) for e in encoded]
    assert len({tuple(t) for t in ours}) > 1


def test_equals_transformers_batched_generate_in_several_buckets(tiny):
    model, tokenizer = tiny
    stop, pad = end_token_ids(tokenizer), pad_token_id(tokenizer)
    encoded = encode(tokenizer, PROMPTS)
    buckets = plan_buckets([len(e) for e in encoded], batch_size=2, new_tokens=6)
    assert len(buckets) == 3 and max(len(b) for b in buckets) == 2
    assert greedy_tokens(model, encoded, 6, stop, pad, batch_size=2) == [hf_greedy(model, e, 6, stop, pad)
                                                                        for e in encoded]
    # the path the evaluate stage takes (decoder: graph) gives the strings of today's path
    assert generate(model, tokenizer, PROMPTS, 6, 2, "cpu", progress=False, cache="static", decoder="graph") == \
        generate(model, tokenizer, PROMPTS, 6, 2, "cpu", progress=False, cache="static")


def test_early_stop_pads_after_the_end_token_and_others_run_to_the_cap(tiny, monkeypatch):
    model, tokenizer = tiny
    pad = pad_token_id(tokenizer)
    encoded = encode(tokenizer, PROMPTS[:2])
    free = [hf_greedy(model, e, 10, end_token_ids(tokenizer), pad) for e in encoded]
    first, other = free
    at = next((k for k in range(1, 9) if first[k] not in first[:k] and first[k] not in other), None)
    if at is None:
        pytest.skip("this random model emits no token usable as an artificial stop")
    stop = end_token_ids(tokenizer) + [first[at]]
    calls = []
    monkeypatch.setattr(graph_decode.BucketDecoder, "step",
                        lambda self, real=graph_decode.BucketDecoder.step: (calls.append(1), real(self)))
    ours = greedy_tokens(model, encoded, 10, stop, pad, batch_size=2, check_every=1)
    assert ours[0] == first[:at + 1] + [pad] * (9 - at)  # the end token kept, pads after it
    assert ours[1] == other  # the other row reaches max_new_tokens
    assert ours == [hf_greedy(model, e, 10, stop, pad) for e in encoded]
    assert len(calls) == 9  # max_new_tokens - 1 steps: the prefill gave the first token

    # a bucket whose every row stopped stops stepping at the next check
    calls.clear()
    alone = greedy_tokens(model, encoded[:1], 10, stop, pad, batch_size=1, check_every=1)
    assert alone[0] == ours[0] and len(calls) == at


def test_one_new_token_and_argument_checks(tiny):
    model, tokenizer = tiny
    stop, pad = end_token_ids(tokenizer), pad_token_id(tokenizer)
    encoded = encode(tokenizer, PROMPTS[:3])
    assert greedy_tokens(model, encoded, 1, stop, pad, batch_size=3) == [hf_greedy(model, e, 1, stop, pad)
                                                                        for e in encoded]
    assert greedy_tokens(model, [], 4, stop, pad, batch_size=3) == []
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        greedy_tokens(model, encoded, 4, stop, pad, batch_size=3, use_graph=True)
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_tokens(model, encoded, 0, stop, pad, batch_size=3)
    with pytest.raises(ValueError, match="decoder must be one of"):
        generate(model, tokenizer, PROMPTS[:1], 4, 1, "cpu", decoder="fast")
    with pytest.raises(ValueError, match="needs cache='static'"):
        generate(model, tokenizer, PROMPTS[:1], 4, 1, "cpu", cache="dynamic", decoder="graph")


def test_buckets_trade_padding_for_bucket_count():
    lengths = [100, 98, 97, 10, 9, 8, 8]
    # one bucket per prompt costs more than it saves at a large bucket cost: everything in one bucket
    assert plan_buckets(lengths, batch_size=8, bucket_cost=10**6) == [[0, 1, 2, 3, 4, 5, 6]]
    # at a small one the long and the short prompts part: 3 x 100 + 4 x 10 slots instead of 7 x 100
    assert plan_buckets(lengths, batch_size=8, bucket_cost=50) == [[0, 1, 2], [3, 4, 5, 6]]
    # batch_size and batch_tokens still bound a bucket; a prompt over the budget gets one of its own
    assert all(len(b) <= 2 for b in plan_buckets(lengths, batch_size=2, bucket_cost=0))
    assert plan_buckets([50, 1], batch_size=4, batch_tokens=10, bucket_cost=10**6) == [[0], [1]]
    assert sorted(i for b in plan_buckets(lengths, 3, 250, 4) for i in b) == list(range(7))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_cuda_graph_replay_equals_the_eager_loop(short_window_model_dir):  # noqa: F811
    from table2text.model.sources import load_tokenizer

    model = load_model(short_window_model_dir, dtype=torch.float32, device=torch.device("cuda"))
    tokenizer = load_tokenizer(short_window_model_dir)
    stop, pad = end_token_ids(tokenizer), pad_token_id(tokenizer)
    encoded = encode(tokenizer, PROMPTS * 3)
    torch.backends.cuda.matmul.allow_tf32 = False
    eager = greedy_tokens(model, encoded, 16, stop, pad, batch_size=4, use_graph=False)
    graphed = greedy_tokens(model, encoded, 16, stop, pad, batch_size=4, use_graph=True)
    assert graphed == eager
    assert graphed[:len(PROMPTS)] == [hf_greedy(model.cpu(), e, 16, stop, pad) for e in encoded[:len(PROMPTS)]]
