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
from pathlib import Path

from table2text.io.atomic import check_writable, staged_outputs
from table2text.paths import PROCESSED_DIR
from table2text import phases
from table2text.errors import run_cli
from table2text.params import default_params_file, load_params
from table2text.data.prompts import completion_end
from table2text.data.sources import SPLITS, BadRecordError, LoadReport, load_split
from table2text.data.records import (
    HIGHLIGHTS_LOST,
    highlight_status,
    lost_highlights_message,
    cached_tokenizer,
    table_text,
    build_record,
    split_metrics,
)

OUT_DIR = PROCESSED_DIR
METRICS_FILE = Path("metrics/preprocess.json")


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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m stages.preprocess", description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=default_params_file(),
                        help="params file (default: $TOTTO_PARAMS or params.yaml)")
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR, help="folder for train.jsonl and validation.jsonl")
    parser.add_argument("--metrics-file", type=Path, default=METRICS_FILE, help="counts of this run (JSON)")
    return parser.parse_args(argv)


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
    phases.exit_process(phases.timed("preprocess", cli))
