"""Data sources: every supported input format read into one normalised example dict.

`data.source` in params.yaml picks one of
  * ``demo``      the embedded set in data/demo/ (official ToTTo schema, written for this project);
  * ``totto``     the official ToTTo JSONL files (``data.path`` folder, or ``data.train_file`` /
                  ``data.validation_file``; ``.jsonl`` or ``.jsonl.gz``);
  * ``fetaqa``    FeTaQA v1 JSONL (row 0 of ``table_array`` is the header row);
  * ``hf:<name>`` a Hugging Face dataset in the GEM ToTTo schema (e.g. ``hf:GEM/totto``), read with
                  ``datasets.load_dataset``; explicit ``data.train_file`` / ``data.validation_file``
                  (GEM JSON lists) are read through the same mapping with datasets' "json" builder.

Normalised example (the contract every later stage codes against):
  {"id": str, "table": [[{"value", "is_header", "column_span", "row_span"}, ...], ...],
   "highlighted_cells": [[row, col], ...], "page_title", "section_title", "section_text": str,
   "references": [str, ...], "overlap": bool | None, "question": str | None,
   "source_file": str, "line": int}

Bad records (invalid JSON, non-UTF-8 bytes, missing or mistyped fields, highlighted cells out of
range or listed twice, empty tables, empty references, impossible spans, duplicate ids, text that is not valid
Unicode, JSON nested too deeply) raise `BadRecordError` naming file, line and field; with
``on_bad_record="skip"`` they are skipped and counted by reason in a `LoadReport`. Nothing is dropped
without being counted. `totto_example` validates one record outside a file (stages.infer uses it);
its `FieldError` names the field and the caller adds where the record came from.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from table2text.config import group_settings
from table2text.errors import UserError
from table2text.io.readers import (
    FieldError,
    InputFileError,
    LineError,
    check_regular_file,
    check_text,
    iter_lines,
    parse_json_line,
)

SPLITS = ("train", "validation")
ON_BAD_RECORD = ("error", "skip")
# HTML caps colspan at 1000 and rowspan at 65534; a larger span cannot come from a real web table.
MAX_COLUMN_SPAN = 1000
MAX_ROW_SPAN = 65534
REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_DIR = REPO_ROOT / "data" / "demo"

# File names tried in a data.path folder, in order, per source and split.
_FILE_NAMES = {
    "totto": {
        "train": ["totto_train_data.jsonl", "train.jsonl"],
        "validation": ["totto_dev_data.jsonl", "dev.jsonl", "validation.jsonl"],
    },
    "fetaqa": {
        "train": ["train.jsonl", "fetaQA-v1_train.jsonl"],
        "validation": ["validation.jsonl", "dev.jsonl", "fetaQA-v1_dev.jsonl"],
    },
}


class BadRecordError(UserError, ValueError):
    """A record that cannot be used, located by file, line (1-based) and field."""

    def __init__(self, file: str | Path, line: int, field: str, message: str, reason: str = "invalid"):
        self.file = str(file)
        self.line = line
        self.field = field
        self.reason = reason
        super().__init__(f"{self.file}:{line}: field {field!r}: {message} [{reason}]")


@dataclass
class LoadReport:
    """Counts of one loading run: records read, kept, skipped (by reason) and sampled out."""

    read: int = 0
    kept: int = 0
    skipped_by_reason: dict[str, int] = field(default_factory=dict)
    sampled_out: int = 0

    @property
    def skipped(self) -> int:
        return sum(self.skipped_by_reason.values())

    def skip(self, reason: str) -> None:
        self.skipped_by_reason[reason] = self.skipped_by_reason.get(reason, 0) + 1

    def as_dict(self) -> dict:
        return {
            "read": self.read,
            "kept": self.kept,
            "skipped": self.skipped,
            "skipped_by_reason": dict(sorted(self.skipped_by_reason.items())),
            "sampled_out": self.sampled_out,
        }


# --------------------------------------------------------------------------------------------------
# Public entry points


def load_split(params_data: dict, split: str, report: LoadReport | None = None) -> list[dict]:
    """Load one split ("train" | "validation") of the source that `params_data` (params["data"]) names."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    report = report if report is not None else LoadReport()
    params_data = group_settings("data", params_data)  # checked, defaults filled in (table2text.config)
    on_bad = params_data["on_bad_record"]
    source = params_data["source"]

    if source == "demo":
        path = _split_file(params_data, split, "totto", default_dir=DEMO_DIR)
        examples = read_totto_jsonl(path, on_bad, report)
    elif source == "totto":
        examples = read_totto_jsonl(_split_file(params_data, split, "totto"), on_bad, report)
    elif source == "fetaqa":
        examples = read_fetaqa_jsonl(_split_file(params_data, split, "fetaqa"), on_bad, report)
    elif source.startswith("hf:"):
        examples = read_hf_gem(source[3:], split, params_data, on_bad, report)
    else:
        raise ValueError(f"data.source={source!r}: expected demo, totto, fetaqa or hf:<dataset>")

    samples = check_samples(params_data, split, len(examples), report)
    kept = subsample(examples, samples, int(params_data.get("seed", 0)))
    report.sampled_out += len(examples) - len(kept)
    return kept


def check_samples(params_data: dict, split: str, available: int, report: LoadReport) -> int:
    """data.<split>_samples as a count: an integer from 0 (all) to the number of records left to draw
    from; a larger one would silently give fewer examples than asked for."""
    key = f"{split}_samples"
    value = params_data.get(key, 0)
    value = 0 if value is None else value
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"data.{key} must be a whole number (0 = all), got {value!r}")
    if value < 0:
        raise ValueError(f"data.{key} must be 0 (all) or a positive count, got {value}")
    if value > available:
        raise ValueError(f"data.{key}={value} but only {available} {split} records are left to draw from (read "
                         f"{report.read}, skipped {report.skipped}): lower it, or set 0 for all of them")
    return value


def subsample(examples: list[dict], n: int, seed: int) -> list[dict]:
    """`n` examples drawn with a seeded RNG, in their original order (all of them when n <= 0)."""
    if n <= 0 or n >= len(examples):
        return list(examples)
    picked = sorted(random.Random(seed).sample(range(len(examples)), n))
    return [examples[i] for i in picked]


def read_totto_jsonl(
    path: str | Path,
    on_bad_record: str = "error",
    report: LoadReport | None = None,
    *,
    require_references: bool = True,
) -> list[dict]:
    """Read an official ToTTo JSONL file (.jsonl or .jsonl.gz).

    `require_references=False` accepts records without ``sentence_annotations`` (the unlabeled test
    split); their references are ``[]``.
    """
    return _read_records(
        path,
        lambda rec: _from_totto(rec, require_references=require_references),
        on_bad_record,
        report,
    )


def read_fetaqa_jsonl(path: str | Path, on_bad_record: str = "error", report: LoadReport | None = None) -> list[dict]:
    """Read a FeTaQA v1 JSONL file (.jsonl or .jsonl.gz)."""
    return _read_records(path, _from_fetaqa, on_bad_record, report)


def read_hf_gem(
    dataset: str, split: str, params_data: dict, on_bad_record: str = "error", report: LoadReport | None = None
) -> list[dict]:
    """Read a GEM-schema ToTTo split through `datasets`: from the hub, or from an explicit JSON file."""
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - datasets is pinned in requirements.txt
        raise RuntimeError("data.source hf:... needs the 'datasets' package") from err

    explicit = params_data[f"{split}_file"]
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise FileNotFoundError(f"data.{split}_file={explicit!r}: no such file")
        label = path.as_posix()
        # The same mapping as for the hub, so a local GEM file exercises it for real.
        try:
            rows = datasets.load_dataset("json", data_files=str(path), split="train")
        except Exception as err:  # datasets reads the file as a whole: no line to point at
            raise BadRecordError(
                label, 0, "<file>", f"datasets' json builder cannot read it ({type(err).__name__}: {err})", "corrupt_file"
            ) from err
    else:
        try:
            rows = datasets.load_dataset(dataset, split=split)
        except Exception as err:  # offline, unknown name, gated dataset: say which and what to do
            raise RuntimeError(
                f"data.source=hf:{dataset}: could not load split {split!r} through datasets.load_dataset "
                f"({type(err).__name__}: {err}). The Hugging Face hub needs the network; offline, point "
                f"data.{split}_file at a local GEM JSON file, or use data.source demo, totto or fetaqa."
            ) from err
        label = f"hf:{dataset}[{split}]"
    return _collect(((i + 1, row) for i, row in enumerate(rows)), label, _from_gem, on_bad_record, report)


# --------------------------------------------------------------------------------------------------
# Locating files


def _split_file(params_data: dict, split: str, kind: str, default_dir: Path | None = None) -> Path:
    explicit = params_data[f"{split}_file"]
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise FileNotFoundError(f"data.{split}_file={explicit!r}: no such file")
        return path
    folder = Path(params_data["path"] or default_dir or "")
    if not (params_data["path"] or default_dir):
        raise ValueError(f"data.path is empty and data.{split}_file is not set")
    if not folder.is_dir():
        raise FileNotFoundError(
            f"data.path={folder.as_posix()!r} is not a folder (set data.{split}_file for a single file)"
        )
    names = _FILE_NAMES[kind][split]
    for name in names:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    tried = ", ".join(f"{n}[.gz]" for n in names)
    raise FileNotFoundError(f"data.path={folder.as_posix()!r}: no {split} file ({tried}); or set data.{split}_file")


# --------------------------------------------------------------------------------------------------
# Reading lines and collecting records


def _read_records(path, convert, on_bad_record, report) -> list[dict]:
    path = Path(path)
    try:
        check_regular_file(path, "data file")
    except InputFileError as err:
        raise FileNotFoundError(str(err)) from None
    return _collect(_json_lines(path), path.as_posix(), convert, on_bad_record, report)


def _json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON or the BadRecordError that parsing raised) for each non-blank line,
    split by table2text.io.readers as every other reader splits them."""
    label = path.as_posix()
    line_no = 0
    try:
        for line_no, raw in iter_lines(path, "data file"):
            if not raw.strip():  # a blank line (e.g. a trailing one) is not a record
                continue
            try:
                yield line_no, parse_json_line(raw)
            except LineError as err:
                yield line_no, BadRecordError(label, line_no, "<line>", err.message, err.reason)
    except InputFileError as err:  # truncated or corrupt gzip, mixed line endings: the file itself
        if err.line is not None:
            raise BadRecordError(label, err.line, "<line>", err.detail, err.reason) from None
        raise BadRecordError(label, line_no + 1, "<file>", err.detail, err.reason) from None


def _collect(rows: Iterable[tuple[int, Any]], label: str, convert: Callable, on_bad_record: str, report) -> list[dict]:
    if on_bad_record not in ON_BAD_RECORD:
        raise ValueError(f"on_bad_record must be one of {ON_BAD_RECORD}, got {on_bad_record!r}")
    report = report if report is not None else LoadReport()
    examples, seen = [], {}
    for line_no, rec in rows:
        report.read += 1
        try:
            if isinstance(rec, BadRecordError):
                raise rec
            try:
                example = convert(rec)
            except FieldError as err:
                raise BadRecordError(label, line_no, err.field, err.message, err.reason) from None
            if example["id"] in seen:
                raise BadRecordError(label, line_no, "id", f"duplicate id {example['id']} (first on line {seen[example['id']]})", "duplicate_id")
        except BadRecordError as err:
            if on_bad_record == "error":
                raise
            report.skip(err.reason)
            continue
        seen[example["id"]] = line_no
        example["source_file"] = label
        example["line"] = line_no
        examples.append(example)
        report.kept += 1
    return examples


# --------------------------------------------------------------------------------------------------
# Schema mapping and validation. FieldError carries field and reason; _collect adds file and line.


def totto_example(rec, *, require_references: bool = True) -> dict:
    """Validate one official ToTTo record (a parsed JSON object) and return the normalised example,
    without "source_file" and "line" (the caller knows where the record came from). Raises FieldError.

    `require_references=False` accepts a record without ``sentence_annotations`` (references ``[]``)."""
    return _from_totto(rec, require_references=require_references)


def _get(rec: dict, key: str, types: type | tuple, *, required: bool = True, default=None):
    if key not in rec or rec[key] is None:
        if required:
            raise FieldError(key, "missing", "missing_field")
        return default
    value = rec[key]
    # bool is an int in Python; a JSON true is never a valid count or id.
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
        raise FieldError(key, f"expected {_type_names(types)}, got {type(value).__name__}", "wrong_type")
    if isinstance(value, str):
        check_text(value, key)
    return value


def _as_tuple(types) -> tuple:
    return types if isinstance(types, tuple) else (types,)


def _type_names(types) -> str:
    return " or ".join(t.__name__ for t in _as_tuple(types))


def _check_record(rec) -> dict:
    if not isinstance(rec, dict):
        raise FieldError("<record>", f"expected a JSON object, got {type(rec).__name__}", "wrong_type")
    return rec


def _validate_table(table) -> list[list[dict]]:
    if not isinstance(table, list):
        raise FieldError("table", f"expected a list of rows, got {type(table).__name__}", "wrong_type")
    out = []
    for r, row in enumerate(table):
        row = _records(row)
        if not isinstance(row, list):
            raise FieldError(f"table[{r}]", f"expected a list of cells, got {type(row).__name__}", "wrong_type")
        cells = []
        for c, cell in enumerate(row):
            where = f"table[{r}][{c}]"
            if not isinstance(cell, dict):
                raise FieldError(where, f"expected a cell object, got {type(cell).__name__}", "wrong_type")
            value = cell.get("value")
            if not isinstance(value, str):
                reason = "missing_field" if value is None else "wrong_type"
                raise FieldError(f"{where}.value", f"expected str, got {type(value).__name__}", reason)
            check_text(value, f"{where}.value")
            is_header = cell.get("is_header")
            if not isinstance(is_header, bool):
                reason = "missing_field" if is_header is None else "wrong_type"
                raise FieldError(f"{where}.is_header", f"expected bool, got {type(is_header).__name__}", reason)
            spans = {}
            for key, cap in (("column_span", MAX_COLUMN_SPAN), ("row_span", MAX_ROW_SPAN)):
                span = cell.get(key)
                if span is None:
                    raise FieldError(f"{where}.{key}", "missing", "missing_field")
                if not isinstance(span, int) or isinstance(span, bool):
                    raise FieldError(f"{where}.{key}", f"expected int, got {type(span).__name__}", "wrong_type")
                if not 1 <= span <= cap:
                    raise FieldError(f"{where}.{key}", f"span {span} outside 1..{cap}", "bad_span")
                spans[key] = span
            cells.append({"value": value, "is_header": is_header, **spans})
        out.append(cells)
    if not any(out):
        raise FieldError("table", "empty table (no cells)", "empty_table")
    return out


def _validate_highlights(cells, table: list[list[dict]], key: str) -> list[list[int]]:
    if not isinstance(cells, list):
        raise FieldError(key, f"expected a list of [row, col], got {type(cells).__name__}", "wrong_type")
    out, seen = [], {}
    for i, pair in enumerate(cells):
        if (
            not isinstance(pair, (list, tuple))
            or len(pair) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in pair)
        ):
            raise FieldError(f"{key}[{i}]", f"expected [row, col] integers, got {pair!r}", "wrong_type")
        r, c = pair
        if not 0 <= r < len(table):
            raise FieldError(f"{key}[{i}]", f"row {r} outside the table's {len(table)} rows", "highlight_out_of_range")
        if not 0 <= c < len(table[r]):
            raise FieldError(f"{key}[{i}]", f"column {c} outside row {r}'s {len(table[r])} cells", "highlight_out_of_range")
        if (r, c) in seen:  # the cell would be written into the prompt twice
            raise FieldError(f"{key}[{i}]", f"[{r}, {c}] repeats {key}[{seen[r, c]}]: list each cell once",
                             "duplicate_highlight")
        seen[r, c] = i
        out.append([r, c])
    if not out:
        raise FieldError(key, "no highlighted cells", "no_highlighted_cells")
    return out


def _validate_references(refs: list, key: str) -> list[str]:
    for i, ref in enumerate(refs):
        if not isinstance(ref, str):
            raise FieldError(f"{key}[{i}]", f"expected str, got {type(ref).__name__}", "wrong_type")
        if not ref.strip():
            raise FieldError(f"{key}[{i}]", "empty reference", "empty_reference")
        check_text(ref, f"{key}[{i}]")
    return list(refs)


def _annotations_to_references(annotations, require: bool) -> list[str]:
    if annotations is None:
        if require:
            raise FieldError("sentence_annotations", "missing", "missing_field")
        return []
    annotations = _records(annotations)
    if not isinstance(annotations, list):
        raise FieldError("sentence_annotations", f"expected a list, got {type(annotations).__name__}", "wrong_type")
    if require and not annotations:
        raise FieldError("sentence_annotations", "no annotations (no reference sentence)", "empty_reference")
    refs = []
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict):
            raise FieldError(f"sentence_annotations[{i}]", f"expected an object, got {type(ann).__name__}", "wrong_type")
        sentence = ann.get("final_sentence")
        if sentence is None:
            raise FieldError(f"sentence_annotations[{i}].final_sentence", "missing", "missing_field")
        refs.append(sentence)
    return _validate_references(refs, "sentence_annotations.final_sentence")


def _records(value):
    """datasets may hand a list of objects over as an object of lists; give back the list of objects."""
    if isinstance(value, dict) and value and all(isinstance(v, list) for v in value.values()):
        lengths = {len(v) for v in value.values()}
        if len(lengths) == 1:
            keys = list(value)
            return [dict(zip(keys, items)) for items in zip(*value.values())]
    return value


def _from_totto(rec, *, require_references: bool = True) -> dict:
    rec = _check_record(rec)
    example_id = _get(rec, "example_id", int)
    table = _validate_table(_get(rec, "table", list))
    overlap = _get(rec, "overlap_subset", bool, required=False)
    return {
        "id": str(example_id),  # a signed 64-bit int: kept exact as text
        "table": table,
        "highlighted_cells": _validate_highlights(_get(rec, "highlighted_cells", list), table, "highlighted_cells"),
        "page_title": _get(rec, "table_page_title", str),
        "section_title": _get(rec, "table_section_title", str),
        "section_text": _get(rec, "table_section_text", str, required=False, default=""),
        "references": _annotations_to_references(rec.get("sentence_annotations"), require_references),
        "overlap": overlap,
        "question": None,
    }


_GEM_OVERLAP = {"true": True, "false": False, "none": None, "": None}


def _from_gem(rec) -> dict:
    """GEM/totto: example_id is a string, overlap_subset a string ("True"/"False"/"none"),
    references empty on train (then the annotations' final sentences are the references)."""
    rec = _check_record(rec)
    example_id = _get(rec, "example_id", (str, int))
    if isinstance(example_id, str):
        try:
            example_id = int(example_id)
        except ValueError:
            raise FieldError("example_id", f"expected an integer id, got {example_id!r}", "wrong_type") from None
    table = _validate_table(_get(rec, "table", list))
    overlap = rec.get("overlap_subset")
    if isinstance(overlap, str):
        if overlap.strip().lower() not in _GEM_OVERLAP:
            raise FieldError("overlap_subset", f"expected True, False or none, got {overlap!r}", "wrong_type")
        overlap = _GEM_OVERLAP[overlap.strip().lower()]
    elif overlap is not None and not isinstance(overlap, bool):
        raise FieldError("overlap_subset", f"expected bool or str, got {type(overlap).__name__}", "wrong_type")
    references = _get(rec, "references", list, required=False, default=[])
    if references:
        references = _validate_references(references, "references")
    else:
        references = _annotations_to_references(rec.get("sentence_annotations"), True)
    return {
        "id": str(example_id),
        "table": table,
        "highlighted_cells": _validate_highlights(_get(rec, "highlighted_cells", list), table, "highlighted_cells"),
        "page_title": _get(rec, "table_page_title", str),
        "section_title": _get(rec, "table_section_title", str),
        "section_text": _get(rec, "table_section_text", str, required=False, default=""),
        "references": references,
        "overlap": overlap,
        "question": None,
    }


def _from_fetaqa(rec) -> dict:
    """FeTaQA: a table of strings whose row 0 is the header row; spans are already expanded."""
    rec = _check_record(rec)
    feta_id = _get(rec, "feta_id", int)
    array = _get(rec, "table_array", list)
    table = []
    for r, row in enumerate(array):
        if not isinstance(row, list):
            raise FieldError(f"table_array[{r}]", f"expected a list of strings, got {type(row).__name__}", "wrong_type")
        for c, value in enumerate(row):
            if not isinstance(value, str):
                raise FieldError(f"table_array[{r}][{c}]", f"expected str, got {type(value).__name__}", "wrong_type")
            check_text(value, f"table_array[{r}][{c}]")
        table.append([{"value": v, "is_header": r == 0, "column_span": 1, "row_span": 1} for v in row])
    if not any(table):
        raise FieldError("table_array", "empty table (no cells)", "empty_table")
    answer = _get(rec, "answer", str)
    if not answer.strip():
        raise FieldError("answer", "empty reference", "empty_reference")
    question = _get(rec, "question", str)
    return {
        "id": str(feta_id),
        "table": table,
        "highlighted_cells": _validate_highlights(_get(rec, "highlighted_cell_ids", list), table, "highlighted_cell_ids"),
        "page_title": _get(rec, "table_page_title", str),
        "section_title": _get(rec, "table_section_title", str),
        "section_text": "",
        "references": [answer],
        "overlap": None,
        "question": question,
    }
