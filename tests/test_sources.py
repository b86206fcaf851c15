"""table2text.data.sources: every data source read into the normalised example; bad records named or counted."""

from __future__ import annotations

import copy
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from table2text.data import sources
from table2text.data.sources import BadRecordError, LoadReport, load_split, read_fetaqa_jsonl, read_totto_jsonl

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TOTTO_SHARED_DATA", REPO.parent / "shared" / "data"))
TOTTO = SHARED / "totto"
FETAQA = SHARED / "fetaqa"
needs_totto = pytest.mark.skipif(not TOTTO.is_dir(), reason=f"shared ToTTo data not found at {TOTTO}")
needs_fetaqa = pytest.mark.skipif(not FETAQA.is_dir(), reason=f"shared FeTaQA data not found at {FETAQA}")

KEYS = {"id", "table", "highlighted_cells", "page_title", "section_title", "section_text", "references",
        "overlap", "question", "source_file", "line"}


def assert_normalised(example: dict) -> None:
    assert set(example) == KEYS
    assert isinstance(example["id"], str) and example["id"]
    for row in example["table"]:
        for cell in row:
            assert set(cell) == {"value", "is_header", "column_span", "row_span"}
    for r, c in example["highlighted_cells"]:
        assert 0 <= r < len(example["table"]) and 0 <= c < len(example["table"][r])
    assert all(isinstance(ref, str) and ref.strip() for ref in example["references"])
    assert example["overlap"] in (True, False, None)


# ---------------------------------------------------------------- real shared data: everything parses


@needs_totto
@pytest.mark.parametrize(
    "name, count, refs_per_example, overlap_true",
    [
        ("dev.jsonl.gz", 55, {2, 3}, 37),
        ("train.jsonl.gz", 8, {1}, 0),
        ("eval_fixture/dev_sample.jsonl.gz", 5, {3}, 3),
        ("prerelease_v0/dev_sample_v0.jsonl.gz", 5, {2, 3}, None),
        ("prerelease_v0/train_sample_v0.jsonl.gz", 5, None, 0),
    ],
)
def test_official_totto_files_parse(name, count, refs_per_example, overlap_true):
    report = LoadReport()
    examples = read_totto_jsonl(TOTTO / name, report=report)
    assert (report.read, report.kept, report.skipped) == (count, count, 0)
    for ex in examples:
        assert_normalised(ex)
    if refs_per_example:
        assert {len(ex["references"]) for ex in examples} <= refs_per_example
    if overlap_true is not None:
        assert sum(ex["overlap"] is True for ex in examples) == overlap_true
    assert [ex["line"] for ex in examples] == list(range(1, count + 1))


@needs_totto
def test_totto_ids_are_exact_big_ints_and_references_are_final_sentences():
    first = read_totto_jsonl(TOTTO / "dev.jsonl.gz")[0]
    assert first["id"] == "7391450717765563190"  # beyond float precision: kept exact
    assert first["page_title"] == "List of Governors of South Carolina"
    assert first["highlighted_cells"] == [[3, 0], [3, 2], [3, 3]]
    assert first["overlap"] is True and first["question"] is None
    assert first["references"] == [
        "Daniel Henry Chamberlain was the 76th Governor of South Carolina from 1874.",
        "Daniel Henry Chamberlain was the 76th Governor of South Carolina, beginning in 1874.",
        "Daniel Henry Chamberlain was the 76th Governor of South Carolina who took office in 1874.",
    ]
    assert first["source_file"].endswith("totto/dev.jsonl.gz")
    negative = [ex["id"] for ex in read_totto_jsonl(TOTTO / "dev.jsonl.gz") if ex["id"].startswith("-")]
    assert negative and all(int(i) < 0 for i in negative)


@needs_totto
def test_unlabeled_test_split_parses_only_when_references_are_not_required():
    examples = read_totto_jsonl(TOTTO / "test_unlabeled.jsonl.gz", require_references=False)
    assert len(examples) == 5 and all(ex["references"] == [] for ex in examples)
    assert sum(ex["overlap"] is True for ex in examples) == 4
    with pytest.raises(BadRecordError) as err:
        read_totto_jsonl(TOTTO / "test_unlabeled.jsonl.gz")
    assert (err.value.line, err.value.field, err.value.reason) == (1, "sentence_annotations", "missing_field")


@needs_totto
def test_totto_source_finds_split_files_in_a_folder():
    data = {"source": "totto", "path": str(TOTTO)}
    assert len(load_split(data, "train")) == 8
    assert len(load_split(data, "validation")) == 55


def test_totto_source_accepts_official_file_names_and_explicit_files(tmp_path):
    lines = (REPO / "data/demo/train.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (tmp_path / "totto_train_data.jsonl").write_text("".join(lines[:3]), encoding="utf-8")
    with gzip.open(tmp_path / "totto_dev_data.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.write("".join(lines[3:5]))
    data = {"source": "totto", "path": str(tmp_path)}
    assert len(load_split(data, "train")) == 3
    assert len(load_split(data, "validation")) == 2
    data["validation_file"] = str(tmp_path / "totto_train_data.jsonl")
    assert len(load_split(data, "validation")) == 3
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no train file"):
        load_split({"source": "totto", "path": str(tmp_path / "empty")}, "train")


# ---------------------------------------------------------------- GEM schema through `datasets`


@needs_totto
def test_gem_files_are_mapped_through_the_datasets_json_builder():
    data = {"source": "hf:GEM/totto",
            "validation_file": str(TOTTO / "gem_format/validation_totto_RandomSample500.json.gz")}
    report = LoadReport()
    examples = load_split(data, "validation", report)
    assert report.as_dict()["kept"] == 2
    for ex in examples:
        assert_normalised(ex)
    first = examples[0]
    assert first["id"] == "-5258684803225798753"  # GEM's example_id string is the ToTTo id
    assert first["overlap"] is False  # GEM writes "False"
    assert first["page_title"] == "Dança dos Famosos (season 12)"
    assert len(first["references"]) == 3 and first["references"][0].startswith("On December 6, actress")
    assert first["table"][0][0] == {"value": "Celebrity", "is_header": True, "column_span": 1, "row_span": 1}
    assert first["line"] == 1


@needs_totto
def test_gem_train_file_repeats_one_example_the_duplicate_is_named_or_counted():
    data = {"source": "hf:GEM/totto", "train_file": str(TOTTO / "gem_format/train_totto_RandomSample500.json.gz")}
    with pytest.raises(BadRecordError) as err:
        load_split(data, "train")
    assert (err.value.line, err.value.field, err.value.reason) == (2, "id", "duplicate_id")
    report = LoadReport()
    examples = load_split(data | {"on_bad_record": "skip"}, "train", report)
    assert report.as_dict() == {"read": 2, "kept": 1, "skipped": 1, "skipped_by_reason": {"duplicate_id": 1},
                                     "sampled_out": 0}
    # GEM train has no "references": the annotations' final sentences stand in, overlap "none" -> None.
    assert examples[0]["references"] == [
        "In 2004 Republican Convention, George W. Bush was a nominee at New York City Convention."]
    assert examples[0]["overlap"] is None


def test_unreadable_gem_file_is_a_clear_error(tmp_path):
    path = tmp_path / "gem.json"
    path.write_bytes(b'[{"example_id": "1", "table": [\xff')
    with pytest.raises(BadRecordError, match="json builder cannot read it") as err:
        load_split({"source": "hf:GEM/totto", "train_file": str(path)}, "train")
    assert (err.value.file, err.value.field, err.value.reason) == (path.as_posix(), "<file>", "corrupt_file")


def test_gem_mapping_accepts_the_column_layout_that_datasets_may_return():
    record = {
        "example_id": "42", "overlap_subset": "True", "references": [],
        "table": [[{"value": "A", "is_header": True, "column_span": 1, "row_span": 1}]],
        "highlighted_cells": [[0, 0]], "table_page_title": "P", "table_section_title": "S",
        "table_section_text": "",
        # a Sequence of dicts comes back from `datasets` as a dict of lists
        "sentence_annotations": {"final_sentence": ["One.", "Two."], "original_sentence": ["x", "y"]},
    }
    example = sources._from_gem(record)
    assert (example["id"], example["overlap"], example["references"]) == ("42", True, ["One.", "Two."])


def test_hub_dataset_offline_gives_a_clear_error(tmp_path):
    # A fresh interpreter with the hub switched off: what a user without network sees.
    code = (
        "from table2text.data.sources import load_split\n"
        "try:\n    load_split({'source': 'hf:GEM/totto'}, 'validation')\n"
        "except RuntimeError as e:\n    print('ERR', e)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120, encoding="utf-8")
    assert "ERR data.source=hf:GEM/totto: could not load split 'validation'" in out.stdout, out.stderr[-2000:]
    assert "data.validation_file" in out.stdout


# ---------------------------------------------------------------- FeTaQA


@needs_fetaqa
def test_fetaqa_files_parse_header_row_and_answer():
    data = {"source": "fetaqa", "path": str(FETAQA)}
    report = LoadReport()
    train = load_split(data, "train", report)
    validation = load_split(data, "validation", report)
    assert (len(train), len(validation), report.skipped) == (2004, 500, 0)
    ex = validation[0]
    assert_normalised(ex)
    assert ex["id"] == "21349" and ex["page_title"] == "Roentgenium"
    assert [c["is_header"] for c in ex["table"][0]] == [True] * 7
    assert not any(c["is_header"] for row in ex["table"][1:] for c in row)
    assert {(c["column_span"], c["row_span"]) for row in ex["table"] for c in row} == {(1, 1)}
    assert ex["highlighted_cells"] == [[9, 0], [9, 1], [10, 0], [10, 1]]
    assert ex["question"].startswith("What are the most recently published half-life")
    assert ex["references"] == ["The ²⁸⁶Rg has a half-life of about 10.7 minutes and the ²⁸³Rg has a half-life "
                                "of about 5.1 minutes."]
    assert ex["overlap"] is None


# ---------------------------------------------------------------- the embedded demo set


def test_demo_set_is_valid():
    report = LoadReport()
    train = load_split({"source": "demo"}, "train", report)
    dev = load_split({"source": "demo"}, "validation", report)
    assert report.skipped == 0
    assert len(train) + len(dev) >= 40 and len(train) >= 30 and len(dev) >= 12
    ids = [ex["id"] for ex in train + dev]
    assert len(set(ids)) == len(ids) and all(int(i) for i in ids)
    for ex in train + dev:
        assert_normalised(ex)
        assert ex["page_title"] and ex["section_title"]
    assert all(len(ex["references"]) == 1 for ex in train)
    assert all(2 <= len(ex["references"]) <= 3 for ex in dev)
    assert all(ex["overlap"] is None for ex in train)
    assert {ex["overlap"] for ex in dev} == {True, False}
    cells = [c for ex in train + dev for row in ex["table"] for c in row]
    assert any(c["row_span"] > 1 for c in cells) and any(c["column_span"] > 1 for c in cells)
    # row headers: header cells that are not in the table's first row
    assert any(c["is_header"] for ex in train for row in ex["table"][1:] for c in row[:1])


def test_demo_dev_tables_marked_non_overlap_never_appear_in_train():
    train = load_split({"source": "demo"}, "train")
    dev = load_split({"source": "demo"}, "validation")
    train_tables = {json.dumps(ex["table"]) for ex in train}
    for ex in dev:
        assert (json.dumps(ex["table"]) in train_tables) == ex["overlap"], ex["id"]


# ---------------------------------------------------------------- subsampling


def test_subsampling_is_seeded_deterministic_and_keeps_file_order():
    data = {"source": "demo", "train_samples": 10, "seed": 7}
    report = LoadReport()
    first = [ex["line"] for ex in load_split(data, "train", report)]
    assert first == [ex["line"] for ex in load_split(data, "train")]
    assert len(first) == 10 and first == sorted(first)
    assert report.sampled_out == 20 and report.kept == 30
    other = [ex["line"] for ex in load_split(data | {"seed": 8}, "train")]
    assert other != first
    assert len(load_split(data | {"train_samples": 0}, "train")) == 30
    assert len(load_split({"source": "demo", "validation_samples": 4}, "validation")) == 4


# ---------------------------------------------------------------- bad records

GOOD = {
    "table": [
        [{"value": "Year", "is_header": True, "column_span": 1, "row_span": 1},
         {"value": "Host", "is_header": True, "column_span": 1, "row_span": 1}],
        [{"value": "2012", "is_header": False, "column_span": 1, "row_span": 1},
         {"value": "London", "is_header": False, "column_span": 1, "row_span": 1}],
    ],
    "table_page_title": "Olympics", "table_section_title": "Hosts", "table_section_text": "",
    "highlighted_cells": [[1, 0], [1, 1]], "example_id": 1,
    "sentence_annotations": [{"final_sentence": "London hosted in 2012."}],
}


def _bad(change):
    rec = copy.deepcopy(GOOD)
    rec["example_id"] = 2
    change(rec)
    return json.dumps(rec).encode()


BAD_TOTTO = {
    "invalid json": (b'{"table": [[', "<line>", "invalid_json"),
    "truncated line": (json.dumps(GOOD).encode()[:-20], "<line>", "invalid_json"),
    "not utf-8": (b'{"table_page_title": "\xff\xfe"}', "<line>", "not_utf8"),
    "not an object": (b"[1, 2]", "<record>", "wrong_type"),
    "missing table": (_bad(lambda r: r.pop("table")), "table", "missing_field"),
    "missing page title": (_bad(lambda r: r.pop("table_page_title")), "table_page_title", "missing_field"),
    "id is text": (_bad(lambda r: r.update(example_id="x")), "example_id", "wrong_type"),
    "id is bool": (_bad(lambda r: r.update(example_id=True)), "example_id", "wrong_type"),
    "table is text": (_bad(lambda r: r.update(table="Year Host")), "table", "wrong_type"),
    "is_header text": (_bad(lambda r: r["table"][1][0].update(is_header="no")), "table[1][0].is_header", "wrong_type"),
    "value missing": (_bad(lambda r: r["table"][0][1].pop("value")), "table[0][1].value", "missing_field"),
    "value number": (_bad(lambda r: r["table"][0][1].update(value=3)), "table[0][1].value", "wrong_type"),
    "zero span": (_bad(lambda r: r["table"][1][1].update(column_span=0)), "table[1][1].column_span", "bad_span"),
    "negative span": (_bad(lambda r: r["table"][1][1].update(row_span=-2)), "table[1][1].row_span", "bad_span"),
    "huge span": (_bad(lambda r: r["table"][1][1].update(column_span=10**9)), "table[1][1].column_span", "bad_span"),
    "empty table": (_bad(lambda r: r.update(table=[])), "table", "empty_table"),
    "table of empty rows": (_bad(lambda r: r.update(table=[[], []])), "table", "empty_table"),
    "row out of range": (_bad(lambda r: r.update(highlighted_cells=[[1, 0], [2, 0]])), "highlighted_cells[1]",
                         "highlight_out_of_range"),
    "column beyond row": (_bad(lambda r: r.update(highlighted_cells=[[1, 2]])), "highlighted_cells[0]",
                          "highlight_out_of_range"),
    "negative index": (_bad(lambda r: r.update(highlighted_cells=[[-1, 0]])), "highlighted_cells[0]",
                       "highlight_out_of_range"),
    "cell not a pair": (_bad(lambda r: r.update(highlighted_cells=[[1]])), "highlighted_cells[0]", "wrong_type"),
    "no highlighted cells": (_bad(lambda r: r.update(highlighted_cells=[])), "highlighted_cells",
                             "no_highlighted_cells"),
    "empty reference": (_bad(lambda r: r.update(sentence_annotations=[{"final_sentence": "  "}])),
                        "sentence_annotations.final_sentence[0]", "empty_reference"),
    "no annotations": (_bad(lambda r: r.update(sentence_annotations=[])), "sentence_annotations", "empty_reference"),
    "missing final sentence": (_bad(lambda r: r.update(sentence_annotations=[{"original_sentence": "x"}])),
                               "sentence_annotations[0].final_sentence", "missing_field"),
    "overlap text": (_bad(lambda r: r.update(overlap_subset="yes")), "overlap_subset", "wrong_type"),
    "duplicate id": (json.dumps(GOOD).encode(), "id", "duplicate_id"),
}


@pytest.mark.parametrize("case", sorted(BAD_TOTTO))
def test_bad_totto_record_names_file_line_and_field_or_is_counted(tmp_path, case):
    line, field, reason = BAD_TOTTO[case]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n\n" + line + b"\n")  # the blank line is not a record
    with pytest.raises(BadRecordError) as err:
        read_totto_jsonl(path)
    assert (err.value.file, err.value.line, err.value.field, err.value.reason) == (path.as_posix(), 3, field, reason)
    assert f"{path.as_posix()}:3: field {field!r}" in str(err.value)

    report = LoadReport()
    kept = read_totto_jsonl(path, "skip", report)
    assert [ex["id"] for ex in kept] == ["1"]
    assert report.as_dict() == {"read": 2, "kept": 1, "skipped": 1, "skipped_by_reason": {reason: 1},
                                "sampled_out": 0}


def test_skip_mode_counts_every_reason_through_load_split(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join([json.dumps(GOOD).encode(), BAD_TOTTO["invalid json"][0],
                                 BAD_TOTTO["empty table"][0], BAD_TOTTO["not utf-8"][0],
                                 BAD_TOTTO["row out of range"][0], BAD_TOTTO["invalid json"][0]]))
    report = LoadReport()
    examples = load_split({"source": "totto", "train_file": str(path), "on_bad_record": "skip"}, "train", report)
    assert len(examples) == 1
    assert report.as_dict()["skipped_by_reason"] == {"empty_table": 1, "highlight_out_of_range": 1,
                                                      "invalid_json": 2, "not_utf8": 1}
    assert report.read == 6 and report.kept + report.skipped == report.read


def test_truncated_gzip_file_is_an_error_even_when_skipping(tmp_path):
    data = gzip.compress((json.dumps(GOOD) + "\n").encode() * 50)
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadRecordError, match="cannot read file") as err:
        read_totto_jsonl(path, "skip")
    assert err.value.reason == "corrupt_file" and err.value.field == "<file>"


BAD_FETAQA = {
    "empty answer": (lambda r: r.update(answer=" "), "answer", "empty_reference"),
    "missing question": (lambda r: r.pop("question"), "question", "missing_field"),
    "cell not text": (lambda r: r["table_array"][1].__setitem__(0, 5), "table_array[1][0]", "wrong_type"),
    "out of range": (lambda r: r.update(highlighted_cell_ids=[[0, 9]]), "highlighted_cell_ids[0]",
                     "highlight_out_of_range"),
    "empty table": (lambda r: r.update(table_array=[]), "table_array", "empty_table"),
}


@pytest.mark.parametrize("case", sorted(BAD_FETAQA))
def test_bad_fetaqa_record(tmp_path, case):
    change, field, reason = BAD_FETAQA[case]
    rec = {"feta_id": 1, "table_page_title": "P", "table_section_title": "S",
           "table_array": [["Year", "Host"], ["2012", "London"]], "highlighted_cell_ids": [[1, 1]],
           "question": "Who hosted in 2012?", "answer": "London hosted in 2012."}
    change(rec)
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(rec) + "\n", encoding="utf-8")
    with pytest.raises(BadRecordError) as err:
        read_fetaqa_jsonl(path)
    assert (err.value.line, err.value.field, err.value.reason) == (1, field, reason)
    report = LoadReport()
    assert read_fetaqa_jsonl(path, "skip", report) == [] and report.skipped_by_reason == {reason: 1}


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="data.source='csv'"):
        load_split({"source": "csv"}, "train")
    with pytest.raises(ValueError, match="on_bad_record"):
        load_split({"source": "demo", "on_bad_record": "ignore"}, "train")
    with pytest.raises(ValueError, match="split must be"):
        load_split({"source": "demo"}, "test")
    with pytest.raises(FileNotFoundError, match="data.train_file='nowhere.jsonl'"):
        load_split({"source": "totto", "train_file": "nowhere.jsonl"}, "train")
