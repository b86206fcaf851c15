"""Stage 1: read the data source, linearise each table, build prompt and completion, write JSONL.

    python -m stages.preprocess [--params FILE] [--out-dir DIR] [--metrics-file FILE]

Reads params.yaml (data.*, model.name; TOTTO_PARAMS or --params point at another file), writes
data/processed/{train,validation}.jsonl (one processed record a line, see the brief's contract) and
metrics/preprocess.json (per split: read, written, skipped by reason, sampled out, truncated, and how
many prompts keep all / some / none of their highlighted cells). Over-long inputs lose the end of their
table text, never the target; a record whose target alone does not fit in data.max_length is a bad
record ("target_too_long"), and so is one whose cut table text keeps none of its highlighted cells
("highlights_truncated": refused with their count, or skipped and counted under data.on_bad_record:
skip). All three outputs are written together after every record is checked: a failed run leaves the
previous set. Output is deterministic.
Bad input ends with a one-line error naming file, line and field, and exit status 2; so does a split
left with no records at all (an empty file, or every record skipped).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

from stages.atomic_io import check_writable, staged_outputs
from stages import phases
from stages.errors import run_cli
from stages.linearize import linearize
from stages.model_sources import load_tokenizer, resolve_model
from stages.params import default_params_file, load_params
from stages.prompts import build_prompt, completion_end
from stages.sources import SPLITS, BadRecordError, LoadReport, load_split

OUT_DIR = Path("data/processed")
METRICS_FILE = Path("metrics/preprocess.json")
HIGHLIGHTS_LOST = "highlights_truncated"  # skip reason: the cut table text shows none of the highlighted cells
# table_text: cells linearised at first, and the tokens past the prompt budget that make a cut certain.
PART_CELLS = 256
CUT_MARGIN = 64


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    params = load_params(args.params)
    data = params["data"]
    max_length = data["max_length"]
    mode = data["linearization"]
    include_question = data["include_question"]

    check_writable(args.out_dir, "output folder")  # before the tokenizer and the reading
    check_writable(args.metrics_file.parent, "metrics folder")
    phases.enter("load")
    tokenizer = cached_tokenizer(params["model"]["name"])
    end = completion_end(tokenizer)
    phases.enter("work")  # reading, linearising and tokenising every record

    # Every split is read, checked and built before anything is written: a bad record in the validation
    # split must not leave a new train.jsonl next to the old validation.jsonl and metrics.
    on_bad = data["on_bad_record"]
    metrics, outputs = {}, {}
    for split in SPLITS:
        report = LoadReport()
        examples = load_split(data, split, report)
        records, truncated, lost = [], 0, []
        highlights = {"all": 0, "some": 0, "none": 0}
        for example in examples:
            question = example["question"] if include_question else None
            if include_question and question is None:
                raise ValueError(f"data.include_question is true but {example['source_file']} has no questions")
            spans: list = []
            text = table_text(tokenizer, example, mode, max_length, spans)
            record = build_record(tokenizer, example, text, question, end, max_length, spans)
            if record is None:  # the target alone is longer than max_length: never cut the target
                error = BadRecordError(
                    example["source_file"], example["line"], "references",
                    f"target does not fit in data.max_length={max_length} tokens", "target_too_long",
                )
                if on_bad == "error":
                    raise error
                report.skip(error.reason)
                report.kept -= 1
                continue
            kept = highlight_status(record.pop("highlighted_kept"), record["num_highlighted"])
            highlights[kept] += 1
            if kept == "none":  # a prompt about cells it does not show: the model can only guess
                lost.append(example)
                report.skip(HIGHLIGHTS_LOST)
                report.kept -= 1
                continue
            truncated += record["truncated"]
            records.append(record)
        if lost and on_bad == "error":
            first = lost[0]
            raise BadRecordError(first["source_file"], first["line"], "highlighted_cells",
                                 lost_highlights_message(split, len(lost), len(examples), mode, max_length),
                                 HIGHLIGHTS_LOST)
        if not records:  # the next stage could only fail later, further from the cause
            counts = report.as_dict()
            raise ValueError(f"data: no {split} records left (read {counts['read']}, skipped {counts['skipped']} "
                             f"{counts['skipped_by_reason']}, sampled out {counts['sampled_out']})")
        outputs[args.out_dir / f"{split}.jsonl"] = records
        metrics[split] = split_metrics(report, records, truncated, highlights)

    metrics["total"] = {
        key: sum(metrics[s][key] for s in SPLITS) for key in ("read", "written", "skipped", "sampled_out", "truncated")
    }
    metrics["total"]["highlighted_cells_kept"] = {
        key: sum(metrics[s]["highlighted_cells_kept"][key] for s in SPLITS) for key in ("all", "some", "none")
    }
    phases.enter("save")
    with staged_outputs() as stage:  # all three files, or (on any error) none of them
        for path, records in outputs.items():
            stage.write_jsonl(path, records)
        stage.write_json(args.metrics_file, metrics)
    print_summary(data, mode, metrics, args.out_dir)
    return metrics


def highlight_status(kept: int, total: int) -> str:
    """all | some | none: how many of its highlighted cells the (maybe truncated) prompt still shows."""
    return "all" if kept == total else "none" if kept == 0 else "some"


def lost_highlights_message(split: str, lost: int, built: int, mode: str, max_length: int) -> str:
    return (f"{lost} of {built} {split} prompts (this is the first) keep none of their highlighted cells once "
            f"the table text is cut to data.max_length={max_length} tokens (data.linearization: {mode}); raise "
            f"data.max_length, use data.linearization: subtable, or set data.on_bad_record: skip to skip them "
            f"(counted as {HIGHLIGHTS_LOST})")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m stages.preprocess", description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=default_params_file(),
                        help="params file (default: $TOTTO_PARAMS or params.yaml)")
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR, help="folder for train.jsonl and validation.jsonl")
    parser.add_argument("--metrics-file", type=Path, default=METRICS_FILE, help="counts of this run (JSON)")
    return parser.parse_args(argv)


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


def print_summary(data: dict, mode: str, metrics: dict, out_dir: Path) -> None:
    print(f"preprocess: source={data['source']} linearization={mode} max_length={data['max_length']}")
    for split in SPLITS:
        m = metrics[split]
        reasons = ", ".join(f"{k}={v}" for k, v in m["skipped_by_reason"].items()) or "none"
        kept = m["highlighted_cells_kept"]
        print(f"  {split:<10} read {m['read']}, written {m['written']} -> {(out_dir / f'{split}.jsonl').as_posix()}, "
              f"skipped {m['skipped']} ({reasons}), sampled out {m['sampled_out']}, truncated {m['truncated']}; "
              f"prompts keeping all / some / none of their highlighted cells: {kept['all']} / {kept['some']} / "
              f"{kept['none']}")


def cli(argv: list[str] | None = None) -> int:
    """Run main(); bad input or settings end with one clear line on stderr and exit status 2.
    Besides UserErrors: a missing file, a data problem found by sources (ValueError: an empty split, no
    questions) and a hub dataset that cannot be fetched (RuntimeError)."""
    return run_cli(main, "preprocess", argv, user_errors=(FileNotFoundError, ValueError, RuntimeError))


if __name__ == "__main__":
    sys.exit(phases.timed("preprocess", cli))
