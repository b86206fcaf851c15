"""ToTTo table utilities, following the heuristics of the official ToTTo code.

A ToTTo table is a list of rows; a row is a list of cells
``{"value": str, "is_header": bool, "column_span": int, "row_span": int}``.
Spanning cells are stored once, so rows can have different lengths, and a
highlighted cell ``[row, col]`` indexes the raw lists (``table[row][col]``).

Headers are found the way the ToTTo baselines and evaluation find them:

* every cell gets an *adjusted* column range ``[start, end)`` by summing the
  ``column_span`` of the cells before it in its row.  Row spans are not
  propagated to later rows (the official heuristic ignores them too);
* row headers of a cell: the header cells to its left in the same row;
* column headers of a cell: the header cells in any earlier row whose adjusted
  column range overlaps the cell's range.

The PARENT tables are lists of ``(attribute, value)`` pairs in the order the
official ``prepare_references_for_eval`` writes them.
"""

from __future__ import annotations

Cell = dict
Table = list  # list[list[Cell]]


def adjusted_col_offsets(table: Table) -> list[list[tuple[int, int]]]:
    """Return ``[start, end)`` adjusted column ranges, one per cell, same shape as ``table``."""
    offsets = []
    for row in table:
        start = 0
        row_offsets = []
        for cell in row:
            end = start + int(cell["column_span"])
            row_offsets.append((start, end))
            start = end
        offsets.append(row_offsets)
    return offsets


def _check_index(table: Table, row: int, col: int) -> None:
    # Negative indices would silently wrap around in Python; reject them.
    if not (0 <= row < len(table)) or not (0 <= col < len(table[row])):
        raise IndexError(
            f"cell [{row}, {col}] is outside the table "
            f"({len(table)} rows; row {row} has "
            f"{len(table[row]) if 0 <= row < len(table) else 'no'} cells)")


def row_headers(table: Table, row: int, col: int) -> list[Cell]:
    """Header cells to the left of ``table[row][col]`` in its own row, left to right."""
    _check_index(table, row, col)
    return [cell for cell in table[row][:col] if cell["is_header"]]


def col_headers(table: Table, row: int, col: int,
                offsets: list[list[tuple[int, int]]] | None = None) -> list[Cell]:
    """Header cells above ``table[row][col]`` whose adjusted columns overlap it, top to bottom.

    ``offsets`` (from :func:`adjusted_col_offsets`) may be passed to avoid
    recomputing them for every cell of a large table.
    """
    _check_index(table, row, col)
    if offsets is None:
        offsets = adjusted_col_offsets(table)
    start, end = offsets[row][col]
    headers = []
    for r in range(row):
        for cell, (c_start, c_end) in zip(table[r], offsets[r]):
            if cell["is_header"] and c_start < end and c_end > start:
                headers.append(cell)
    return headers


def cell_headers(table: Table, row: int, col: int,
                 offsets: list[list[tuple[int, int]]] | None = None
                 ) -> tuple[list[Cell], list[Cell]]:
    """``(row_headers, col_headers)`` of ``table[row][col]``."""
    return row_headers(table, row, col), col_headers(table, row, col, offsets)


def _entry(table: Table, row: int, col: int, offsets) -> dict:
    rows, cols = cell_headers(table, row, col, offsets)
    return {"cell": table[row][col], "row_index": row, "col_index": col,
            "row_headers": rows, "col_headers": cols}


def highlighted_subtable(table: Table, highlighted_cells) -> list[dict]:
    """The highlighted cells with their heuristic headers, in highlighted order.

    Returns ``[{"cell", "row_index", "col_index", "row_headers", "col_headers"}]``;
    the cells are the table's own dicts (not copies).
    """
    offsets = adjusted_col_offsets(table)
    subtable = []
    for pair in highlighted_cells:
        row, col = (int(i) for i in pair)
        subtable.append(_entry(table, row, col, offsets))
    return subtable


def table_with_headers(table: Table) -> list[list[dict]]:
    """Every cell of the table with its headers, same shape as ``table``.

    Each entry has the keys of :func:`highlighted_subtable`; used by the
    full-table linearisation, which lists the headers of every cell.
    """
    offsets = adjusted_col_offsets(table)
    return [[_entry(table, r, c, offsets) for c in range(len(row))]
            for r, row in enumerate(table)]


def _clean(value: str) -> str:
    # The official files use "|||" and tabs as separators, so "|" is replaced.
    return value.strip().replace("|", "-")


def _cell_pairs(cells) -> list[tuple[str, str]]:
    pairs = []
    for cell in cells:
        value = _clean(cell["value"])
        if value:
            pairs.append(("header" if cell["is_header"] else "cell", value))
    return pairs


def _title_pairs(**titles: str) -> list[tuple[str, str]]:
    # The official code keeps titles unstripped; only empty ones are dropped.
    return [(name, text.replace("|", "-")) for name, text in titles.items() if text]


def parent_precision_table(table: Table, page_title: str, section_title: str,
                           section_text: str) -> list[tuple[str, str]]:
    """PARENT precision table: every non-empty cell, then page title, section title, section text."""
    cells = _cell_pairs(cell for row in table for cell in row)
    return cells + _title_pairs(page_title=page_title, section_title=section_title,
                                section_text=section_text)


def parent_recall_table(table: Table, highlighted_cells, page_title: str,
                        section_title: str) -> list[tuple[str, str]]:
    """PARENT recall table: the highlighted cells, then page title and section title.

    As in the official evaluation, the recall table holds the highlighted cell
    values only (their headers are not added) and no section text.
    """
    cells = [entry["cell"] for entry in highlighted_subtable(table, highlighted_cells)]
    return _cell_pairs(cells) + _title_pairs(page_title=page_title,
                                             section_title=section_title)
