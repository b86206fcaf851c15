"""Score a predictions file against ToTTo-format examples with the official ToTTo metrics.

    python -m stages.score --predictions FILE --examples FILE [--bleurt-checkpoint DIR]

FILE for --predictions ('-' for stdin): plain text with one prediction per line (an
empty line is an empty prediction), or JSON lines whose objects carry a string
``"prediction"`` (and optionally ``"id"`` or ``"example_id"``, checked against the
example's id). The format comes from the content as well as the name (see
table2text.io.readers): a ``.json`` file of JSON lines is read as such. ``.gz`` is read
transparently; a UTF-8 BOM is dropped; ``\n``, ``\r\n`` and ``\r`` end lines.  --examples: official ToTTo JSONL
or FeTaQA v1 JSONL (``.jsonl`` or ``.jsonl.gz``), in the same order as the predictions; --format
``auto`` (the default) tells them apart by the first record's keys (``feta_id``/``table_array``: FeTaQA,
``example_id``/``table``: ToTTo), and every record is then read as that format. A FeTaQA example's
reference is its ``answer``; its id (``feta_id``) is what a JSON-lines prediction's id is checked against.

Prints JSON {"overall", "overlap", "non_overlap"}, each with count, bleu,
parent_precision, parent_recall, parent_f and bleurt.  Bad input ends with a
one-line message naming the file (and line) and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from table2text.io import readers
from table2text.errors import UserError, run_cli
from table2text.data.sources import BadRecordError, read_fetaqa_jsonl, read_totto_jsonl
from table2text.metrics.totto import compute_metrics


class InputError(UserError):
    """Bad command-line input, reported without a traceback."""


def read_predictions(path: str | Path) -> list[readers.Prediction]:
    """The predictions (line, text, id or None) of a text or JSON-lines file (table2text.io.readers tells
    them apart by content as well as by name); '-' reads stdin."""
    if str(path) != readers.STDIN and not Path(path).exists():
        raise InputError(f"{Path(path).as_posix()}: predictions file not found")
    try:
        _, rows = readers.read_predictions(path)
    except readers.InputFileError as err:
        raise InputError(str(err)) from None
    return rows


EXAMPLE_FORMATS = ("auto", "totto", "fetaqa")
# The keys that tell the two formats apart (each format's required id and table fields).
_FORMAT_KEYS = {"fetaqa": ("feta_id", "table_array"), "totto": ("example_id", "table")}


def detect_format(path: str | Path) -> str:
    """'totto' or 'fetaqa', from the keys of the first non-blank record of `path`."""
    label = readers.label_of(path)
    for number, raw in readers.iter_lines(path, "examples"):
        if not raw.strip():
            continue
        try:
            record = readers.parse_json_line(raw)
        except readers.LineError as err:
            raise InputError(f"{label}:{number}: field '<line>': {err.message}") from None
        if isinstance(record, dict):
            for name, keys in _FORMAT_KEYS.items():
                if any(k in record for k in keys):
                    return name
        raise InputError(f"{label}:{number}: field '<record>': neither a ToTTo record (example_id, table) nor a "
                         f"FeTaQA record (feta_id, table_array); give --format totto or fetaqa to read it as one")
    raise InputError(f"{label}: no examples to score")


def read_examples(path: str | Path, example_format: str = "auto") -> list[dict]:
    if not Path(path).exists():
        raise InputError(f"{Path(path).as_posix()}: examples file not found")
    if example_format not in EXAMPLE_FORMATS:
        raise InputError(f"--format {example_format!r}: expected one of {', '.join(EXAMPLE_FORMATS)}")
    try:
        readers.check_regular_file(path, "examples")
        if example_format == "auto":
            example_format = detect_format(path)
        return (read_fetaqa_jsonl if example_format == "fetaqa" else read_totto_jsonl)(path)
    except (BadRecordError, readers.InputFileError) as err:
        raise InputError(str(err)) from None


def score_files(predictions_path, examples_path, bleurt_checkpoint=None, example_format: str = "auto") -> dict:
    """Read both files, check they align, and return the metrics summary."""
    predictions = read_predictions(predictions_path)
    examples = read_examples(examples_path, example_format)
    if not examples:
        raise InputError(f"{examples_path}: no examples to score")
    if len(predictions) != len(examples):
        first = examples[len(predictions)] if len(predictions) < len(examples) else None
        where = (f"; the first example without a prediction is {examples_path}:{first['line']}" if first
                 else f"; {predictions_path}:{predictions[len(examples)].line} is the first prediction without an example")
        raise InputError(f"{predictions_path} has {len(predictions)} predictions but "
                         f"{examples_path} has {len(examples)} examples; they must align line by line{where}")
    for prediction, example in zip(predictions, examples):  # ids checked wherever a prediction has one
        if prediction.id is not None and prediction.id != str(example["id"]):
            raise InputError(f"{readers.label_of(predictions_path)}:{prediction.line}: field 'id': "
                             f"{prediction.id!r} does not match example {example['id']!r} at "
                             f"{examples_path}:{example['line']}")
    try:
        summary, _ = compute_metrics([p.text for p in predictions], examples,
                                     bleurt_checkpoint=bleurt_checkpoint)
    except ValueError as err:  # e.g. an unusable BLEURT checkpoint
        raise InputError(str(err)) from None
    return summary


def main(argv: list[str] | None = None) -> int:
    """The command: bad input ends with one line on stderr and exit status 2 (table2text.errors.run_cli)."""
    return run_cli(score_command, "score", argv)


def score_command(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.score", description=__doc__.split("\n\n")[0])
    parser.add_argument("--predictions", required=True, help="text (one per line) or JSON-lines predictions ('-': stdin)")
    parser.add_argument("--examples", required=True, help="ToTTo or FeTaQA .jsonl or .jsonl.gz examples")
    parser.add_argument("--format", default="auto", choices=EXAMPLE_FORMATS,
                        help="format of --examples (default auto: from the first record's keys)")
    parser.add_argument("--bleurt-checkpoint", default=None,
                        help="local BLEURT checkpoint folder (default: BLEURT not computed)")
    args = parser.parse_args(argv)
    summary = score_files(args.predictions, args.examples, args.bleurt_checkpoint, args.format)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
