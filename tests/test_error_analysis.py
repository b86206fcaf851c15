"""`python -m stages.error_analysis`: failure labels by simple heuristics, the worst examples by PARENT F,
and two reports, the committed one without any text of the dataset. All data here is made up."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stages import error_analysis as ea
from table2text.data.linearize import linearize
from table2text.data.prompts import INSTRUCTION
from table2text.metrics import error_analysis

REPO = Path(__file__).resolve().parents[1]


def cell(value: str, header: bool = False) -> dict:
    return {"value": value, "is_header": header, "column_span": 1, "row_span": 1}


# A made-up table: a swimmer's results, the 2021 row highlighted.
EXAMPLE = {
    "page_title": "Ana Lind",
    "section_title": "Results",
    "table": [
        [cell("Year", True), cell("Meet", True), cell("Time", True), cell("Fans", True)],
        [cell("2019"), cell("Nordic Open"), cell("55.30"), cell("1,234")],
        [cell("2021"), cell("Baltic Cup"), cell("54.87"), cell("2,500")],
    ],
    "highlighted_cells": [[2, 0], [2, 1], [2, 2]],
}


def prompt(mode: str = "subtable") -> str:
    return f"{INSTRUCTION}\n\n{linearize(EXAMPLE, mode)}\n\nSentence:\n"


def row(example_id="1", prediction="Ana Lind swam 54.87 at the 2021 Baltic Cup.", f=0.5, *,
        references=("Ana Lind won the 2021 Baltic Cup in 54.87.",), mode="subtable") -> dict:
    return {"id": example_id, "prompt": prompt(mode), "prediction": prediction, "references": list(references),
            "overlap": None, "parent": {"parent_precision": f, "parent_recall": f, "parent_f": f},
            "num_highlighted": 3, "table_cells": 12}


def labels(r: dict) -> list[str]:
    return error_analysis.analyse(r)["labels"]


# --- the linearisations ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["subtable", "full_table"])
def test_the_highlighted_cells_are_read_from_either_linearisation(mode):
    # subtable writes only the highlighted cells, as <cell>; full_table writes them all and marks the
    # highlighted ones <highlighted_cell>: the tags of table2text.data.linearize are the module's constants.
    assert error_analysis.highlighted_values(prompt(mode)) == ["2021", "Baltic Cup", "54.87"]
    assert f"<{error_analysis.HIGHLIGHTED_TAG if mode == 'full_table' else error_analysis.CELL_TAG}>" in prompt(mode)


def test_a_good_prediction_gets_no_label():
    assert labels(row()) == []
    assert labels(row(mode="full_table")) == []


# --- hallucinated number -----------------------------------------------------------------------------


def test_a_number_that_is_not_in_the_prompt_is_hallucinated():
    r = row(prediction="Ana Lind swam 54.87 at the 2021 Baltic Cup, 3 seconds ahead.")
    assert error_analysis.analyse(r)["hallucinated_number"] == ["3"]
    assert labels(r) == ["hallucinated_number"]


def test_a_number_of_a_cell_that_is_not_highlighted_is_in_the_prompt_of_the_full_table():
    prediction = "Ana Lind swam 55.30 and 54.87 at the 2021 Baltic Cup."
    assert error_analysis.analyse(row(prediction=prediction))["hallucinated_number"] == ["55.30"]
    assert error_analysis.analyse(row(prediction=prediction, mode="full_table"))["hallucinated_number"] == []


@pytest.mark.parametrize("prediction", [
    "Ana Lind had 1234 fans in 2019.",   # the table writes 1,234
    "Ana Lind had 1,234 fans in 2019.",
    "Ana Lind had 2,500 fans.",
    "Ana Lind swam 55.3 in 2019.",       # trailing decimal zero
    "Ana Lind's 2021 season.",
])
def test_thousands_separators_and_trailing_zeros_do_not_make_a_number_new(prediction):
    assert error_analysis.analyse(row(prediction=prediction, mode="full_table"))["hallucinated_number"] == []


def test_decimals_are_kept():
    assert error_analysis.hallucinated_numbers("She swam 54.9.", prompt()) == ["54.9"]
    assert error_analysis.hallucinated_numbers("She swam 54 seconds.", prompt()) == ["54"]


def test_year_ranges_and_decades_of_the_prompt_support_their_years():
    table = "<table> <cell> 1989–90 <col_header> Season </col_header> </cell> <cell> 1999–00 </cell> </table>"
    assert error_analysis.hallucinated_numbers("From 1989 to 1990 and in 2000, in the 1980s.", table) == []
    assert error_analysis.hallucinated_numbers("In the 1970s and 1991.", table) == ["1970", "1991"]


# --- missing highlighted cell ------------------------------------------------------------------------


def test_a_cell_that_a_reference_mentions_and_the_prediction_does_not_is_missing():
    r = row(prediction="Ana Lind won the 2021 Baltic Cup.")
    assert error_analysis.analyse(r)["missing_cell"] == ["54.87"]
    assert labels(r) == ["missing_cell"]


def test_a_cell_that_no_reference_mentions_is_not_missing():
    r = row(prediction="Ana Lind won the 2021 Baltic Cup.", references=["Ana Lind won the 2021 Baltic Cup."])
    assert labels(r) == []


def test_half_the_words_of_a_cell_mention_it_and_case_and_accents_do_not_matter():
    assert error_analysis.missing_cells(["Baltic Cup"], "She won the cup.", ["She won the Baltic Cup."]) == []
    assert error_analysis.missing_cells(["Café Olé Trophy"], "the CAFE trophy", ["the Café Olé Trophy"]) == []
    assert error_analysis.missing_cells(["Café Olé Trophy"], "the trophy", ["the Café Olé Trophy"]) == ["Café Olé Trophy"]
    assert error_analysis.missing_cells(["-", "The"], "", ["- The"]) == []  # no content word: never missing


# --- unsupported entity ------------------------------------------------------------------------------


def test_a_name_in_neither_prompt_nor_references_is_unsupported():
    r = row(prediction="Ana Lind won the 2021 Baltic Cup in 54.87 in Tokyo.")
    assert error_analysis.analyse(r)["unsupported_entity"] == ["Tokyo"]
    assert labels(r) == ["unsupported_entity"]
    r = row(prediction="Ana Lind won the 2021 Baltic Cup in 54.87 for New Zealand.")
    assert error_analysis.analyse(r)["unsupported_entity"] == ["New Zealand"]


def test_sentence_initial_stop_words_and_names_of_the_references_are_not_entities():
    r = row(prediction="In 2021, Ana Lind won the Baltic Cup in 54.87. The Swede won it.",
            references=["The Swede Ana Lind won the 2021 Baltic Cup in 54.87."])
    assert labels(r) == []


def test_a_demonym_matches_its_country_by_prefix_but_a_mere_shared_start_does_not():
    source = ["Ukraine and Canada"]
    assert error_analysis.unsupported_entities("A Ukrainian and a Canadian.", "", source) == []
    assert error_analysis.unsupported_entities("Stockholm", "", ["Stockbauer"]) == ["Stockholm"]


def test_a_name_is_a_run_of_capitalised_words_joined_by_of_or_de():
    assert error_analysis.names("In 2016 the Bank of America moved to Rio de Janeiro, Brazil's capital.") == [
        "Bank of America", "Rio de Janeiro", "Brazil"]


# --- empty prediction --------------------------------------------------------------------------------


def test_an_empty_prediction():
    assert labels(row(prediction="  ")) == ["missing_cell", "empty"]
    assert labels(row(prediction="  ", references=["Nothing to see."])) == ["empty"]


# --- ranking and reports -----------------------------------------------------------------------------


def test_the_worst_are_the_lowest_parent_f_ties_by_id():
    rows = [row("10", f=0.2), row("9", f=0.2), row("3", f=0.9), row("abc", f=0.2), row("7", f=0.1)]
    assert [r["id"] for r in error_analysis.worst_examples(rows, 4)] == ["7", "9", "10", "abc"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text, encoding="utf-8")
    return path


REFERENCE = "Ana Lind won the 2021 Baltic Cup in 54.87."
ROWS = [
    row("1", "Ana Lind took the 2021 Baltic Cup in 54.87.", 0.9),
    row("2", "Ana Lind won the 2022 Baltic Cup in Tokyo.", 0.1),
    row("3", "", 0.0),
    row("4", "Ana Lind won the 2021 Baltic Cup.", 0.6),
]


def run_cli(tmp_path, capsys, rows=ROWS, *extra, name="predictions.jsonl.gz"):
    out, full = tmp_path / "docs" / "ERRORS.md", tmp_path / "metrics" / "errors-full.md"
    code = ea.main(["--predictions", str(write_jsonl(tmp_path / name, rows)), "--worst", "2",
                    "--out", str(out), "--full", str(full), "--title", "Errors of a made-up run", *extra])
    captured = capsys.readouterr()
    return code, out, full, captured


def test_the_committed_report_has_counts_and_predictions_but_no_dataset_text(tmp_path, capsys):
    code, out, full, captured = run_cli(tmp_path, capsys)
    assert code == 0
    report = out.read_text(encoding="utf-8")
    assert report.startswith("# Errors of a made-up run\n")
    assert "python -m stages.error_analysis --predictions" in report  # the command that wrote it
    assert "| hallucinated number | 1 (25.0%) | 1 (50.0%) |" in report
    assert "| empty prediction | 1 (25.0%) | 1 (50.0%) |" in report
    assert "| no label | 1 (25.0%) | 0 (0.0%) |" in report
    worst = report[report.index("## The 2 worst"):]
    assert worst.index("id 3:") < worst.index("id 2:") and "id 4:" not in worst
    assert "Ana Lind won the 2022 Baltic Cup in Tokyo." in worst  # the prediction
    assert "hallucinated numbers: 2022" in worst and "unsupported entities: Tokyo" in worst
    assert "missing highlighted cells: 3\n" in worst  # a count only: cell values are dataset text
    for text in (REFERENCE, "<table>", "<page_title>", "Nordic Open", INSTRUCTION, "Baltic Cup;"):
        assert text not in report
    assert "errors-full.md" in report and "no text of the dataset" in report
    assert "hallucinated number" in captured.out


def test_the_full_report_adds_inputs_references_and_missing_cells(tmp_path, capsys):
    _, out, full, _ = run_cli(tmp_path, capsys)
    report = full.read_text(encoding="utf-8")
    assert REFERENCE in report and linearize(EXAMPLE, "subtable") in report
    assert "missing highlighted cells: 3: 2021; Baltic Cup; 54.87" in report
    assert "never commit it" in report


def test_hand_written_notes_survive_a_rewrite(tmp_path, capsys):
    _, out, _, _ = run_cli(tmp_path, capsys)
    text = out.read_text(encoding="utf-8")
    out.write_text(text.replace("<!-- notes -->\n", "<!-- notes -->\n## What the counts say\n\nMostly fine.\n"), encoding="utf-8")
    run_cli(tmp_path, capsys)
    assert "<!-- notes -->\n## What the counts say\n\nMostly fine.\n<!-- /notes -->" in out.read_text(encoding="utf-8")


def test_a_plain_jsonl_file_is_read_too(tmp_path, capsys):
    code, out, _, _ = run_cli(tmp_path, capsys, name="predictions.jsonl")
    assert code == 0 and out.is_file()


# --- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("line, message", [
    ("{not json", "predictions.jsonl:2: field '<line>': invalid JSON"),
    (json.dumps({k: v for k, v in ROWS[1].items() if k != "prediction"}), ":2: field 'prediction': missing"),
    (json.dumps({**ROWS[1], "references": "one"}), ":2: field 'references': expected a non-empty list"),
    (json.dumps({**ROWS[1], "parent": {"parent_precision": 1, "parent_recall": 1, "parent_f": "x"}}),
     ":2: field 'parent.parent_f': expected a number"),
    (json.dumps({**ROWS[1], "id": "1"}), ":2: field 'id': duplicate id 1 (first on line 1)"),
    ("[1, 2]", ":2: field '<record>': expected a JSON object"),
])
def test_a_bad_line_exits_2_naming_file_line_and_field(tmp_path, capsys, line, message):
    path = tmp_path / "predictions.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + line + "\n", encoding="utf-8")
    out = tmp_path / "ERRORS.md"
    assert ea.main(["--predictions", str(path), "--out", str(out), "--full", str(tmp_path / "full.md")]) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err and "Traceback" not in err
    assert not out.exists()


def test_a_missing_file_and_an_empty_file_exit_2(tmp_path, capsys):
    args = ["--out", str(tmp_path / "a.md"), "--full", str(tmp_path / "b.md")]
    assert ea.main(["--predictions", str(tmp_path / "nope.jsonl"), *args]) == 2
    assert "nope.jsonl: no such file" in capsys.readouterr().err
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    assert ea.main(["--predictions", str(tmp_path / "empty.jsonl"), *args]) == 2
    assert "no predictions" in capsys.readouterr().err


def test_the_full_report_cannot_overwrite_the_committed_one(tmp_path, capsys):
    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    same = str(tmp_path / "ERRORS.md")
    assert ea.main(["--predictions", str(path), "--out", same, "--full", same]) == 2
    assert "--out and --full" in capsys.readouterr().err


def test_the_command_line_prints_no_traceback(tmp_path):
    path = tmp_path / "predictions.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n{\n", encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "stages.error_analysis", "--predictions", str(path),
                             "--out", str(tmp_path / "a.md"), "--full", str(tmp_path / "b.md")],
                            cwd=REPO, capture_output=True, text=True, timeout=60, encoding="utf-8")
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error_analysis: error: {path}:2: field '<line>': invalid JSON (")


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_a_full_report_that_git_would_commit_gets_a_warning(tmp_path, capsys, monkeypatch):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    monkeypatch.chdir(tmp_path)
    _, _, full, captured = run_cli(tmp_path, capsys)
    assert "holds dataset text but git does not ignore it" in captured.err
    (tmp_path / ".gitignore").write_text("/metrics/errors-full.md\n", encoding="utf-8")
    _, _, _, captured = run_cli(tmp_path, capsys)
    assert "warning" not in captured.err
