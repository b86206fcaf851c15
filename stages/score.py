"""Score a predictions file against ToTTo-format examples with the official ToTTo metrics.

    python -m stages.score --predictions FILE --examples FILE [--bleurt-checkpoint DIR]

FILE for --predictions: plain text with one prediction per line (an empty line is
an empty prediction), or JSON lines (``.jsonl``) whose objects carry a string
``"prediction"`` (and optionally ``"id"``, checked against the example's id);
``.gz`` is read transparently.  --examples: official ToTTo JSONL (``.jsonl`` or
``.jsonl.gz``), in the same order as the predictions.

Prints JSON {"overall", "overlap", "non_overlap"}, each with count, bleu,
parent_precision, parent_recall, parent_f and bleurt.  Bad input ends with a
one-line message naming the file (and line) and exit status 2.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import sys
from pathlib import Path

from stages.errors import UserError, run_cli
from stages.sources import BadRecordError, FieldError, check_text, read_totto_jsonl
from stages.totto_metrics import compute_metrics


class InputError(UserError):
    """Bad command-line input, reported without a traceback."""


def _read_text(path: Path) -> io.StringIO:
    """The file as text with universal newlines, as the official scripts read their files; bytes that
    are not UTF-8 are reported with their line."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        data = f.read()
    try:
        return io.StringIO(data.decode("utf-8"), newline=None)
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise InputError(f"{path}:{line}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def _is_jsonl(path: Path) -> bool:
    suffixes = path.suffixes[-2:] if path.suffix == ".gz" else path.suffixes[-1:]
    return bool(suffixes) and suffixes[0] == ".jsonl"


def read_predictions(path: str | Path) -> list[tuple[str, str | None]]:
    """``(prediction, id or None)`` per line of a text or JSONL predictions file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: predictions file not found")
    jsonl = _is_jsonl(path)
    rows = []
    try:
        text = _read_text(path)
    except (OSError, EOFError) as err:  # e.g. a truncated or non-gzip .gz file
        raise InputError(f"{path}: cannot read ({err})") from None
    for number, line in enumerate(text, 1):
        line = line.rstrip("\n")
        if not jsonl:
            rows.append((line, None))
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}:{number}: invalid JSON ({err.msg})") from None
        except (ValueError, RecursionError) as err:  # a 4300-digit number, nesting too deep
            raise InputError(f"{path}:{number}: invalid JSON ({type(err).__name__}: {err})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prediction"), str):
            raise InputError(f"{path}:{number}: field 'prediction': "
                             f"expected a JSON object with a string 'prediction'")
        example_id = record.get("id")
        if isinstance(example_id, (dict, list, bool, float)):
            raise InputError(f"{path}:{number}: field 'id': expected a string or integer id, "
                             f"got {type(example_id).__name__}")
        rows.append((record["prediction"], None if example_id is None else str(example_id)))
    for number, (prediction, _) in enumerate(rows, 1):
        try:
            check_text(prediction, "prediction")
        except FieldError as err:
            raise InputError(f"{path}:{number}: {err}") from None
    return rows


def read_examples(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: examples file not found")
    try:
        return read_totto_jsonl(path)
    except BadRecordError as err:
        raise InputError(str(err)) from None
    except (OSError, EOFError) as err:
        raise InputError(f"{path}: cannot read ({err})") from None


def score_files(predictions_path, examples_path, bleurt_checkpoint=None) -> dict:
    """Read both files, check they align, and return the metrics summary."""
    predictions = read_predictions(predictions_path)
    examples = read_examples(examples_path)
    if not examples:
        raise InputError(f"{examples_path}: no examples to score")
    if len(predictions) != len(examples):
        first = examples[len(predictions)] if len(predictions) < len(examples) else None
        where = (f"; the first example without a prediction is {examples_path}:{first['line']}" if first
                 else f"; {predictions_path}:{len(examples) + 1} is the first prediction without an example")
        raise InputError(f"{predictions_path} has {len(predictions)} predictions but "
                         f"{examples_path} has {len(examples)} examples; they must align line by line{where}")
    for number, ((_, pred_id), example) in enumerate(zip(predictions, examples), 1):
        if pred_id is not None and pred_id != str(example["id"]):
            raise InputError(f"{predictions_path}:{number}: field 'id': {pred_id!r} does not match "
                             f"example {example['id']!r} at {examples_path}:{example.get('line', number)}")
    try:
        summary, _ = compute_metrics([p for p, _ in predictions], examples,
                                     bleurt_checkpoint=bleurt_checkpoint)
    except ValueError as err:  # e.g. an unusable BLEURT checkpoint
        raise InputError(str(err)) from None
    return summary


def main(argv: list[str] | None = None) -> int:
    """The command: bad input ends with one line on stderr and exit status 2 (stages.errors.run_cli)."""
    return run_cli(score_command, "score", argv)


def score_command(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.score", description=__doc__.split("\n\n")[0])
    parser.add_argument("--predictions", required=True, help="text (one per line) or .jsonl predictions")
    parser.add_argument("--examples", required=True, help="ToTTo .jsonl or .jsonl.gz examples")
    parser.add_argument("--bleurt-checkpoint", default=None,
                        help="local BLEURT checkpoint folder (default: BLEURT not computed)")
    args = parser.parse_args(argv)
    summary = score_files(args.predictions, args.examples, args.bleurt_checkpoint)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
