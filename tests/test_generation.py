"""Batched greedy generation gives the same sentences as one prompt at a time, stopping each on its own."""

import shutil

import pytest
import torch

from table2text import generation
from table2text.generation import end_token_ids, generate
from table2text.model.sources import load_model, load_tokenizer

PROMPTS = [
    "Describe the table.\nTable: <page_title> Alice </page_title>",
    "Hi",
    "Write one sentence about the highlighted cells of this fairly long table: "
    "<cell> 1998 <col_header> Year </col_header> </cell> <cell> Paris <col_header> City </col_header> </cell>",
    "Table: <cell> 42 </cell>",
    "A somewhat longer prompt than the short ones, to force left padding inside the batch.",
]


@pytest.fixture(scope="module")
def short_window_model_dir(tmp_path_factory, tiny_model_dir):
    """The shared tiny model with an 8-token sliding window: most prompts here are longer, so the
    sliding-window layers see left padding the way the real model (window 512) does on long tables."""
    from transformers import AutoConfig, Gemma3ForCausalLM

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.sliding_window = 8
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-gemma3-window-8")
    Gemma3ForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    for file in tiny_model_dir.glob("*"):
        if file.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(file, folder / file.name)
    return folder


@pytest.fixture(scope="module")
def tiny(short_window_model_dir):
    torch.set_num_threads(2)
    # fp32 on CPU: equality of batched and sequential decoding is then not blurred by bf16 rounding.
    model = load_model(short_window_model_dir, dtype=torch.float32, device=torch.device("cpu"))
    return model, load_tokenizer(short_window_model_dir)


def sequential(model, tokenizer, prompts, max_new_tokens):
    return [generate(model, tokenizer, [p], max_new_tokens, batch_size=1, device="cpu", progress=False)[0]
            for p in prompts]


def test_end_tokens_are_eos_and_end_of_turn(tiny):
    _, tokenizer = tiny
    assert end_token_ids(tokenizer) == [1, 106]


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_batched_equals_one_at_a_time(tiny, cache):
    model, tokenizer = tiny
    batched = generate(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=3, device="cpu", progress=False,
                       cache=cache)
    assert batched == sequential(model, tokenizer, PROMPTS, 12)
    assert len(batched) == len(PROMPTS)
    assert len(set(batched)) > 1, "a random model still answers different prompts differently"


def test_each_sequence_stops_at_its_own_end_token(tiny, monkeypatch):
    model, tokenizer = tiny
    # Find a token the model emits early for one prompt but never for another, and declare it an end
    # token: the first answer must then be cut there while the other runs to max_new_tokens in the batch.
    free = [generate(model, tokenizer, [p], 10, 1, "cpu", progress=False) for p in PROMPTS[:2]]
    ids = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in PROMPTS[:2]]
    runs = []
    for p_ids in ids:
        out = model.generate(input_ids=torch.tensor([p_ids]), do_sample=False, max_new_tokens=10,
                             eos_token_id=[1, 106], pad_token_id=0)
        runs.append(out[0, len(p_ids):].tolist())
    first, other = runs
    at = next((k for k in range(1, len(first)) if first[k] not in first[:k] and first[k] not in other), None)
    if at is None:
        pytest.skip("this random model emits no token usable as an artificial stop")
    stop = first[at]
    monkeypatch.setattr(generation, "end_token_ids", lambda tok: [1, 106, stop])

    both = generate(model, tokenizer, PROMPTS[:2], max_new_tokens=10, batch_size=2, device="cpu", progress=False)
    cut = first[:at]
    assert both[0] == tokenizer.decode(cut, skip_special_tokens=True).strip()
    assert both[1] == free[1][0]
    assert both == sequential(model, tokenizer, PROMPTS[:2], 10)


def test_order_is_restored_when_sorting_by_length(tiny):
    model, tokenizer = tiny
    prompts = [PROMPTS[1], PROMPTS[2], PROMPTS[1]]
    out = generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=2, device="cpu", progress=False)
    assert out[0] == out[2]
    assert out[1] == generate(model, tokenizer, [PROMPTS[2]], 6, 1, "cpu", progress=False)[0]


def test_output_has_no_end_tokens_or_outer_whitespace():
    class FakeTokenizer:
        def decode(self, ids, skip_special_tokens):
            return "".join({5: " hello", 6: " world ", 1: "<eos>"}[i] for i in ids)

    assert generation.decode_new_tokens(FakeTokenizer(), [5, 6, 1, 5, 0], {1, 106}) == "hello world"
    assert generation.decode_new_tokens(FakeTokenizer(), [1, 5], {1, 106}) == ""


def test_rejects_bad_arguments(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="batch_size"):
        generate(model, tokenizer, ["x"], 4, 0, "cpu")
    assert generate(model, tokenizer, [], 4, 2, "cpu") == []



def test_token_budget_batches_short_prompts_together():
    # lengths 10, 8, 3, 3, 2 with 4 new tokens: a batch may hold prompts x (its longest + 4) <= 24 slots
    batches = generation.plan_batches([3, 10, 2, 8, 3], batch_size=8, batch_tokens=24, new_tokens=4)
    assert batches == [[1], [3, 0], [4, 2]]  # 1 x 14 (2 x 14 > 24), 2 x 12, 2 x 7
    # with room for three of the short ones, they share a batch
    assert generation.plan_batches([3, 10, 2, 8, 3], batch_size=8, batch_tokens=28, new_tokens=4) == [[1, 3], [0, 4, 2]]
    assert sorted(i for b in batches for i in b) == [0, 1, 2, 3, 4]
    # no budget: batch_size alone; a prompt longer than the budget still gets a batch of its own
    assert generation.plan_batches([3, 10, 2], batch_size=2) == [[1, 0], [2]]
    assert generation.plan_batches([50, 1], batch_size=4, batch_tokens=10) == [[0], [1]]


def test_token_budget_gives_the_same_outputs(tiny):
    model, tokenizer = tiny
    whole = generate(model, tokenizer, PROMPTS, 8, batch_size=len(PROMPTS), device="cpu", progress=False)
    lengths = [len(tokenizer(p)["input_ids"]) for p in PROMPTS]
    budget = 2 * (max(lengths) + 8)  # at most two prompts a batch
    assert len(generation.plan_batches(lengths, len(PROMPTS), budget, 8)) > 1
    split = generate(model, tokenizer, PROMPTS, 8, batch_size=len(PROMPTS), device="cpu", progress=False,
                     batch_tokens=budget)
    assert split == whole


def test_fp32_matmul_setting_is_checked_and_restored(tiny):
    model, tokenizer = tiny
    before = torch.get_float32_matmul_precision()
    with pytest.raises(ValueError, match="fp32_matmul"):
        generate(model, tokenizer, ["x"], 4, 1, "cpu", fp32_matmul="fast")
    generate(model, tokenizer, PROMPTS[:1], 2, 1, "cpu", progress=False, fp32_matmul="tf32")
    assert torch.get_float32_matmul_precision() == before


# ---- beam search (eval.num_beams > 1), on the same batches as greedy decoding


def spy_generate(model, monkeypatch) -> list[dict]:
    """Record the keyword arguments of every model.generate call (the call itself still runs)."""
    calls, real = [], model.generate

    def recording(**kwargs):
        calls.append({k: v for k, v in kwargs.items() if k not in ("input_ids", "attention_mask")})
        return real(**kwargs)

    monkeypatch.setattr(model, "generate", recording)
    return calls


def test_num_beams_1_is_the_greedy_call_of_before(tiny, monkeypatch):
    model, tokenizer = tiny
    calls = spy_generate(model, monkeypatch)
    default = generate(model, tokenizer, PROMPTS[:3], 5, batch_size=3, device="cpu", progress=False)
    one_beam = generate(model, tokenizer, PROMPTS[:3], 5, batch_size=3, device="cpu", progress=False,
                        num_beams=1, length_penalty=3.0)
    assert one_beam == default
    assert calls[0] == calls[1]  # greedy passes nothing beam-related, length_penalty included
    assert "num_beams" not in calls[0] and "length_penalty" not in calls[0]


def test_beam_search_runs_batched_and_gives_one_sentence_per_prompt(tiny, monkeypatch):
    model, tokenizer = tiny
    prompts = PROMPTS[:3]
    calls = spy_generate(model, monkeypatch)
    batched = generate(model, tokenizer, prompts, 5, batch_size=3, device="cpu", progress=False,
                       num_beams=3, length_penalty=0.5)
    assert len(calls) == 1 and calls[0]["num_beams"] == 3 and calls[0]["length_penalty"] == 0.5
    assert calls[0]["num_return_sequences"] == 1
    assert len(batched) == len(prompts) and all(isinstance(s, str) for s in batched)
    # left padding changes nothing for beams either: the batch gives each prompt's own best beam
    one_at_a_time = [generate(model, tokenizer, [p], 5, batch_size=1, device="cpu", progress=False,
                              num_beams=3, length_penalty=0.5)[0] for p in prompts]
    assert batched == one_at_a_time


def test_beams_share_the_token_budget(monkeypatch, tiny):
    model, tokenizer = tiny
    budgets = []
    real = generation.plan_batches
    monkeypatch.setattr(generation, "plan_batches", lambda lengths, size, budget, new: budgets.append(budget)
                        or real(lengths, size, budget, new))
    monkeypatch.setattr(model, "generate", lambda **kw: kw["input_ids"])  # planning only: no decoding
    generate(model, tokenizer, PROMPTS[:2], 4, 2, "cpu", progress=False, batch_tokens=1000, num_beams=4)
    generate(model, tokenizer, PROMPTS[:2], 4, 2, "cpu", progress=False, batch_tokens=1000)
    assert budgets == [250, 1000]


def test_rejects_zero_beams(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="num_beams"):
        generate(model, tokenizer, ["x"], 4, 1, "cpu", num_beams=0)


# ---- eval.decoder auto: the graph decoder where it applies and measured faster (CUDA), generate elsewhere

def test_auto_decoder_is_graph_on_cuda_for_greedy_static_decoding_only():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert generation.resolve_decoder("auto", cuda, "static", 1) == "graph"
    assert generation.resolve_decoder("auto", "cuda:1", "static", 1) == "graph"
    assert generation.resolve_decoder("auto", cpu, "static", 1) == "generate"  # its eager loop was slower
    assert generation.resolve_decoder("auto", cuda, "dynamic", 1) == "generate"  # graph needs a static cache
    assert generation.resolve_decoder("auto", cuda, "static", 4) == "generate"  # graph decodes greedily
    assert generation.resolve_decoder("auto", cuda, "static", 1, compile_decoding=True) == "generate"
    # an explicit choice is kept as given (and checked by generate)
    assert generation.resolve_decoder("generate", cuda, "static", 1) == "generate"
    assert generation.resolve_decoder("graph", cpu, "static", 1) == "graph"
    with pytest.raises(ValueError, match="decoder must be one of"):
        generation.resolve_decoder("vllm", cpu)


def test_auto_decoder_on_cpu_gives_generates_outputs(tiny, monkeypatch):
    model, tokenizer = tiny
    explicit = generate(model, tokenizer, PROMPTS[:3], 5, batch_size=3, device="cpu", progress=False,
                        cache="static", decoder="generate")
    import table2text.graph_decode as graph_decode

    def no_graph(*args, **kwargs):
        raise AssertionError("auto must not pick the graph decoder on a CPU")

    monkeypatch.setattr(graph_decode, "greedy_tokens", no_graph)
    assert generate(model, tokenizer, PROMPTS[:3], 5, batch_size=3, device="cpu", progress=False,
                    cache="static", decoder="auto") == explicit


# ---- lean_step: which step the graph decoder takes (bench/decode_bench.py's graph_model_step)

def test_graph_decoder_with_the_models_own_step_gives_the_default_tokens(tiny, monkeypatch):
    model, tokenizer = tiny
    from table2text import gemma3_step, graph_decode

    assert gemma3_step.unsupported(model) is None  # so the default really takes the lean step, False does not
    asked = []
    real = graph_decode.greedy_tokens

    def spy(*args, **kwargs):
        asked.append(kwargs["lean_step"])
        return real(*args, **kwargs)

    monkeypatch.setattr(graph_decode, "greedy_tokens", spy)
    settings = dict(device="cpu", progress=False, cache="static", decoder="graph")
    default = generate(model, tokenizer, PROMPTS, 6, batch_size=5, **settings)
    own_step = generate(model, tokenizer, PROMPTS, 6, batch_size=5, lean_step=False, **settings)
    assert asked == [None, False]  # the argument reaches the graph decoder as given
    assert own_step == default and any(default)


@pytest.mark.parametrize("decoder", ["generate", "auto"])  # auto on a CPU is generate
def test_lean_step_is_refused_without_the_graph_decoder(tiny, decoder):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match=r"lean_step=False .*needs decoder='graph', got decoder='generate'"):
        generate(model, tokenizer, ["x"], 4, 1, "cpu", cache="static", decoder=decoder, lean_step=False)
