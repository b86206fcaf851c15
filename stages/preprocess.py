"""Stage 1: read the data source, linearise each table, build prompt and completion, write JSONL.

    python -m stages.preprocess [--params FILE] [--out-dir DIR] [--metrics-file FILE]

Reads params.yaml (data.*, model.name; TOTTO_PARAMS or --params point at another file), writes
data/processed/{train,validation}.jsonl (one processed record a line, see the brief's contract) and
metrics/preprocess.json (per split: read, written, skipped by reason, sampled out, truncated).
Over-long inputs lose the end of their table text, never the target; a record whose target alone
does not fit in data.max_length is a bad record ("target_too_long"). Output is deterministic.
Bad input ends with a one-line error naming file, line and field, and exit status 2; so does a split
left with no records at all (an empty file, or every record skipped).
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

from stages.atomic_io import write_json, write_jsonl
from stages.errors import run_cli
from stages.linearize import linearize
from stages.model_sources import load_tokenizer, resolve_model
from stages.params import default_params_file, load_params
from stages.prompts import build_prompt, completion_end
from stages.sources import SPLITS, BadRecordError, LoadReport, load_split

OUT_DIR = Path("data/processed")
METRICS_FILE = Path("metrics/preprocess.json")
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

    tokenizer = cached_tokenizer(params["model"]["name"])
    end = completion_end(tokenizer)

    metrics = {}
    for split in SPLITS:
        report = LoadReport()
        examples = load_split(data, split, report)
        records, truncated = [], 0
        for example in examples:
            question = example["question"] if include_question else None
            if include_question and question is None:
                raise ValueError(f"data.include_question is true but {example['source_file']} has no questions")
            record = build_record(tokenizer, example, table_text(tokenizer, example, mode, max_length), question,
                                  end, max_length)
            if record is None:  # the target alone is longer than max_length: never cut the target
                error = BadRecordError(
                    example["source_file"], example["line"], "references",
                    f"target does not fit in data.max_length={max_length} tokens", "target_too_long",
                )
                if data["on_bad_record"] == "error":
                    raise error
                report.skip(error.reason)
                report.kept -= 1
                continue
            truncated += record["truncated"]
            records.append(record)
        if not records:  # the next stage could only fail later, further from the cause
            counts = report.as_dict()
            raise ValueError(f"data: no {split} records left (read {counts['read']}, skipped {counts['skipped']} "
                             f"{counts['skipped_by_reason']}, sampled out {counts['sampled_out']})")
        write_jsonl(args.out_dir / f"{split}.jsonl", records)
        metrics[split] = split_metrics(report, records, truncated)

    metrics["total"] = {
        key: sum(metrics[s][key] for s in SPLITS) for key in ("read", "written", "skipped", "sampled_out", "truncated")
    }
    write_json(args.metrics_file, metrics)
    print_summary(data, mode, metrics, args.out_dir)
    return metrics


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


def table_text(tokenizer, example: dict, mode: str, max_tokens: int) -> str:
    """linearize(example, mode), built only as far as a prompt of `max_tokens` tokens can reach.

    Both linearisations write cells in order (full_table row by row, subtable in highlighted order) and
    a cell's text depends only on the table, not on the cells written after it, so the text of the first
    k cells is a prefix of the whole text (but for its closing tags). Once that prefix is more than
    CUT_MARGIN tokens longer than max_tokens, fit_prompt cuts it where it would cut the whole text; the
    rest of a big table is never built nor tokenised (megabytes for a 20 MB table, and worse: a
    full-table text grows with rows x rows when every row has a row header)."""
    if mode == "full_table":
        total = sum(len(row) for row in example["table"])
    else:
        total = len(example["highlighted_cells"])
    k = PART_CELLS
    while k < total:
        text = linearize(_first_cells(example, mode, k), mode)
        if token_count(tokenizer, text, special=False) > max_tokens + CUT_MARGIN:
            return text
        k *= 4
    return linearize(example, mode)


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


def build_record(tokenizer, example: dict, table_text: str, question: str | None, end: str, max_length: int):
    """The processed record of one example, or None when the target cannot fit in max_length."""
    target = example["references"][0]
    completion = target + end
    completion_tokens = token_count(tokenizer, completion, special=False)
    prompt, prompt_tokens, truncated = fit_prompt(
        tokenizer, table_text, question, max_length - completion_tokens
    )
    if prompt is None:
        return None
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
    }


def fit_prompt(tokenizer, table_text: str, question: str | None, budget: int):
    """(prompt, prompt tokens with BOS, truncated) with at most `budget` tokens; (None, 0, False) if
    even an empty table does not fit. Only the table text is cut, at a token boundary: the prefix of
    its tokens that the budget leaves room for, shortened while retokenising still overflows."""
    prompt = build_prompt(tokenizer, table_text, question)
    count = token_count(tokenizer, prompt, special=True)
    if count <= budget:
        return prompt, count, False

    ids = tokenizer(table_text, add_special_tokens=False)["input_ids"]
    keep = max(0, min(len(ids) - 1, budget - (count - len(ids))))  # tokens left once the rest of the prompt is counted
    while keep >= 0:
        prompt = build_prompt(tokenizer, tokenizer.decode(ids[:keep]), question)
        count = token_count(tokenizer, prompt, special=True)
        if count <= budget:
            return prompt, count, True
        keep -= count - budget  # tokens can merge differently at the cut: drop the overflow, try again
    return None, 0, False


def split_metrics(report: LoadReport, records: list[dict], truncated: int) -> dict:
    counts = report.as_dict()
    return {
        "read": counts["read"],
        "written": len(records),
        "skipped": counts["skipped"],
        "skipped_by_reason": counts["skipped_by_reason"],
        "sampled_out": counts["sampled_out"],
        "truncated": truncated,
        "max_tokens": max((r["prompt_tokens"] + r["completion_tokens"] for r in records), default=0),
    }


def print_summary(data: dict, mode: str, metrics: dict, out_dir: Path) -> None:
    print(f"preprocess: source={data['source']} linearization={mode} max_length={data['max_length']}")
    for split in SPLITS:
        m = metrics[split]
        reasons = ", ".join(f"{k}={v}" for k, v in m["skipped_by_reason"].items()) or "none"
        print(f"  {split:<10} read {m['read']}, written {m['written']} -> {(out_dir / f'{split}.jsonl').as_posix()}, "
              f"skipped {m['skipped']} ({reasons}), sampled out {m['sampled_out']}, truncated {m['truncated']}")


def cli(argv: list[str] | None = None) -> int:
    """Run main(); bad input or settings end with one clear line on stderr and exit status 2.
    Besides UserErrors: a missing file, a data problem found by sources (ValueError: an empty split, no
    questions) and a hub dataset that cannot be fetched (RuntimeError)."""
    return run_cli(main, "preprocess", argv, user_errors=(FileNotFoundError, ValueError, RuntimeError))


if __name__ == "__main__":
    sys.exit(cli())
