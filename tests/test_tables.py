"""ToTTo table heuristics, checked by hand on real dev examples (spans included)."""

import gzip
import json
import os
from pathlib import Path

import pytest

from table2text.data.tables import (
    adjusted_col_offsets,
    cell_headers,
    col_headers,
    highlighted_subtable,
    parent_precision_table,
    parent_recall_table,
    row_headers,
    table_with_headers,
)

SHARED = Path(os.environ.get("TOTTO_SHARED_DATA",
                             Path(__file__).resolve().parents[1].parent / "shared" / "data"))
DEV = SHARED / "totto" / "dev.jsonl.gz"


def cell(value, header=False, colspan=1, rowspan=1):
    return {"value": value, "is_header": header, "column_span": colspan, "row_span": rowspan}


def values(cells):
    return [c["value"] for c in cells]


@pytest.fixture(scope="module")
def dev_lines():
    if not DEV.exists():
        pytest.skip(f"ToTTo dev data not found at {DEV} (set TOTTO_SHARED_DATA)")
    with gzip.open(DEV, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# A small table: "Name" spans two columns, "2001" is a row header.
SMALL = [
    [cell("Year", True), cell("Name", True, colspan=2), cell("Score", True)],
    [cell("2001", True), cell("Ann"), cell("Lee"), cell("7")],
    [cell("Total", colspan=3), cell("7")],
]


def test_adjusted_offsets_follow_column_spans():
    assert adjusted_col_offsets(SMALL) == [
        [(0, 1), (1, 3), (3, 4)],
        [(0, 1), (1, 2), (2, 3), (3, 4)],
        [(0, 3), (3, 4)],
    ]


def test_headers_on_a_small_spanning_table():
    # "Lee" sits under the spanning "Name"; its row header is "2001".
    assert values(row_headers(SMALL, 1, 2)) == ["2001"]
    assert values(col_headers(SMALL, 1, 2)) == ["Name"]
    # The last "7" is at raw column 1 of row 2 but adjusted column 3: "Score".
    assert values(col_headers(SMALL, 2, 1)) == ["Score"]
    # "Total" spans columns 0-2, so it overlaps three header cells above,
    # including the row header "2001" (the heuristic takes any header above).
    assert values(col_headers(SMALL, 2, 0)) == ["Year", "Name", "2001"]
    # A non-header cell to the left is not a row header.
    assert row_headers(SMALL, 2, 1) == []


def test_highlighted_subtable_keeps_order_and_indices():
    sub = highlighted_subtable(SMALL, [[2, 1], [1, 1]])
    assert [(e["row_index"], e["col_index"]) for e in sub] == [(2, 1), (1, 1)]
    assert sub[0]["cell"] is SMALL[2][1]
    assert values(sub[1]["row_headers"]) == ["2001"]
    assert values(sub[1]["col_headers"]) == ["Name"]


def test_out_of_range_or_negative_cells_are_rejected():
    with pytest.raises(IndexError, match=r"cell \[5, 0\]"):
        highlighted_subtable(SMALL, [[5, 0]])
    with pytest.raises(IndexError, match=r"cell \[2, 2\]"):
        highlighted_subtable(SMALL, [[2, 2]])
    with pytest.raises(IndexError, match=r"cell \[-1, 0\]"):
        cell_headers(SMALL, -1, 0)


def test_table_with_headers_has_the_table_shape():
    full = table_with_headers(SMALL)
    assert [len(r) for r in full] == [3, 4, 2]
    assert values(full[1][3]["col_headers"]) == ["Score"]
    assert values(full[1][3]["row_headers"]) == ["2001"]


def test_governors_dev_line_1(dev_lines):
    # "Governor" spans two columns (the "-" image column and the name column);
    # the "#" column holds header cells, which are headers of later rows too.
    ex = dev_lines[0]
    assert ex["table_page_title"] == "List of Governors of South Carolina"
    sub = highlighted_subtable(ex["table"], ex["highlighted_cells"])
    got = [(e["cell"]["value"], values(e["row_headers"]), values(e["col_headers"])) for e in sub]
    assert got == [
        ("76", [], ["#", "74", "75"]),
        ("Daniel Henry Chamberlain", ["76"], ["Governor"]),
        ("December 1, 1874", ["76"], ["Took Office"]),
    ]


def test_career_row_colspan_dev_line_10(dev_lines):
    # Row 4 starts with "Career" spanning 2 columns, so "96" (raw col 1) is under "GP".
    ex = dev_lines[9]
    table = ex["table"]
    assert table[4][0]["value"] == "Career" and table[4][0]["column_span"] == 2
    assert values(col_headers(table, 4, 1)) == ["GP"]
    sub = highlighted_subtable(table, ex["highlighted_cells"])
    assert [(e["cell"]["value"], values(e["col_headers"])) for e in sub] == [
        ("32", ["GP"]), ("4.8", ["RPG"]), ("2.3", ["APG"]), ("23.5", ["PPG"])]


def test_full_width_title_row_dev_line_34(dev_lines):
    # Row 1 is a non-header cell spanning 9 columns; it must not become a header.
    ex = dev_lines[33]
    sub = highlighted_subtable(ex["table"], ex["highlighted_cells"])
    assert [(e["cell"]["value"], values(e["col_headers"])) for e in sub] == [
        ("15–15", ["Overall"]), ("14–14", ["Overall"]), ("2001–02", ["Season"]),
        ("San Jose State", ["Team"]), ("10–22", ["Overall"])]


def test_parent_tables_dev_line_54(dev_lines):
    # Demetrius the Fair: the eval-fixture example with section text.
    ex = dev_lines[53]
    rec = parent_recall_table(ex["table"], ex["highlighted_cells"],
                              ex["table_page_title"], ex["table_section_title"])
    assert rec == [
        ("cell", "Demetrius the Fair Died: 249 BC"),
        ("cell", "King of Cyrene 250 BC – 249 BC"),
        ("page_title", "Demetrius the Fair"),
        ("section_title", "Sources"),
    ]
    prec = parent_precision_table(ex["table"], ex["table_page_title"],
                                  ex["table_section_title"], ex["table_section_text"])
    non_empty = sum(1 for row in ex["table"] for c in row if c["value"].strip())
    assert len(prec) == non_empty + 3
    assert prec[1] == ("header", "Regnal titles")
    assert prec[-1] == ("section_text", '"smith-bio/0198". ancientlibrary.com.')


def test_parent_tables_drop_empty_cells_and_replace_bars():
    table = [[cell("A|B", True), cell("  ")], [cell(" x ")]]
    assert parent_precision_table(table, "P|T", "", "") == [
        ("header", "A-B"), ("cell", "x"), ("page_title", "P-T")]
    assert parent_recall_table(table, [[0, 1]], "P", "S") == [
        ("page_title", "P"), ("section_title", "S")]
