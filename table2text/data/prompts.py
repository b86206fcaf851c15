"""Prompt and completion text around a linearised table.

The prompt is the exact model input WITHOUT the BOS token: tokenize it with add_special_tokens=True
(which adds BOS once), then append the completion tokenized with add_special_tokens=False.

  * Tokenizer with a chat template (the -it model): the template's output for one user message,
    with add_generation_prompt=True, minus its leading BOS; the completion ends with "<end_of_turn>".
  * Otherwise (the packaged base model): a plain instruction, the table text and a "Sentence:" cue
    on its own line; the completion ends with the tokenizer's EOS token.
"""

from __future__ import annotations

INSTRUCTION = "Write one sentence describing the highlighted cells of this table."
QUESTION_INSTRUCTION = "Answer the question in one sentence, using the highlighted cells of this table."
END_OF_TURN = "<end_of_turn>"


def instruction_text(table_text: str, question: str | None = None) -> str:
    """The user's request: instruction, table text and, for question answering, the question."""
    if question is None:
        return f"{INSTRUCTION}\n\n{table_text}"
    return f"{QUESTION_INSTRUCTION}\n\n{table_text}\n\nQuestion: {question}"


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def build_prompt(tokenizer, table_text: str, question: str | None = None) -> str:
    """The model input text (no BOS) for one example."""
    user = instruction_text(table_text, question)
    if has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
        bos = tokenizer.bos_token
        # The template writes BOS itself; tokenizing with add_special_tokens=True adds it again.
        return text[len(bos):] if bos and text.startswith(bos) else text
    # The cue ends in a newline so the target starts a fresh word (no leading space to learn).
    return f"{user}\n\nSentence:\n"


def completion_end(tokenizer) -> str:
    """The text that ends every completion: end of turn with a chat template, else EOS."""
    if has_chat_template(tokenizer):
        return END_OF_TURN
    if not tokenizer.eos_token:
        raise ValueError("the tokenizer has neither a chat template nor an EOS token to end completions with")
    return tokenizer.eos_token
