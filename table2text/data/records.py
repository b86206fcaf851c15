"""From a source example to a processed record: the table text built only as far as the prompt budget
reaches, the prompt fitted to data.max_length (cutting the end of the table text, never the target), and
how many highlighted cells the cut prompt still shows. One home for preprocess and infer."""

from __future__ import annotations

import functools
import os

from table2text.data.linearize import linearize
from table2text.model.sources import load_tokenizer, resolve_model
from table2text.data.prompts import build_prompt
from table2text.data.sources import LoadReport

HIGHLIGHTS_LOST = "highlights_truncated"  # skip reason: the cut table text shows none of the highlighted cells
# table_text: cells linearised at first, and the tokens past the prompt budget that make a cut certain.
PART_CELLS = 256
CUT_MARGIN = 64


def highlight_status(kept: int, total: int) -> str:
    """all | some | none: how many of its highlighted cells the (maybe truncated) prompt still shows."""
    return "all" if kept == total else "none" if kept == 0 else "some"


def lost_highlights_message(split: str, lost: int, built: int, mode: str, max_length: int) -> str:
    return (f"{lost} of {built} {split} prompts (this is the first) keep none of their highlighted cells once "
            f"the table text is cut to data.max_length={max_length} tokens (data.linearization: {mode}); raise "
            f"data.max_length, use data.linearization: subtable, or set data.on_bad_record: skip to skip them "
            f"(counted as {HIGHLIGHTS_LOST})")


@functools.lru_cache(maxsize=2)
def cached_tokenizer(model_name: str):
    """The model's tokenizer, loaded once per process (tests call main() several times)."""
    return load_tokenizer(resolve_model(model_name))


def token_count(tokenizer, text: str, *, special: bool) -> int:
    return len(tokenizer(text, add_special_tokens=special)["input_ids"])


def table_text(tokenizer, example: dict, mode: str, max_tokens: int, spans: list | None = None) -> str:
    """linearize(example, mode), built only as far as a prompt of `max_tokens` tokens can reach.

    Both linearisations write cells in order (full_table row by row, subtable in highlighted order) and
    a cell's text depends only on the table, not on the cells written after it, so the text of the first
    k cells is a prefix of the whole text (but for its closing tags). Once that prefix is more than
    CUT_MARGIN tokens longer than max_tokens, fit_prompt cuts it where it would cut the whole text; the
    rest of a big table is never built nor tokenised (megabytes for a 20 MB table, and worse: a
    full-table text grows with rows x rows when every row has a row header).

    `spans` (a list) receives the offsets of the highlighted cells' values in the returned text (see
    linearize); a highlighted cell past a partial text is past the cut."""
    if mode == "full_table":
        total = sum(len(row) for row in example["table"])
    else:
        total = len(example["highlighted_cells"])
    k = PART_CELLS
    while k < total:
        found: list = []
        text = linearize(_first_cells(example, mode, k), mode, found)
        if token_count(tokenizer, text, special=False) > max_tokens + CUT_MARGIN:
            if spans is not None:
                spans.extend(found)
            return text
        k *= 4
    return linearize(example, mode, spans)


def _first_cells(example: dict, mode: str, k: int) -> dict:
    """The example cut to the first k cells its linearisation writes."""
    if mode != "full_table":
        return {**example, "highlighted_cells": example["highlighted_cells"][:k]}
    rows = []
    for row in example["table"]:
        if k <= 0:
            break
        rows.append(row[:k])
        k -= len(row)
    return {**example, "table": rows}  # highlighted cells past the cut are never looked up


def build_record(tokenizer, example: dict, table_text: str, question: str | None, end: str, max_length: int,
                 spans: list | None = None):
    """The processed record of one example, or None when the target cannot fit in max_length.
    With the highlighted cells' `spans` in table_text (from table_text()), the record says how many of
    them the prompt still holds ("highlighted_kept")."""
    target = example["references"][0]
    completion = target + end
    completion_tokens = token_count(tokenizer, completion, special=False)
    prompt, prompt_tokens, truncated, kept_chars = fit_prompt_kept(
        tokenizer, table_text, question, max_length - completion_tokens
    )
    if prompt is None:
        return None
    extra = {} if spans is None else {"highlighted_kept": cells_kept(spans, kept_chars)}
    return {
        **example,
        "prompt": prompt,
        "completion": completion,
        "target": target,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "truncated": truncated,
        "num_highlighted": len(example["highlighted_cells"]),
        "table_cells": sum(len(row) for row in example["table"]),
        **extra,
    }


def cells_kept(spans: list, kept_chars: int) -> int:
    """How many highlighted cells (their values' (start, end) in the table text) lie whole within the
    first `kept_chars` characters."""
    return sum(end <= kept_chars for _, end in spans)


def fit_prompt(tokenizer, table_text: str, question: str | None, budget: int):
    """(prompt, prompt tokens with BOS, truncated) with at most `budget` tokens; (None, 0, False) if
    even an empty table does not fit. Only the table text is cut, at a token boundary: the prefix of
    its tokens that the budget leaves room for, shortened while retokenising still overflows."""
    return fit_prompt_kept(tokenizer, table_text, question, budget)[:3]


def fit_prompt_kept(tokenizer, table_text: str, question: str | None, budget: int):
    """fit_prompt's (prompt, tokens, truncated) and the number of characters of table_text the prompt
    still holds."""
    prompt = build_prompt(tokenizer, table_text, question)
    count = token_count(tokenizer, prompt, special=True)
    if count <= budget:
        return prompt, count, False, len(table_text)

    ids = tokenizer(table_text, add_special_tokens=False)["input_ids"]
    keep = max(0, min(len(ids) - 1, budget - (count - len(ids))))  # tokens left once the rest of the prompt is counted
    while keep >= 0:
        kept = tokenizer.decode(ids[:keep])
        prompt = build_prompt(tokenizer, kept, question)
        count = token_count(tokenizer, prompt, special=True)
        if count <= budget:
            return prompt, count, True, len(os.path.commonprefix([kept, table_text[:len(kept)]]))
        keep -= count - budget  # tokens can merge differently at the cut: drop the overflow, try again
    return None, 0, False, 0


def split_metrics(report: LoadReport, records: list[dict], truncated: int, highlights: dict) -> dict:
    counts = report.as_dict()
    return {
        "read": counts["read"],
        "written": len(records),
        "skipped": counts["skipped"],
        "skipped_by_reason": counts["skipped_by_reason"],
        "sampled_out": counts["sampled_out"],
        "truncated": truncated,
        "highlighted_cells_kept": dict(highlights),
        "max_tokens": max((r["prompt_tokens"] + r["completion_tokens"] for r in records), default=0),
    }
