"""One reading of each kind of input file, shared by every stage and CLI.

  * lines        `iter_lines`: a file (``.gz`` read transparently) or stdin (``-``) split into lines the
                 same way everywhere: ``\\n``, ``\\r\\n`` and a lone ``\\r`` end a line (Python's universal
                 newlines, as the official ToTTo scripts read their files), a UTF-8 byte order mark at
                 the start is dropped, and nothing else ends a line: U+2028, U+2029, form feeds and the
                 other characters that ``str.splitlines()`` splits on stay inside their line (a JSON
                 string may hold them). A file that mixes lone ``\\r`` with ``\\n`` endings is refused
                 with the first such line: a ``\\r`` inside one text would shift every later line.
  * JSON lines   `parse_json_line` / `read_json_lines`: one JSON value a non-blank line; not UTF-8,
                 invalid JSON, nesting too deep and 5,000-digit numbers are named with their line.
  * one JSON     `read_json_document` (infer's FILE, stdin) and `read_json_file` (config.json,
                 training_info.json, adapter_config.json, ...): a truncated or non-JSON file is named
                 with what to do about it.
  * predictions  `read_predictions`: plain text (one a line) or JSON lines of {"prediction", "id"}, told
                 apart by content as well as by name: a ``.json`` or ``.txt`` file of JSON lines is read
                 as JSON lines, a ``.json`` file that is not JSON lines is refused; ids are checked
                 wherever a line has one.
  * processed    `read_processed`: data/processed/*.jsonl, the contract between preprocess and the model
                 stages (train, merge and evaluate read it here, with the same checks).

A path that is a directory, a named pipe or a device where a regular file is expected is named as such
(not "no such file"). Every problem is an `InputFileError` whose message is one line naming the file
(and line); the CLIs print it and exit with status 2.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator

from table2text.errors import UserError

BOM = b"\xef\xbb\xbf"
STDIN = "-"
STDIN_LABEL = "<stdin>"


class FieldError(UserError, ValueError):
    """A bad field of one record; whoever read the record adds the file and line."""

    def __init__(self, field: str, message: str, reason: str):
        super().__init__(f"field {field!r}: {message}")
        self.field, self.message, self.reason = field, message, reason


def check_text(value: str, field: str) -> str:
    """`value` if it is valid Unicode; JSON escapes can smuggle in lone surrogates ("\\ud800") that
    json.loads accepts but no UTF-8 file or tokenizer can take."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise FieldError(field, f"not valid Unicode (lone surrogate at character {err.start})", "invalid_text") from None
    return value


class InputFileError(UserError, ValueError):
    """An input file that cannot be read as what it should be; the message names it (and the line).
    `line`, `detail` (the message without file and line) and `reason` let table2text.data.sources report it as
    one of its BadRecordErrors."""

    def __init__(self, message: str, *, line: int | None = None, detail: str | None = None,
                 reason: str = "unreadable_file"):
        super().__init__(message)
        self.line, self.detail, self.reason = line, detail or message, reason


class LineError(ValueError):
    """One bad line; the caller adds the file and line. `reason` is the skip reason of table2text.data.sources."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.message, self.reason = message, reason


# --------------------------------------------------------------------------------------------------
# Files


def label_of(source: str | Path) -> str:
    return STDIN_LABEL if str(source) == STDIN else Path(source).as_posix()


def check_regular_file(path: str | Path, what: str = "input") -> Path:
    """`path` if it is a regular file (or a link to one); otherwise an InputFileError that says what it
    is instead: missing, a directory, a named pipe, a socket or a device."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise InputFileError(f"{path.as_posix()}: no such file ({what})") from None
    except OSError as err:  # permission denied on a parent folder, a name too long, ...
        raise InputFileError(f"{path.as_posix()}: cannot read ({what}): {err.strerror or err}") from None
    if stat.S_ISREG(mode):
        return path
    if stat.S_ISDIR(mode):
        kind = "a directory"
    elif stat.S_ISFIFO(mode):
        kind = "a named pipe (FIFO)"
    elif stat.S_ISSOCK(mode):
        kind = "a socket"
    else:
        kind = "a device"
    raise InputFileError(f"{path.as_posix()}: is {kind}, not a regular file ({what}): give the path of a file"
                         + (" (or '-' with the data on stdin)" if what in _STDIN_KINDS else ""))


_STDIN_KINDS = {"predictions", "input table", "input tables"}  # what the CLIs also read from stdin


def _open_binary(source: str | Path, what: str) -> IO[bytes]:
    if str(source) == STDIN:
        buffer = getattr(sys.stdin, "buffer", None)  # bytes, so that bad UTF-8 is ours to report
        if buffer is None:  # a replaced sys.stdin without a buffer (tests): it is text already
            return io.BytesIO(sys.stdin.read().encode("utf-8", "surrogatepass"))
        return buffer
    path = check_regular_file(source, what)
    try:
        return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
    except OSError as err:  # permission denied
        raise InputFileError(f"{path.as_posix()}: cannot read ({what}): {err.strerror or err}") from None


def iter_lines(source: str | Path, what: str = "input") -> Iterator[tuple[int, bytes]]:
    """(line number, bytes of the line without its ending) for every line of `source` (a path, or '-'
    for stdin), streamed; see the module docstring for what ends a line."""
    label = label_of(source)
    fh = _open_binary(source, what)
    try:
        yield from _split(fh, label)
    except (OSError, EOFError) as err:  # a truncated or corrupt .gz, an I/O error mid-file
        detail = f"cannot read file ({type(err).__name__}: {err})"
        raise InputFileError(f"{label}: {detail}", detail=detail, reason="corrupt_file") from None
    finally:
        if str(source) != STDIN:
            fh.close()


class Line(bytes):
    """The bytes of one line, and `offset`: where the line starts in the file (BOM included), so that a
    byte named in a message is the file's byte, as `cmp` or a hex editor count."""

    offset: int = 0


def _line(part: bytes, offset: int) -> Line:
    line = Line(part)
    line.offset = offset
    return line


def _split(fh: IO[bytes], label: str) -> Iterator[tuple[int, bytes]]:
    offset = 0  # of the current raw chunk in the file
    number = 0
    first_cr = None  # first line ended by a lone \r
    saw_lf = False  # a line ended by \n or \r\n
    for index, raw in enumerate(fh):  # a binary file iterates on b"\n"
        start, offset = offset, offset + len(raw)
        if index == 0 and raw.startswith(BOM):
            raw, start = raw[len(BOM):], len(BOM)
            if not raw:  # the file is a BOM alone
                break
        ended = raw.endswith(b"\n")
        if ended:
            raw = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
        parts = raw.split(b"\r") if b"\r" in raw else [raw]
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if last and not ended and part == b"" and len(parts) > 1:
                break  # "a\rb\r" at the end of the file: the final \r ends line b, no empty line after it
            number += 1
            if not last:
                first_cr = first_cr or number
            elif ended:
                saw_lf = True
            if first_cr is not None and saw_lf:
                detail = ("a lone carriage return (\\r) ends this line while other lines end with \\n: a \\r "
                          "inside one text would shift every later line; replace the stray \\r with a space, or "
                          "save the file with one kind of line ending")
                raise InputFileError(f"{label}:{first_cr}: {detail}", line=first_cr, detail=detail,
                                     reason="mixed_line_endings")
            yield number, _line(part, start)
            start += len(part) + 1  # the next part follows this one's lone \r


# --------------------------------------------------------------------------------------------------
# Text and JSON


def decode_line(raw: bytes) -> str:
    """The line as text; LineError("not UTF-8 ...", "not_utf8") otherwise."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        at = getattr(raw, "offset", 0) + err.start
        raise LineError(f"not UTF-8 text ({err.reason} at byte {at})", "not_utf8") from None


# Everything str.splitlines() breaks on: a text printed for a line-based reader must hold none of them.
LINE_BREAKS = "\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
_ONE_LINE = str.maketrans({c: " " for c in LINE_BREAKS})


def one_line(text: str) -> str:
    """`text` with every line break (\\r and U+2028 as well as \\n) made a space: one line for any reader."""
    return text.replace("\r\n", " ").translate(_ONE_LINE)


def decode_text(data: bytes, label: str) -> str:
    """A whole file's bytes as text, a leading BOM dropped; bad UTF-8 is named with its line."""
    if data.startswith(BOM):
        data = data[len(BOM):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise InputFileError(f"{label}:{line}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def parse_json(text: str) -> Any:
    """json.loads with every way it can fail as a LineError (reason "invalid_json")."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise LineError(f"invalid JSON ({err.msg} at column {err.colno})", "invalid_json") from None
    except RecursionError:  # json's C parser gives up on deep nesting; no real record nests so deep
        raise LineError("invalid JSON (RecursionError: nested too deeply)", "invalid_json") from None
    except ValueError as err:  # e.g. an integer of more than 4300 digits
        raise LineError(f"invalid JSON (ValueError: {err})", "invalid_json") from None


def parse_json_line(raw: bytes) -> Any:
    return parse_json(decode_line(raw))


def read_json_lines(source: str | Path, what: str = "input") -> list[tuple[int, Any]]:
    """(line number, JSON value) of every non-blank line; the first bad line is an InputFileError."""
    label = label_of(source)
    rows = []
    for number, raw in iter_lines(source, what):
        if not raw.strip():
            continue
        try:
            rows.append((number, parse_json_line(raw)))
        except LineError as err:
            raise InputFileError(f"{label}:{number}: {err.message}") from None
    return rows


def read_bytes(source: str | Path, what: str = "input") -> bytes:
    fh = _open_binary(source, what)
    try:
        return fh.read()
    except (OSError, EOFError) as err:
        raise InputFileError(f"{label_of(source)}: cannot read ({what}): {type(err).__name__}: {err}") from None
    finally:
        if str(source) != STDIN:
            fh.close()


def read_json_document(source: str | Path, what: str = "input") -> Any:
    """One JSON value that may span lines (a path or '-'); errors name the line."""
    label = label_of(source)
    text = decode_text(read_bytes(source, what), label)
    if not text.strip():
        raise InputFileError(f"{label}: empty input (expected one JSON value)")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise InputFileError(f"{label}:{err.lineno}: invalid JSON ({err.msg} at column {err.colno})") from None
    except RecursionError:
        raise InputFileError(f"{label}: invalid JSON (nested too deeply)") from None
    except ValueError as err:
        raise InputFileError(f"{label}: invalid JSON ({err})") from None


def read_json_file(path: str | Path, what: str, *, fix: str = "") -> dict:
    """A JSON object file such as a model's config.json: missing, a directory, truncated, not JSON or not
    an object are each one line naming the file, what it is (`what`) and what to do (`fix`, e.g.
    "fetch the model again")."""
    path = Path(path)
    fix = fix or "restore it or write it again"
    try:
        check_regular_file(path, what)
        obj = read_json_document(path, what)
    except InputFileError as err:
        raise InputFileError(f"{err} ({what}: {fix})") from None
    if not isinstance(obj, dict):
        raise InputFileError(f"{path.as_posix()}: expected a JSON object, got {type(obj).__name__} "
                             f"({what}: {fix})")
    return obj


# --------------------------------------------------------------------------------------------------
# Predictions


@dataclass(frozen=True)
class Prediction:
    line: int
    text: str
    id: str | None = None


def _name_format(path: str) -> str:
    name = path[:-3] if path.endswith(".gz") else path
    return {".jsonl": "jsonl", ".json": "json"}.get(os.path.splitext(name)[1], "text")


def _is_prediction_object(raw: bytes) -> bool:
    try:
        obj = parse_json_line(raw)
    except LineError:
        return False
    return isinstance(obj, dict) and "prediction" in obj


def read_predictions(source: str | Path) -> tuple[str, list[Prediction]]:
    """(format, predictions) of a predictions file (a path or '-').

    The format: ``.jsonl`` means JSON lines; otherwise a file whose first non-blank line is a JSON object
    with a "prediction" field is JSON lines too (whatever its name: a ``.json`` or ``.txt`` file of JSON
    lines was once scored as text, BLEU 46 instead of 100); a ``.json`` file that is not JSON lines is
    refused; anything else is plain text, one prediction a line (an empty line is an empty prediction)."""

    label = label_of(source)
    lines = list(iter_lines(source, "predictions"))
    by_name = "text" if str(source) == STDIN else _name_format(str(source))
    first = next(((n, raw) for n, raw in lines if raw.strip()), None)
    if by_name == "jsonl" or (first is not None and _is_prediction_object(first[1])):
        fmt = "jsonl"
    elif by_name == "json":
        raise InputFileError(_not_json_lines(label, lines, first))
    else:
        fmt = "text"

    rows = []
    for number, raw in lines:
        where = f"{label}:{number}"
        try:
            if fmt == "text":
                text, example_id = decode_line(raw), None
            elif not raw.strip():
                continue
            else:
                text, example_id = _prediction_object(parse_json_line(raw))
            check_text(text, "prediction")
        except LineError as err:
            raise InputFileError(f"{where}: {err.message}") from None
        except FieldError as err:
            raise InputFileError(f"{where}: {err}") from None
        rows.append(Prediction(number, text, example_id))
    return fmt, rows


def _prediction_object(obj) -> tuple[str, str | None]:

    if not isinstance(obj, dict) or not isinstance(obj.get("prediction"), str):
        raise FieldError("prediction", "expected a JSON object with a string 'prediction'", "wrong_type")
    ids = {}
    for key in ("id", "example_id"):
        value = obj.get(key)
        if value is None:
            continue
        if isinstance(value, (dict, list, bool, float)):
            raise FieldError(key, f"expected a string or integer id, got {type(value).__name__}", "wrong_type")
        ids[key] = str(value)
    if len(set(ids.values())) > 1:
        raise FieldError("example_id", f"{ids['example_id']!r} differs from 'id' {ids['id']!r}", "wrong_type")
    return obj["prediction"], next(iter(ids.values()), None)


def _not_json_lines(label: str, lines, first) -> str:
    advice = "write one {\"prediction\": ...} object a line, or name the file .txt for one prediction a line"
    if first is None:
        return f"{label}: empty .json predictions file ({advice})"
    text = b"\n".join(raw for _, raw in lines)
    try:
        whole = json.loads(decode_text(text, label))
    except (InputFileError, ValueError, RecursionError):
        whole = None
    if whole is not None:
        return f"{label}: holds one JSON {type(whole).__name__}, not JSON lines ({advice})"
    return f"{label}:{first[0]}: a .json predictions file must hold JSON lines, and this line is not a " \
           f"JSON object with a 'prediction' ({advice})"


# --------------------------------------------------------------------------------------------------
# Processed records (data/processed/*.jsonl)

# field -> (check, what it must be). The contract every model stage reads; preprocess writes more.
PROCESSED_FIELDS = {
    "id": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "prompt": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "references": (lambda v: isinstance(v, list) and all(isinstance(r, str) for r in v), "a list of strings"),
    "table": (lambda v: isinstance(v, list), "a list of rows"),
    "highlighted_cells": (lambda v: isinstance(v, list), "a list of [row, column]"),
    "completion": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
}


def read_processed(path: str | Path, max_records: int = 0, *, what: str = "processed records") -> list[dict]:
    """The processed records of `path` (the first `max_records`, all when 0): every line a JSON object
    with the fields of PROCESSED_FIELDS, ids unique. The first problem is an InputFileError naming file,
    line and field; a missing file says to run the preprocess stage."""

    path = Path(path)
    label = path.as_posix()
    if not path.exists():
        raise InputFileError(f"{label}: no such file (run the preprocess stage first)")
    records, seen = [], {}
    for number, raw in iter_lines(path, what):
        if not raw.strip():
            continue
        where = f"{label}:{number}"
        try:
            record = parse_json_line(raw)
        except LineError as err:
            raise InputFileError(f"{where}: {err.message}") from None
        if not isinstance(record, dict):
            raise InputFileError(f"{where}: field '<record>': expected a JSON object, got {type(record).__name__}")
        for field, (ok, expected) in PROCESSED_FIELDS.items():
            if field not in record:
                raise InputFileError(f"{where}: field {field!r}: missing (rerun the preprocess stage)")
            if not ok(record[field]):
                raise InputFileError(f"{where}: field {field!r}: expected {expected}, "
                                     f"got {type(record[field]).__name__}")
        for field in ("prompt", "completion"):
            try:
                check_text(record[field], field)
            except FieldError as err:
                raise InputFileError(f"{where}: {err}") from None
        if record["id"] in seen:
            raise InputFileError(f"{where}: field 'id': duplicate id {record['id']} (first on line {seen[record['id']]})")
        seen[record["id"]] = number
        records.append(record)
        if max_records > 0 and len(records) == max_records:
            break
    if not records:
        raise InputFileError(f"{label}: no records (rerun the preprocess stage)")
    return records


def sha256_file(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks: the identity of a data file or a written model file."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
