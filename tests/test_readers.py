"""table2text.io.readers: one reading of each input kind. Hypothesis generates the shapes each reader must
take (line endings, a BOM, U+2028 and the other characters str.splitlines() breaks on, gzip, stdin) and
checks what comes back; the examples name what the readers refuse."""

from __future__ import annotations

import gzip
import io
import json
import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from table2text.io import readers
from table2text.io.readers import InputFileError

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# Characters str.splitlines() breaks on that are no line break for any reader here.
NOT_BREAKS = "\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
LINE_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n")
                    | st.sampled_from(NOT_BREAKS), max_size=12)
ENDINGS = st.sampled_from(["\n", "\r\n", "\r"])


def encode(lines: list[str], ending: str, *, bom: bool, final: bool) -> bytes:
    text = ending.join(lines) + (ending if final and lines else "")
    return (readers.BOM if bom else b"") + text.encode("utf-8")


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


# ------------------------------------------------------------------------------------------ lines


@SETTINGS
@given(lines=st.lists(LINE_TEXT, max_size=6), ending=ENDINGS, bom=st.booleans(), final=st.booleans(),
       gz=st.booleans())
def test_any_lines_come_back_whole_whatever_their_ending(tmp_path, lines, ending, bom, final, gz):
    path = write(tmp_path / ("t.txt.gz" if gz else "t.txt"), encode(lines, ending, bom=bom, final=final))
    if lines and not final and lines[-1] == "":
        lines = lines[:-1]  # "a\n" + "" is the file "a\n": one line
    got = [(n, raw.decode("utf-8")) for n, raw in readers.iter_lines(path)]
    assert got == list(enumerate(lines, 1))


@SETTINGS
@given(lines=st.lists(LINE_TEXT.filter(bool), min_size=2, max_size=6), data=st.data())  # "\r" + "" + "\n" is CRLF
def test_a_lone_cr_among_lf_endings_is_named_with_its_line(tmp_path, lines, data):
    cr = data.draw(st.integers(0, len(lines) - 2))  # the line that ends with a lone \r
    lf = data.draw(st.sampled_from([i for i in range(len(lines) - 1) if i != cr] or [len(lines) - 1]))
    text = "".join(line + ("\r" if i == cr else "\n" if i == lf or i == len(lines) - 1 else "\r\n")
                   for i, line in enumerate(lines))
    path = write(tmp_path / "mixed.txt", text.encode("utf-8"))
    with pytest.raises(InputFileError, match=rf"^{path.as_posix()}:{cr + 1}: a lone carriage return"):
        list(readers.iter_lines(path))


def test_stdin_is_read_like_a_file(monkeypatch):
    data = readers.BOM + "a\r\nb\u2028c\r\n".encode("utf-8")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))
    assert [raw.decode() for _, raw in readers.iter_lines("-")] == ["a", "b\u2028c"]


def test_a_directory_or_a_pipe_is_named_as_such(tmp_path):
    with pytest.raises(InputFileError, match=rf"^{tmp_path.as_posix()}: is a directory, not a regular file"):
        list(readers.iter_lines(tmp_path, "predictions"))
    with pytest.raises(InputFileError, match="no such file"):
        readers.check_regular_file(tmp_path / "missing.txt")
    if not hasattr(os, "mkfifo"):
        pytest.skip("no named pipes on this platform")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(InputFileError, match=r"is a named pipe \(FIFO\), not a regular file .* '-' with the data on stdin"):
        readers.read_predictions(fifo)


def test_a_truncated_gzip_is_named(tmp_path):
    path = write(tmp_path / "p.jsonl", gzip.compress(b'{"prediction": "a"}\n' * 50)[:-12])
    path = path.rename(tmp_path / "p.jsonl.gz")
    with pytest.raises(InputFileError, match=rf"^{path.as_posix()}: cannot read file \((EOFError|BadGzipFile)"):
        readers.read_predictions(path)


# ------------------------------------------------------------------------------------------ JSON lines

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**60), 2**60) | LINE_TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(LINE_TEXT, inner, max_size=3), max_leaves=6)


@SETTINGS
@given(values=st.lists(JSON_VALUES, max_size=5), ending=ENDINGS, bom=st.booleans(), ascii_=st.booleans())
def test_any_json_lines_come_back_equal(tmp_path, values, ending, bom, ascii_):
    # U+2028 and friends stay inside the JSON string they are in (infer --batch split on them once)
    lines = [json.dumps(v, ensure_ascii=ascii_) for v in values]
    path = write(tmp_path / "v.jsonl", encode(lines, ending, bom=bom, final=True))
    assert readers.read_json_lines(path) == list(enumerate(values, 1))


@pytest.mark.parametrize("line, message", [
    (b'{"a": 1', "invalid JSON (Expecting ',' delimiter at column 8)"),
    (b"[" * 100_000, "invalid JSON (RecursionError: nested too deeply)"),
    (b"9" * 5000, "invalid JSON (ValueError: Exceeds the limit"),
    (b'{"a": "\xff"}', "not UTF-8 text (invalid start byte at byte 10)"),  # the file's byte
])
def test_a_bad_json_line_is_named_with_its_line(tmp_path, line, message):
    path = write(tmp_path / "v.jsonl", b"{}\n" + line + b"\n{}\n")
    with pytest.raises(InputFileError) as err:
        readers.read_json_lines(path)
    assert str(err.value).startswith(f"{path.as_posix()}:2: {message}")


@SETTINGS
@given(value=st.dictionaries(LINE_TEXT, JSON_VALUES, max_size=4), cut=st.integers(0, 200), indent=st.booleans())
def test_a_json_file_is_read_whole_or_named(tmp_path, value, cut, indent):
    data = json.dumps(value, indent=1 if indent else None).encode()
    path = write(tmp_path / "config.json", data[:cut])
    try:
        got = readers.read_json_file(path, "the model's config.json", fix="fetch it again")
    except InputFileError as err:
        assert cut < len(data) or not isinstance(value, dict)
        assert str(err).startswith(path.as_posix()) and str(err).endswith("(the model's config.json: fetch it again)")
        assert "\n" not in str(err)
        return
    assert got == json.loads(data[:cut])


# ------------------------------------------------------------------------------------------ predictions

PREDICTION = LINE_TEXT.filter(lambda t: not t.lstrip().startswith("{"))


@SETTINGS
@given(texts=st.lists(PREDICTION, min_size=1, max_size=5), ending=ENDINGS, bom=st.booleans(),
       name=st.sampled_from(["p.txt", "p", "p.txt.gz"]))
def test_text_predictions_come_back_one_a_line(tmp_path, texts, ending, bom, name):
    if texts[-1] == "":
        texts = texts + ["x"]  # a final empty prediction is a trailing newline
    path = write(tmp_path / name, encode(texts, ending, bom=bom, final=True))
    fmt, rows = readers.read_predictions(path)
    assert fmt == "text" and [r.text for r in rows] == texts and {r.id for r in rows} == {None}


@SETTINGS
@given(texts=st.lists(LINE_TEXT, min_size=1, max_size=5), ids=st.booleans(), ending=ENDINGS, bom=st.booleans(),
       name=st.sampled_from(["p.jsonl", "p.json", "p.txt", "p.jsonl.gz", "p.json.gz", "p"]))
def test_json_lines_predictions_are_read_as_such_whatever_the_name(tmp_path, texts, ids, ending, bom, name):
    rows = [{"prediction": t, **({"id": i} if ids else {})} for i, t in enumerate(texts)]
    path = write(tmp_path / name, encode([json.dumps(r) for r in rows], ending, bom=bom, final=True))
    fmt, got = readers.read_predictions(path)
    assert fmt == "jsonl" and [r.text for r in got] == texts
    assert [r.id for r in got] == ([str(i) for i in range(len(texts))] if ids else [None] * len(texts))


@pytest.mark.parametrize("content, message", [
    (b'[{"prediction": "a"}, {"prediction": "b"}]', "holds one JSON list, not JSON lines"),
    (b'{\n "prediction": "a"\n}\n', "holds one JSON dict, not JSON lines"),
    (b"a sentence\n", "p.json:1: a .json predictions file must hold JSON lines"),
    (b"", "empty .json predictions file"),
])
def test_a_json_file_that_is_not_json_lines_is_refused(tmp_path, content, message):
    path = write(tmp_path / "p.json", content)
    with pytest.raises(InputFileError, match=message.replace("(", r"\(").replace(")", r"\)")):
        readers.read_predictions(path)


def test_ids_are_checked_under_either_name(tmp_path):
    path = write(tmp_path / "p.jsonl", b'{"prediction": "a", "example_id": 7}\n{"prediction": "b", "id": "8", '
                                       b'"example_id": 9}\n')
    with pytest.raises(InputFileError, match=r"p.jsonl:2: field 'example_id': '9' differs from 'id' '8'"):
        readers.read_predictions(path)


# ------------------------------------------------------------------------------------------ processed records


def processed(i: int, **changes) -> dict:
    rec = {"id": f"ex-{i}", "prompt": f"Describe\u2028 {i}\n", "completion": f"It is {i}.<eos>", "references": [f"{i}"],
           "table": [[{"value": str(i)}]], "highlighted_cells": [[0, 0]], "target": f"It is {i}."}
    rec.update(changes)
    return {k: v for k, v in rec.items() if v is not DELETE}


DELETE = object()


@SETTINGS
@given(n=st.integers(1, 5), ending=ENDINGS, bom=st.booleans(), limit=st.integers(0, 6))
def test_processed_records_come_back_equal(tmp_path, n, ending, bom, limit):
    rows = [processed(i) for i in range(n)]
    path = write(tmp_path / "train.jsonl", encode([json.dumps(r, ensure_ascii=False) for r in rows], ending, bom=bom,
                                                  final=True))
    assert readers.read_processed(path, limit) == rows[: limit or n]


@pytest.mark.parametrize("bad, message", [
    (processed(1, prompt=DELETE), "field 'prompt': missing (rerun the preprocess stage)"),
    (processed(1, prompt=""), "field 'prompt': expected a non-empty string, got str"),
    (processed(1, completion=3), "field 'completion': expected a non-empty string, got int"),
    (processed(1, references="x"), "field 'references': expected a list of strings, got str"),
    (processed(1, id=1), "field 'id': expected a non-empty string, got int"),
    (processed(0), "field 'id': duplicate id ex-0 (first on line 1)"),
    (processed(1, prompt="\ud800"), "field 'prompt': not valid Unicode"),
    ([1], "field '<record>': expected a JSON object, got list"),
])
def test_a_bad_processed_record_is_named(tmp_path, bad, message):
    path = write(tmp_path / "train.jsonl", (json.dumps(processed(0)) + "\n" + json.dumps(bad) + "\n").encode())
    with pytest.raises(InputFileError) as err:
        readers.read_processed(path)
    assert str(err.value).startswith(f"{path.as_posix()}:2: {message}"), err.value


def test_train_merge_and_evaluate_read_processed_records_one_way(tmp_path):
    """The train stage's reader (also merge's) and evaluate's are the library's one reader."""
    from table2text import evaluation
    from table2text.io import readers

    path = write(tmp_path / "validation.jsonl", (json.dumps(processed(0)) + "\n" + json.dumps(processed(1, prompt=""))
                                                  + "\n").encode())
    with pytest.raises(InputFileError) as from_train:
        readers.read_processed(path)
    with pytest.raises(evaluation.EvalError) as from_evaluate:
        evaluation.read_processed(path)
    assert str(from_train.value) == str(from_evaluate.value) == f"{path.as_posix()}:2: field 'prompt': expected a " \
                                                                 "non-empty string, got str"
    with pytest.raises(evaluation.EvalError, match="no such file \\(run the preprocess stage first\\)"):
        evaluation.read_processed(tmp_path / "missing.jsonl")


# ------------------------------------------------------------------------------------------ every reader alike


def test_every_reader_splits_a_file_the_same_way(tmp_path, capsys):
    """A ToTTo record with U+2028 in a cell, after a BOM and with CRLF endings, is one record on line 2
    for preprocess's reader, score's examples reader and infer --batch (which once split on U+2028)."""
    from stages import infer
    from stages import score
    from table2text.data.sources import read_totto_jsonl

    rec = {"example_id": 1, "table": [[{"value": "a\u2028b\x0cc", "is_header": False, "column_span": 1,
                                        "row_span": 1}]],
           "highlighted_cells": [[0, 0]], "table_page_title": "T", "table_section_title": "S",
           "sentence_annotations": [{"final_sentence": "a b c."}]}
    data = readers.BOM + b"\r\n" + json.dumps(rec, ensure_ascii=False).encode() + b"\r\n"
    path = write(tmp_path / "examples.jsonl", data)
    (example,) = read_totto_jsonl(path)
    assert example["line"] == 2 and example["table"][0][0]["value"] == "a\u2028b\x0cc"
    assert [e["line"] for e in score.read_examples(path)] == [2]

    class Args:
        batch, file = path, None

    ((where, from_infer),) = infer.read_inputs(Args)
    assert where == f"{path.as_posix()}:2" and from_infer["table"] == example["table"]


def test_one_line_leaves_no_line_break():
    text = "a\r\nb\rc\nd\u2028e\u2029f\x85g\x0bh"
    assert readers.one_line(text) == "a b c d e f g h" and len(readers.one_line(text).splitlines()) == 1
