"""Error analysis of a predictions file: the worst examples by PARENT F and counts of typical failures.

    python -m stages.error_analysis --predictions FILE [--worst 20] [--out docs/ERRORS.md]
                                    [--full metrics/errors-full.md] [--title TEXT] [--intro TEXT]

FILE is what the evaluate stage writes (metrics/predictions.jsonl; ``.gz`` is read transparently): one
JSON object a line with id, prompt, prediction, references and parent (parent_precision, parent_recall,
parent_f). Every example gets failure labels by four simple heuristics (LABELS says each one in a
sentence; the functions below say it precisely):

  * hallucinated number   a number of the prediction that is not a number of the prompt;
  * missing cell          a highlighted cell that a reference mentions and the prediction does not;
  * unsupported entity    a capitalised name of the prediction found in neither prompt nor references;
  * empty prediction      nothing but white space.

Two reports come out, written atomically:
  --out   (committed) counts per label over all examples and over the worst N, and the worst N by
          PARENT F (ties by id) with their scores, labels, prediction and the offending numbers and
          names (prediction text) -- no text of the dataset: inputs and references are never committed;
  --full  (git-ignored) the same plus each worst example's input (the prompt) and references and the
          values of its missing cells.
Hand-written notes between ``<!-- notes -->`` and ``<!-- /notes -->`` in an existing --out file are kept
when it is rewritten. A missing file or a bad line ends with one line naming file, line and field, and
exit status 2.
"""

from __future__ import annotations

import argparse
import math
import re
import shlex
import subprocess
import sys
from pathlib import Path

from table2text.io import readers
from table2text.io.atomic import write_atomic
from table2text.errors import UserError, run_cli
from table2text.data.sources import BadRecordError, FieldError, check_text
from table2text.metrics.error_analysis import (
    LABELS,
    FIELDS,
    SCORES,
    analyse,
    worst_examples,
    count,
    percent,
    mean_f,
    count_lines,
)

DEFAULT_OUT = Path("docs/ERRORS.md")
DEFAULT_FULL = Path("metrics/errors-full.md")  # holds dataset text: must stay ignored by git
COMMAND = "python -m stages.error_analysis"
_NOTES = re.compile(r"<!-- notes -->.*?<!-- /notes -->", re.S)
NOTES_PLACEHOLDER = "<!-- notes -->\n<!-- /notes -->"


class InputError(UserError):
    """Bad input (a missing file, a bad line), reported as one line with exit status 2."""


def main(argv: list[str] | None = None) -> int:
    """The command: bad input ends with one line on stderr and exit status 2 (table2text.errors.run_cli)."""
    return run_cli(analysis_command, "error_analysis", argv)


def analysis_command(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.out.resolve() == args.full.resolve():
        raise InputError(f"--out and --full are both {args.out.as_posix()}: the full report must be "
                         "another file (it holds dataset text that is never committed)")
    rows = read_predictions(args.predictions)
    for row in rows:
        row["analysis"] = analyse(row)
    worst = worst_examples(rows, args.worst)
    command = " ".join([COMMAND] + [shlex.quote(a) for a in argv])
    notes = existing_notes(args.out)
    write_atomic(args.full, render(rows, worst, args, command, full=True, notes=notes))
    write_atomic(args.out, render(rows, worst, args, command, full=False, notes=notes))
    warn_unless_ignored(args.full)
    for line in count_lines(rows, worst):
        print(line)
    print(f"  -> {args.out.as_posix()} (no dataset text), {args.full.as_posix()} (with inputs and references)")
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    parser.add_argument("--predictions", type=Path, required=True,
                        help="predictions of the evaluate stage (.jsonl or .jsonl.gz)")
    parser.add_argument("--worst", type=positive_int, default=20, help="how many worst examples (default 20)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"report without dataset text, to commit (default {DEFAULT_OUT})")
    parser.add_argument("--full", type=Path, default=DEFAULT_FULL,
                        help=f"report with inputs and references, never to commit (default {DEFAULT_FULL})")
    parser.add_argument("--title", default="Error analysis", help="heading of both reports")
    parser.add_argument("--intro", default="", help="a paragraph under the heading (what was evaluated)")
    return parser.parse_args(argv)


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


# --------------------------------------------------------------------------------------------------
# Reading


def read_predictions(path: Path) -> list[dict]:
    """The rows of a predictions file, each checked; a bad one raises InputError naming file, line, field."""
    label = path.as_posix()
    rows, seen = [], {}
    try:
        for line_no, raw in readers.iter_lines(path, "predictions"):  # split as every reader splits
            if not raw.strip():
                continue
            try:
                row = check_row(readers.parse_json_line(raw))
            except readers.LineError as err:
                raise BadRecordError(label, line_no, "<line>", err.message, err.reason) from None
            except FieldError as err:
                raise BadRecordError(label, line_no, err.field, err.message, err.reason) from None
            if row["id"] in seen:
                raise BadRecordError(label, line_no, "id", f"duplicate id {row['id']} "
                                     f"(first on line {seen[row['id']]})", "duplicate_id")
            seen[row["id"]] = line_no
            rows.append(row)
    except (BadRecordError, readers.InputFileError) as err:
        raise InputError(str(err)) from None
    if not rows:
        raise InputError(f"{label}: no predictions (the file is empty)")
    return rows


def check_row(row) -> dict:
    """The fields this analysis reads, with their types; raises FieldError for the first bad one."""
    if not isinstance(row, dict):
        raise FieldError("<record>", f"expected a JSON object, got {type(row).__name__}", "wrong_type")
    for field in FIELDS:
        if row.get(field) is None:
            raise FieldError(field, "missing", "missing_field")
    if isinstance(row["id"], (bool, float, dict, list)):
        raise FieldError("id", f"expected a string or integer id, got {type(row['id']).__name__}", "wrong_type")
    for field in ("prompt", "prediction"):
        if not isinstance(row[field], str):
            raise FieldError(field, f"expected str, got {type(row[field]).__name__}", "wrong_type")
        check_text(row[field], field)
    if not isinstance(row["references"], list) or not row["references"]:
        raise FieldError("references", "expected a non-empty list of strings", "wrong_type")
    for i, ref in enumerate(row["references"]):
        if not isinstance(ref, str):
            raise FieldError(f"references[{i}]", f"expected str, got {type(ref).__name__}", "wrong_type")
        check_text(ref, f"references[{i}]")
    if not isinstance(row["parent"], dict):
        raise FieldError("parent", f"expected an object, got {type(row['parent']).__name__}", "wrong_type")
    for key in SCORES:
        value = row["parent"].get(key)
        if value is None:
            raise FieldError(f"parent.{key}", "missing", "missing_field")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise FieldError(f"parent.{key}", f"expected a number, got {value!r}", "wrong_type")
    return {**row, "id": str(row["id"])}


# --------------------------------------------------------------------------------------------------
# The heuristics


# --------------------------------------------------------------------------------------------------
# Ranking, counting and writing


def render(rows, worst, args, command: str, *, full: bool, notes: str) -> str:
    """The Markdown report; `full` adds the dataset text (inputs, references, missing cell values)."""
    n = len(worst)
    out = [f"# {args.title}", ""]
    if args.intro:
        out += [args.intro, ""]
    out += [f"Written from {len(rows)} examples by", "", "```bash", command, "```", ""]
    if full:
        out += ["**This file holds the dataset's text (inputs and references): never commit it.** "
                f"`{args.out.as_posix()}` is the same report without it.", ""]
    else:
        out += ["This file holds no text of the dataset (licence and provenance: inputs and references are "
                "never committed); only ids, scores, labels, the model's predictions and the numbers and "
                "names of the predictions that set off a label. The same command writes the full report, "
                f"with each example's input and references, to `{args.full.as_posix()}`, which is never "
                "committed.", ""]
    out += ["## Failure labels", "", "Each example gets every label whose heuristic fires:", ""]
    out += [f"- **{title}**: {definition}" for title, definition in LABELS.values()]
    out += ["", "Heuristics, not judgements: they point at examples to read, and both miss and over-count "
            "(a paraphrase of a cell is \"missing\", a correct total is a \"hallucinated\" number).", ""]
    out += ["## Counts", "",
            f"| label | all {len(rows)} examples | worst {n} by PARENT F | mean PARENT F of the labelled |",
            "|---|---|---|---|"]
    for label, (title, _) in [*LABELS.items(), (None, ("no label", ""))]:
        out.append(f"| {title} | {percent(count(rows, label), len(rows))} | {percent(count(worst, label), n)} "
                   f"| {mean_f(rows, label)} |")
    out += ["", "An example can have several labels, so the percentages add up to more than 100.", ""]
    if not full:
        out += [notes, ""]
    out += [f"## The {n} worst examples by PARENT F", "", "Lowest first, ties by id.", "",
            "| # | id | PARENT P | R | F | labels |", "|---|---|---|---|---|---|"]
    for rank, row in enumerate(worst, 1):
        p = row["parent"]
        labels = ", ".join(LABELS[label][0] for label in row["analysis"]["labels"]) or "—"
        out.append(f"| {rank} | {row['id']} | {p['parent_precision']:.3f} | {p['parent_recall']:.3f} "
                   f"| {p['parent_f']:.3f} | {labels} |")
    out.append("")
    for rank, row in enumerate(worst, 1):
        out += example_section(rank, row, full)
    return "\n".join(out).rstrip("\n") + "\n"


def example_section(rank: int, row: dict, full: bool) -> list[str]:
    a, p = row["analysis"], row["parent"]
    out = [f"### {rank}. id {row['id']}: PARENT F {p['parent_f']:.3f} "
           f"(P {p['parent_precision']:.3f}, R {p['parent_recall']:.3f})", "",
           f"Prediction: {quote(row['prediction']) if row['prediction'].strip() else '*(empty)*'}", ""]
    if a["hallucinated_number"]:
        out.append(f"- hallucinated numbers: {', '.join(a['hallucinated_number'])}")
    if a["unsupported_entity"]:
        out.append(f"- unsupported entities: {'; '.join(quote(e) for e in a['unsupported_entity'])}")
    if a["missing_cell"]:
        values = f": {'; '.join(quote(v) for v in a['missing_cell'])}" if full else ""
        out.append(f"- missing highlighted cells: {len(a['missing_cell'])}{values}")
    if not a["labels"]:
        out.append("- no label")
    out.append("")
    if full:
        fence = "~" * max(3, 1 + max((len(m) for m in re.findall(r"~+", row["prompt"])), default=0))
        out += ["Input (the prompt):", "", fence, row["prompt"].rstrip("\n"), fence, "", "References:", ""]
        out += [f"- {quote(ref)}" for ref in row["references"]]
        out.append("")
    return out


def quote(text: str) -> str:
    """Text as literal Markdown on one line (no emphasis, links, tags or table breaks)."""
    text = " ".join(text.split())
    return re.sub(r"([\\`*_\[\]<>|#])", r"\\\1", text)


def existing_notes(path: Path) -> str:
    """The hand-written notes block of an existing report, or an empty block to write them in."""
    try:
        match = _NOTES.search(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        return NOTES_PLACEHOLDER
    return match.group() if match else NOTES_PLACEHOLDER


def warn_unless_ignored(path: Path) -> None:
    """A warning when `path` lies in a git work tree and git does not ignore it: it holds dataset text."""
    try:
        result = subprocess.run(["git", "check-ignore", "-q", path.as_posix()], capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return
    if result.returncode == 1:  # 0: ignored; 128: not a git work tree (or git failed)
        print(f"error_analysis: warning: {path.as_posix()} holds dataset text but git does not ignore it; "
              f"add it to .gitignore and never commit it", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
