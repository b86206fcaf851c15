"""What a user gives infer: a ToTTo example or a simple table (title, section, header, rows, highlight),
checked field by field into the normalised example of table2text.data.sources, and its prompt built as the
preprocess stage builds it."""

from __future__ import annotations

import math
import sys

from table2text.errors import UserError
from table2text.data.records import cells_kept, fit_prompt_kept, table_text
from table2text.data.sources import FieldError, check_text, totto_example  # the ToTTo record validator preprocess uses

SIMPLE_KEYS = {"title", "section", "header", "rows", "highlight", "question"}


class InputError(UserError):
    """Bad input or arguments, reported as one line without a traceback."""


def make_prompt(tokenizer, example: dict, where: str, mode: str, include_question: bool, budget: int,
                on_bad_record: str = "error") -> str:
    """The model input for one example, built as the preprocess stage builds it (table text cut to `budget`).
    A cut that leaves none of the highlighted cells is refused as preprocess refuses it; under
    data.on_bad_record: skip it is said in one line and the prompt kept (infer answers every input)."""
    question = example.get("question") if include_question else None
    if include_question and not question:
        raise InputError(f"{where}: field 'question': required by this model (data.include_question: true)")
    spans: list = []
    text = table_text(tokenizer, example, mode, budget, spans)
    prompt, _, truncated, kept_chars = fit_prompt_kept(tokenizer, text, question, budget)
    if prompt is None:
        raise InputError(f"{where}: the prompt cannot fit in data.max_length - --max-new-tokens = {budget} tokens")
    if truncated:
        kept, total = cells_kept(spans, kept_chars), len(example["highlighted_cells"])
        if kept == 0:
            message = (f"{where}: field 'highlighted_cells': the table text cut to fit {budget} tokens keeps none of "
                       f"the {total} highlighted cells (--linearization {mode}); use --linearization subtable, a "
                       "smaller --max-new-tokens or a larger data.max_length")
            if on_bad_record == "error":
                raise InputError(message + ", or data.on_bad_record: skip to answer anyway")
            print(f"infer: warning: {message}; answering anyway (data.on_bad_record: skip)", file=sys.stderr)
        else:
            print(f"infer: warning: {where}: table text cut to fit {budget} tokens, keeping {kept} of the {total} "
                  "highlighted cells", file=sys.stderr)
    return prompt


def to_example(obj, where: str, source_file: str, line: int) -> dict:
    """A normalised example (table2text.data.sources contract) from a ToTTo record or a simple table."""
    if not isinstance(obj, dict):
        raise InputError(f"{where}: field '<record>': expected a JSON object, got {type(obj).__name__}")
    try:
        if "table" in obj:
            example = totto_example(obj, require_references=False)
        elif "rows" in obj:
            example = simple_to_example(obj)
        else:
            raise FieldError("<record>", "expected a ToTTo example (with 'table') or a simple table "
                                          "(with 'rows', 'highlight', optional 'title', 'section', 'header')",
                              "unknown_format")
    except FieldError as err:
        raise InputError(f"{where}: field {err.field!r}: {err.message}") from None
    example["source_file"], example["line"] = source_file, line
    return example


def simple_to_example(obj: dict) -> dict:
    """{"title", "section", "header", "rows", "highlight"(, "question")} -> normalised example."""
    unknown = sorted(set(obj) - SIMPLE_KEYS)
    if unknown:
        raise FieldError(unknown[0], f"unknown field (expected {sorted(SIMPLE_KEYS)})", "unknown_field")
    title = _text_field(obj, "title")
    section = _text_field(obj, "section")
    header = obj.get("header") or []
    if not isinstance(header, list):
        raise FieldError("header", f"expected a list of column names, got {type(header).__name__}", "wrong_type")
    rows = obj.get("rows")
    if not isinstance(rows, list) or not rows:
        raise FieldError("rows", "expected a non-empty list of rows (lists of cell values)", "wrong_type")
    table = []
    if header:
        table.append([_cell(v, True, f"header[{c}]") for c, v in enumerate(header)])
    for r, row in enumerate(rows):
        if not isinstance(row, list) or not row:
            raise FieldError(f"rows[{r}]", "expected a non-empty list of cell values", "wrong_type")
        table.append([_cell(v, False, f"rows[{r}][{c}]") for c, v in enumerate(row)])

    highlight = obj.get("highlight")
    if not isinstance(highlight, list) or not highlight:
        raise FieldError("highlight", "expected a non-empty list of [row, column] pairs", "wrong_type")
    offset = 1 if header else 0  # rows are counted without the header row
    cells, seen = [], {}
    for i, pair in enumerate(highlight):
        if (not isinstance(pair, list) or len(pair) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in pair)):
            raise FieldError(f"highlight[{i}]", f"expected [row, column] integers, got {pair!r}", "wrong_type")
        r, c = pair
        if not 0 <= r < len(rows):
            raise FieldError(f"highlight[{i}]", f"row {r} outside rows 0..{len(rows) - 1} "
                                                 "(rows are counted without the header)", "out_of_range")
        if not 0 <= c < len(rows[r]):
            raise FieldError(f"highlight[{i}]", f"column {c} outside row {r}'s columns 0..{len(rows[r]) - 1}",
                              "out_of_range")
        if (r, c) in seen:  # the cell would be written into the prompt twice
            raise FieldError(f"highlight[{i}]", f"[{r}, {c}] repeats highlight[{seen[r, c]}]: list each cell once",
                             "duplicate_highlight")
        seen[r, c] = i
        cells.append([r + offset, c])

    question = obj.get("question")
    if question is not None and not isinstance(question, str):
        raise FieldError("question", f"expected str, got {type(question).__name__}", "wrong_type")
    if question is not None:
        check_text(question, "question")
    return {"id": "input", "table": table, "highlighted_cells": cells, "page_title": title,
            "section_title": section, "section_text": "", "references": [], "overlap": None,
            "question": question}


def _text_field(obj: dict, key: str) -> str:
    value = obj.get(key, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise FieldError(key, f"expected str, got {type(value).__name__}", "wrong_type")
    return check_text(value, key)


def _cell(value, is_header: bool, field: str) -> dict:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise FieldError(field, f"expected a string or number, got {type(value).__name__}", "wrong_type")
    if isinstance(value, float) and not math.isfinite(value):  # json.loads takes NaN and Infinity
        raise FieldError(field, f"expected a finite number, got {value}", "wrong_type")
    return {"value": check_text(value, field) if isinstance(value, str) else str(value), "is_header": is_header,
            "column_span": 1, "row_span": 1}
