"""The lean Gemma 3 step computes the model's own step: the same next-token logits (to fp32 rounding) after
the same prefill, the same greedy tokens, and it refuses models it does not cover."""

import pytest
import torch

from table2text import gemma3_step, graph_decode
from table2text.generation import end_token_ids, pad_token_id
from tests.test_generation import PROMPTS, short_window_model_dir, tiny  # noqa: F401 (fixtures)


def bucket(model, tokenizer, lean):
    encoded = tokenizer(PROMPTS, add_special_tokens=True)["input_ids"]
    b = graph_decode.BucketDecoder(model, encoded, 6, end_token_ids(tokenizer), pad_token_id(tokenizer),
                                    torch.device("cpu"), lean)
    b.prefill()
    return b


def decoders(model, tokenizer, lean):
    """The lean decoder (its own prefill) and the model's, on the same prompts, before their prefills."""
    encoded = tokenizer(PROMPTS, add_special_tokens=True)["input_ids"]
    return [graph_decode.BucketDecoder(model, encoded, 6, end_token_ids(tokenizer), pad_token_id(tokenizer),
                                       torch.device("cpu"), step) for step in (lean, None)]


@torch.inference_mode()
def test_the_lean_prefill_fills_the_cache_and_picks_the_first_token_as_the_model_does(tiny):
    model, tokenizer = tiny
    ours, theirs = decoders(model, tokenizer, gemma3_step.Gemma3Step(model))
    ours.prefill()
    theirs.prefill()
    assert torch.equal(ours.out[:, 0], theirs.out[:, 0])
    for a, b in zip(ours.cache.layers, theirs.cache.layers):  # prompt slots filled, generated slots empty
        torch.testing.assert_close(a.keys, b.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.values, b.values, rtol=1e-5, atol=1e-5)
    width = ours.prompt_width
    assert not ours.cache.layers[0].keys[:, :, width:].any()


@torch.inference_mode()
def test_a_bucket_prefilled_in_chunks_holds_the_cache_and_first_tokens_of_one_prefill(tiny, monkeypatch):
    model, tokenizer = tiny
    lean = gemma3_step.Gemma3Step(model)
    monkeypatch.setattr(graph_decode, "PREFILL_CHUNK_SLOTS", 0)
    whole = bucket(model, tokenizer, lean)
    monkeypatch.setattr(graph_decode, "PREFILL_CHUNK_SLOTS", 1)  # a chunk costs next to nothing: many chunks
    chunked = bucket(model, tokenizer, lean)
    chunks = chunked.prefill_chunks()
    assert len(chunks) > 1 and sorted(i for c in chunks for i in c) == list(range(len(PROMPTS)))
    assert torch.equal(chunked.out[:, 0], whole.out[:, 0])
    for a, b in zip(chunked.cache.layers, whole.cache.layers):  # each row's prompt slots; pads' stay zero
        valid = chunked.key_valid[:, None, :, None]
        torch.testing.assert_close(a.keys * valid, b.keys * valid, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.values * valid, b.values * valid, rtol=1e-5, atol=1e-5)
        assert not (a.keys * ~valid).any()
    for _ in range(3):  # and the steps read them alike
        x, y = chunked.next_logits(), whole.next_logits()
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
        chunked.advance(x)
        whole.advance(y)


@pytest.mark.parametrize("attention", gemma3_step.ATTENTIONS)
@torch.inference_mode()
def test_the_lean_prefill_logits_equal_the_models_last_position(tiny, attention):
    model, tokenizer = tiny
    lean = gemma3_step.Gemma3Step(model, attention=attention)
    ours, theirs = decoders(model, tokenizer, lean)
    slots = torch.arange(ours.prompt_width)
    masks = graph_decode._masks(ours.key_valid, slots, ours.layer_types, ours.window)
    got = lean.prefill(ours.ids, ours.prompt_positions, masks, ours.cache)
    want = model(input_ids=theirs.ids, attention_mask=masks, position_ids=theirs.prompt_positions,
                 cache=theirs.cache, use_cache=True).logits[:, -1]
    assert got.shape == (len(PROMPTS), model.config.vocab_size) and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention", gemma3_step.ATTENTIONS)
@torch.inference_mode()
def test_next_token_logits_equal_the_models_step_over_several_steps(tiny, attention):
    model, tokenizer = tiny
    lean = gemma3_step.Gemma3Step(model, attention=attention)
    ours, theirs = bucket(model, tokenizer, lean), bucket(model, tokenizer, None)
    for _ in range(4):  # each step reads the keys and values the earlier steps wrote
        a, b = ours.next_logits(), theirs.next_logits()
        assert a.shape == b.shape == (len(PROMPTS), model.config.vocab_size)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        ours.advance(a)
        theirs.advance(b)
        assert torch.equal(ours.out, theirs.out)
    assert torch.equal(ours.cache.layers[0].keys, theirs.cache.layers[0].keys)


def test_an_unknown_attention_is_refused(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="attention must be one of"):
        gemma3_step.Gemma3Step(model, attention="flash")


def test_greedy_tokens_are_the_same_with_and_without_the_lean_step(tiny, monkeypatch):
    model, tokenizer = tiny
    encoded = tokenizer(PROMPTS, add_special_tokens=True)["input_ids"]
    stop, pad = end_token_ids(tokenizer), pad_token_id(tokenizer)
    lean = graph_decode.greedy_tokens(model, encoded, 10, stop, pad, batch_size=2, lean_step=True)
    plain = graph_decode.greedy_tokens(model, encoded, 10, stop, pad, batch_size=2, lean_step=False)
    assert lean == plain
    monkeypatch.setattr(graph_decode, "PREFILL_CHUNK_SLOTS", 1)
    chunked = graph_decode.greedy_tokens(model, encoded, 10, stop, pad, batch_size=8, lean_step=True)
    assert chunked == plain  # one bucket, prefilled in chunks; the plain decoder prefills a bucket at once


def test_a_peft_wrapped_model_is_refused_and_lean_step_true_says_why(tiny):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = tiny
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    try:
        assert "PeftModel" in gemma3_step.unsupported(wrapped)
        inner = wrapped.base_model.model  # the Gemma3ForCausalLM, its q_proj now a LoRA layer
        assert "projection of type" in gemma3_step.unsupported(inner)
        with pytest.raises(ValueError, match="lean_step: a projection of type"):
            graph_decode.greedy_tokens(inner, [[2, 5, 6]], 2, end_token_ids(tokenizer), pad_token_id(tokenizer),
                                       batch_size=1, lean_step=True)
    finally:
        wrapped.unload()  # the session's tiny model stays a plain Gemma 3 for the other tests
    assert gemma3_step.unsupported(model) is None


@torch.inference_mode()
def test_a_cache_filled_under_autocast_is_refused_in_one_line(tiny):
    model, tokenizer = tiny
    encoded = tokenizer(PROMPTS[:2], add_special_tokens=True)["input_ids"]
    b = graph_decode.BucketDecoder(model, encoded, 4, end_token_ids(tokenizer), pad_token_id(tokenizer),
                                    torch.device("cpu"), gemma3_step.Gemma3Step(model))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as accelerate's wrapped forward runs the prefill
        b.prefill()
    with pytest.raises(ValueError, match="cache holds torch.bfloat16 .*but the model computes in torch.float32"):
        b.step()
