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
import unicodedata
from pathlib import Path

from table2text.io import readers
from table2text.io.atomic import write_atomic
from table2text.errors import UserError, run_cli
from table2text.data.sources import BadRecordError, FieldError, check_text

DEFAULT_OUT = Path("docs/ERRORS.md")
DEFAULT_FULL = Path("metrics/errors-full.md")  # holds dataset text: must stay ignored by git
COMMAND = "python -m stages.error_analysis"

# The tags table2text.data.linearize writes around a cell: in `subtable` every <cell> is a highlighted cell; in
# `full_table` the highlighted ones are <highlighted_cell> and the others <cell>. (linearize.py writes
# them as literals; tests/test_error_analysis.py checks these against its output.)
CELL_TAG = "cell"
HIGHLIGHTED_TAG = "highlighted_cell"

LABELS = {
    "hallucinated_number": (
        "hallucinated number",
        "a number of the prediction (digits; thousands separators dropped, so 1,234 = 1234; decimals kept, "
        "trailing decimal zeros and leading zeros dropped) that is not a number of the prompt (titles, "
        "cells, headers, question). A year range such as 1989–90 in the prompt also supports 1990, and "
        "any year 1960-1969 of the prompt supports \"1960s\". A number the model computed (a sum, a "
        "count, a difference) counts too, even when it is right.",
    ),
    "missing_cell": (
        "missing highlighted cell",
        "a highlighted cell value that a reference mentions but the prediction does not. A text mentions "
        "a value when at least half (rounded up) of the value's words, stop words left out, are words of "
        "the text (lower-cased, accents and thousands separators dropped). Values with no such word "
        "(e.g. \"-\") are never missing.",
    ),
    "unsupported_entity": (
        "unsupported entity",
        "a name of the prediction (a run of capitalised words; stop words such as \"The\" or \"In\" that "
        "open a sentence are no names, one-letter words are left out, and \"of\", \"de\" and the like "
        "may join two words) with a word found in neither the prompt nor the references. A word "
        "is found when it is a word there, or shares with one a prefix of at least four letters and at "
        "least all but the last two letters of the shorter word (Ukrainian ~ Ukraine, Canadian ~ Canada). "
        "This stands for the issue's \"wrong entity\": a name the model made up or took from elsewhere.",
    ),
    "empty": ("empty prediction", "the prediction is empty or white space only."),
}

# Words that are never a name nor a content word of a cell, capitalised or not: function words and the
# usual sentence openers.
STOPWORDS = frozenset("""
a an the and or but nor for so yet of in on at to by with from into onto upon over under about above
below between among through throughout during before after since until till as than then there here
this that these those it its he she his her hers him they them their theirs we our us you your i me my
is are was were be been being has have had do does did will would can could may might shall should must
not no also both either neither each every all any some many most more less few several other another
such only just even still however although though while when where which who whom whose what why how
because if unless whether despite following according overall additionally furthermore moreover
meanwhile later earlier currently previously finally together instead thus therefore out up down off
per via against within without along across around behind beyond near
mr mrs ms dr jr sr
""".split())
NAME_JOINERS = frozenset("of de du da del der di la le van von y".split())  # may join two words of a name

_TAG = re.compile(r"</?[A-Za-z_]+>")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_TOKEN = re.compile(r"\d+(?:\.\d+)?|[^\W\d_]+")
_YEAR_RANGE = re.compile(r"(?<!\d)(\d{2})(\d{2})\s*[-–—/]\s*(\d{2})(?!\d)")
_NUMBER = re.compile(r"(\d+(?:,\d{3}(?!\d))*(?:\.\d+)?)(['’]?s\b)?")  # as `normalise` reads them
_POSSESSIVE = re.compile(r"['’]s\b")
_WORD = re.compile(r"[^\W\d_]+")
_JOIN = re.compile(rf"\s+|\s*-\s*|\s+(?:{'|'.join(sorted(NAME_JOINERS))})\s+")
_NOTES = re.compile(r"<!-- notes -->.*?<!-- /notes -->", re.S)
NOTES_PLACEHOLDER = "<!-- notes -->\n<!-- /notes -->"
FIELDS = ("id", "prompt", "prediction", "references", "parent")
SCORES = ("parent_precision", "parent_recall", "parent_f")


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


def analyse(row: dict) -> dict:
    """Labels of one example, with what set them off."""
    prompt, prediction, references = row["prompt"], row["prediction"], row["references"]
    found = {
        "hallucinated_number": hallucinated_numbers(prediction, prompt),
        "missing_cell": missing_cells(highlighted_values(prompt), prediction, references),
        "unsupported_entity": unsupported_entities(prediction, prompt, references),
        "empty": ["(empty)"] if not prediction.strip() else [],
    }
    return {"labels": [label for label in LABELS if found[label]], **found}


def normalise(text: str) -> str:
    """Lower case, accents and compatibility forms folded (²⁸⁶ -> 286), thousands separators dropped."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).casefold()
    return _THOUSANDS.sub("", text)


def canonical_number(digits: str) -> str:
    """'007' -> '7', '10.70' -> '10.7', '5.0' -> '5'."""
    whole, _, decimals = digits.partition(".")
    whole, decimals = whole.lstrip("0") or "0", decimals.rstrip("0")
    return f"{whole}.{decimals}" if decimals else whole


def words(text: str) -> list[str]:
    """Normalised words of `text`: runs of letters, and numbers in canonical form."""
    return [canonical_number(t) if t[0].isdigit() else t for t in _TOKEN.findall(normalise(text))]


def numbers(text: str) -> list[str]:
    return [w for w in words(text) if w[0].isdigit()]


def hallucinated_numbers(prediction: str, prompt: str) -> list[str]:
    """Numbers of the prediction (as written there) that are not numbers of the prompt.

    Both sides are compared in canonical form: thousands separators dropped ("1,234" = "1234"), decimals
    kept ("10.7" != "10"), leading zeros and trailing decimal zeros dropped. A year range "1989–90" of
    the prompt also supplies 1990 (and "1999–00" 2000); a decade "1960s" of the prediction is supported
    by any year 1960-1969 of the prompt."""
    source = set(numbers(_TAG.sub(" ", prompt)))
    for century, start, end in _YEAR_RANGE.findall(normalise(prompt)):
        source.add(str(int(century) + (int(end) < int(start))) + end)
    out = []
    for match in _NUMBER.finditer(unicodedata.normalize("NFKC", prediction)):
        number = canonical_number(match.group(1).replace(",", ""))
        decade = bool(match.group(2)) and len(number) == 4 and number.endswith("0")
        supported = number in source or (decade and any(len(n) == 4 and n[:3] == number[:3] for n in source))
        if not supported and match.group(1) not in out:
            out.append(match.group(1))
    return out


def highlighted_values(prompt: str) -> list[str]:
    """The highlighted cell values of a prompt of either linearisation (see table2text.data.linearize): the text
    after each <highlighted_cell> tag, or after each <cell> tag when there is none (subtable)."""
    for tag in (HIGHLIGHTED_TAG, CELL_TAG):
        values = re.findall(rf"<{tag}>\s*([^<]*)", prompt)
        if values:
            return [v.strip() for v in values if v.strip()]
    return []


def content_words(text: str) -> list[str]:
    return [w for w in words(text) if w not in STOPWORDS]


def mentions(text_words: set[str], value: str) -> bool:
    """Whether a text (its set of words) mentions a cell value: half its content words, rounded up."""
    needed = content_words(value)
    return sum(w in text_words for w in needed) >= math.ceil(len(needed) / 2)


def missing_cells(values: list[str], prediction: str, references: list[str]) -> list[str]:
    """Highlighted cell values (distinct) that some reference mentions and the prediction does not."""
    predicted = set(words(prediction))
    referenced = [set(words(ref)) for ref in references]
    out, seen = [], set()
    for value in values:
        key = tuple(content_words(value))
        if not key or key in seen:
            continue
        seen.add(key)
        if any(mentions(ref, value) for ref in referenced) and not mentions(predicted, value):
            out.append(value)
    return out


def names(prediction: str) -> list[str]:
    """Runs of capitalised words of the prediction, as written there ("'s" dropped). Stop words and
    one-letter words are never part of a name; "of", "de" and the like join two capitalised words."""
    text = _POSSESSIVE.sub("", prediction)
    spans: list[list[int]] = []
    for match in _WORD.finditer(text):
        word = match.group()
        if len(word) < 2 or not word[0].isupper() or word.casefold() in STOPWORDS:
            continue
        if spans and _JOIN.fullmatch(text[spans[-1][1]:match.start()]):
            spans[-1][1] = match.end()
        else:
            spans.append([match.start(), match.end()])
    return [text[start:end] for start, end in spans]


def found_in(word: str, source: set[str]) -> bool:
    """`word` (normalised) is a source word, or shares with one a prefix of >= 4 letters that covers all
    but the last two letters of the shorter of the two."""
    if word in source:
        return True
    for other in source:
        shared = len(_common_prefix(word, other))
        if shared >= 4 and shared >= min(len(word), len(other)) - 2:
            return True
    return False


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def unsupported_entities(prediction: str, prompt: str, references: list[str]) -> list[str]:
    """Names of the prediction (see `names`) with a word found in neither prompt nor references; the
    joining words ("of", "de", ...) need not be found."""
    source = set(words(_TAG.sub(" ", prompt)))
    for ref in references:
        source.update(words(ref))
    out = []
    for name in names(prediction):
        needed = [w for w in words(name) if w not in NAME_JOINERS and w not in STOPWORDS]
        if not all(found_in(w, source) for w in needed) and name not in out:
            out.append(name)
    return out


# --------------------------------------------------------------------------------------------------
# Ranking, counting and writing


def worst_examples(rows: list[dict], n: int) -> list[dict]:
    """The `n` lowest PARENT F; ties by id (numeric ids in numeric order, before other ids)."""
    def key(row):
        example_id = row["id"]
        return row["parent"]["parent_f"], (0, int(example_id), "") if example_id.isdigit() else (1, 0, example_id)
    return sorted(rows, key=key)[:n]


def count(rows: list[dict], label: str | None) -> int:
    """Examples with `label`; with None, examples with no label at all."""
    if label is None:
        return sum(not row["analysis"]["labels"] for row in rows)
    return sum(label in row["analysis"]["labels"] for row in rows)


def percent(n: int, total: int) -> str:
    return f"{n} ({100 * n / total:.1f}%)"


def mean_f(rows: list[dict], label: str | None) -> str:
    chosen = [r for r in rows if (label in r["analysis"]["labels"] if label else not r["analysis"]["labels"])]
    return f"{sum(r['parent']['parent_f'] for r in chosen) / len(chosen):.3f}" if chosen else "—"


def count_lines(rows: list[dict], worst: list[dict]) -> list[str]:
    lines = [f"error_analysis: {len(rows)} examples; label: all / worst {len(worst)}"]
    for label, (title, _) in [*LABELS.items(), (None, ("no label", ""))]:
        lines.append(f"  {title:<26} {percent(count(rows, label), len(rows)):>14}  "
                     f"{percent(count(worst, label), len(worst)):>12}")
    return lines


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
