"""`python -m stages.score`: scores prediction files; bad input gives a clear message and status 2."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stages.score import main

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TOTTO_SHARED_DATA", REPO.parent / "shared" / "data"))
FIXTURE = SHARED / "totto" / "eval_fixture"
EXAMPLES = FIXTURE / "dev_sample.jsonl.gz"
PREDICTIONS = FIXTURE / "output_sample.txt.gz"


@pytest.fixture(scope="module")
def fixture_files():
    if not (EXAMPLES.exists() and PREDICTIONS.exists()):
        pytest.skip(f"ToTTo eval fixture not found in {FIXTURE} (set TOTTO_SHARED_DATA)")
    with gzip.open(PREDICTIONS, "rt", encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    with gzip.open(EXAMPLES, "rt", encoding="utf-8") as f:
        ids = [str(json.loads(line)["example_id"]) for line in f]
    return lines, ids


def run_main(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_scores_the_official_sample(capsys, fixture_files):
    code, out, _ = run_main(capsys, "--predictions", PREDICTIONS, "--examples", EXAMPLES)
    assert code == 0
    scores = json.loads(out)
    assert set(scores) == {"overall", "overlap", "non_overlap"}
    for subset in scores.values():
        assert {"bleu", "parent_precision", "parent_recall", "parent_f"} <= set(subset)
    assert scores["overall"]["bleu"] == pytest.approx(45.5, abs=0.1)
    assert scores["overall"]["parent_f"] == pytest.approx(0.5334, abs=0.001)
    assert scores["non_overlap"]["bleu"] == pytest.approx(58.3, abs=0.1)


def test_jsonl_predictions_with_ids_give_the_same_scores(capsys, tmp_path, fixture_files):
    lines, ids = fixture_files
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps({"id": i, "prediction": p}) + "\n"
                            for i, p in zip(ids, lines)), encoding="utf-8")
    code, out, _ = run_main(capsys, "--predictions", path, "--examples", EXAMPLES)
    assert code == 0
    assert json.loads(out)["overall"]["parent_f"] == pytest.approx(0.5334, abs=0.001)


def test_jsonl_prediction_for_another_example_is_refused(capsys, tmp_path, fixture_files):
    lines, ids = fixture_files
    path = tmp_path / "predictions.jsonl"
    swapped = [ids[1], ids[0]] + ids[2:]
    path.write_text("".join(json.dumps({"id": i, "prediction": p}) + "\n"
                            for i, p in zip(swapped, lines)), encoding="utf-8")
    code, _, err = run_main(capsys, "--predictions", path, "--examples", EXAMPLES)
    assert code == 2
    assert f"{path}:1: field 'id'" in err


def test_wrong_number_of_predictions(capsys, tmp_path, fixture_files):
    path = tmp_path / "predictions.txt"
    path.write_text("one\ntwo\n", encoding="utf-8")
    code, _, err = run_main(capsys, "--predictions", path, "--examples", EXAMPLES)
    assert code == 2
    assert "has 2 predictions but" in err and "has 5 examples" in err


def test_missing_files(capsys, tmp_path, fixture_files):
    code, _, err = run_main(capsys, "--predictions", tmp_path / "nope.txt", "--examples", EXAMPLES)
    assert code == 2 and "nope.txt: predictions file not found" in err
    code, _, err = run_main(capsys, "--predictions", PREDICTIONS, "--examples", tmp_path / "no.jsonl")
    assert code == 2 and "no.jsonl: examples file not found" in err


def test_bad_json_names_file_and_line(capsys, tmp_path, fixture_files):
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text('{"prediction": "fine"}\n{"prediction": \n', encoding="utf-8")
    code, _, err = run_main(capsys, "--predictions", predictions, "--examples", EXAMPLES)
    assert code == 2 and f"{predictions}:2: invalid JSON" in err

    predictions.write_text('{"text": "no prediction field"}\n', encoding="utf-8")
    code, _, err = run_main(capsys, "--predictions", predictions, "--examples", EXAMPLES)
    assert code == 2 and f"{predictions}:1: field 'prediction'" in err

    examples = tmp_path / "examples.jsonl"
    examples.write_text("{not json\n", encoding="utf-8")
    code, _, err = run_main(capsys, "--predictions", PREDICTIONS, "--examples", examples)
    assert code == 2 and f"{examples}:1" in err


def test_command_line_error_has_no_traceback(tmp_path, fixture_files):
    path = tmp_path / "short.txt"
    path.write_text("only one\n", encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "stages.score", "--predictions", str(path), "--examples", str(EXAMPLES)],
        cwd=REPO, capture_output=True, text=True, timeout=120, encoding="utf-8")
    assert result.returncode == 2
    assert result.stderr.startswith("score: error: ")
    assert "Traceback" not in result.stderr


# ---- FeTaQA-format examples (the shape of ../shared/data/fetaqa), read directly by --examples

FETAQA = SHARED / "fetaqa"


def fetaqa_record(feta_id: int, answer: str) -> dict:
    return {"feta_id": feta_id, "table_source_json": "totto_source/dev_json/example-1.json",
            "page_wikipedia_url": "http://en.wikipedia.org/wiki/Example", "table_page_title": "Example page",
            "table_section_title": "Results", "table_array": [["Year", "Title"], ["2001", "Alpha"], ["2004", "Beta"]],
            "highlighted_cell_ids": [[1, 0], [1, 1]], "question": "What came out in 2001?", "answer": answer}


def write_fetaqa(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def test_fetaqa_examples_are_scored_directly(capsys, tmp_path):
    examples = write_fetaqa(tmp_path / "fetaqa.jsonl", [fetaqa_record(7, "Alpha came out in 2001."),
                                                         fetaqa_record(8, "Beta came out in 2004.")])
    perfect = tmp_path / "perfect.jsonl"
    perfect.write_text(json.dumps({"id": "7", "prediction": "Alpha came out in 2001."}) + "\n"
                       + json.dumps({"id": "8", "prediction": "Beta came out in 2004."}) + "\n", encoding="utf-8")
    code, out, _ = run_main(capsys, "--predictions", perfect, "--examples", examples)
    assert code == 0
    assert json.loads(out)["overall"]["count"] == 2
    assert json.loads(out)["overall"]["bleu"] == pytest.approx(100.0)
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("The table lists years.\nNothing here.\n", encoding="utf-8")
    code, out, _ = run_main(capsys, "--predictions", wrong, "--examples", examples, "--format", "fetaqa")
    assert code == 0 and json.loads(out)["overall"]["bleu"] < 20


def test_fetaqa_prediction_ids_are_checked_against_feta_id(capsys, tmp_path):
    examples = write_fetaqa(tmp_path / "fetaqa.jsonl", [fetaqa_record(7, "Alpha came out in 2001.")])
    predictions = tmp_path / "p.jsonl"
    predictions.write_text(json.dumps({"id": "8", "prediction": "Alpha."}) + "\n", encoding="utf-8")
    code, _, err = run_main(capsys, "--predictions", predictions, "--examples", examples)
    assert code == 2 and f"{predictions}:1: field 'id': '8' does not match example '7'" in err


@pytest.mark.parametrize("bad, field", [
    ({"answer": ""}, "answer"),
    ({"highlighted_cell_ids": [[9, 0]]}, "highlighted_cell_ids[0]"),
    ({"feta_id": "seven"}, "feta_id"),
    ({"table_array": [["Year"], [2001]]}, "table_array[1][0]"),
])
def test_bad_fetaqa_line_names_file_line_and_field(capsys, tmp_path, bad, field):
    examples = write_fetaqa(tmp_path / "fetaqa.jsonl", [fetaqa_record(7, "Alpha came out in 2001."),
                                                         {**fetaqa_record(8, "Beta."), **bad}])
    predictions = tmp_path / "p.txt"
    predictions.write_text("a\nb\n", encoding="utf-8")
    code, _, err = run_main(capsys, "--predictions", predictions, "--examples", examples)
    assert code == 2
    assert err.count("\n") == 1 and f"{examples.as_posix()}:2: field {field!r}" in err


def test_a_record_of_neither_format_is_named(capsys, tmp_path):
    examples = write_fetaqa(tmp_path / "other.jsonl", ["", {"id": 1, "text": "no table"}])
    predictions = tmp_path / "p.txt"
    predictions.write_text("a\n", encoding="utf-8")
    code, _, err = run_main(capsys, "--predictions", predictions, "--examples", examples)
    assert code == 2 and f"{examples.as_posix()}:2: field '<record>': neither a ToTTo record" in err
    code, _, err = run_main(capsys, "--predictions", predictions, "--examples", examples, "--format", "totto")
    assert code == 2 and f"{examples.as_posix()}:2: field 'example_id'" in err


@pytest.mark.parametrize("model, bleu, parent_f", [("t5-small", 30.48, 0.542), ("t5-base", 33.08, 0.583),
                                                   ("t5-large", 33.85, 0.596)])
def test_published_t5_predictions_score_as_the_peers_readme_says(capsys, model, bleu, parent_f):
    predictions, examples = FETAQA / "peers" / f"{model}-validation.txt", FETAQA / "validation.jsonl.gz"
    if not (predictions.exists() and examples.exists()):
        pytest.skip(f"FeTaQA peers not found in {FETAQA} (set TOTTO_SHARED_DATA)")
    code, out, _ = run_main(capsys, "--predictions", predictions, "--examples", examples)
    assert code == 0
    overall = json.loads(out)["overall"]
    assert overall["count"] == 500
    assert overall["bleu"] == pytest.approx(bleu, abs=0.005)
    assert overall["parent_f"] == pytest.approx(parent_f, abs=0.0005)
