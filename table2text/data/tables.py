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


class _HeaderIndex:
    """Header cells by column segment, added row by row (top to bottom).

    Gives the same column headers as :func:`col_headers` without scanning every
    cell above: a cell costs the headers it gets, so a table of many rows is
    linear to process (a 20 MB table took minutes cell by cell). Columns are
    the segments between the table's distinct adjusted offsets, so a cell
    spanning 1000 columns is one segment, not 1000."""

    def __init__(self, offsets):
        bounds = sorted({x for row in offsets for pair in row for x in pair})
        self.segment = {x: i for i, x in enumerate(bounds)}
        self.by_segment: list[list[tuple[int, int, Cell]]] = [[] for _ in bounds[1:]]  # (row, position, cell)

    def add_row(self, table: Table, row: int, offsets) -> None:
        for col, (cell, (start, end)) in enumerate(zip(table[row], offsets[row])):
            if cell["is_header"]:
                for segment in range(self.segment[start], self.segment[end]):
                    self.by_segment[segment].append((row, col, cell))

    def headers(self, start: int, end: int) -> list[Cell]:
        lists = self.by_segment[self.segment[start]:self.segment[end]]
        if len(lists) == 1:  # one segment: already top to bottom, at most one header per row
            return [cell for _, _, cell in lists[0]]
        found = {(r, c): cell for entries in lists for r, c, cell in entries}
        return [found[key] for key in sorted(found)]


def _entry(table: Table, row: int, col: int, offsets, index: _HeaderIndex, left_headers=None) -> dict:
    """`left_headers`: the row headers of the cell when the caller walks the row (saves rescanning it)."""
    return {"cell": table[row][col], "row_index": row, "col_index": col,
            "row_headers": row_headers(table, row, col) if left_headers is None else list(left_headers),
            "col_headers": index.headers(*offsets[row][col])}


def highlighted_subtable(table: Table, highlighted_cells) -> list[dict]:
    """The highlighted cells with their heuristic headers, in highlighted order.

    Returns ``[{"cell", "row_index", "col_index", "row_headers", "col_headers"}]``;
    the cells are the table's own dicts (not copies).
    """
    offsets = adjusted_col_offsets(table)
    cells = [tuple(int(i) for i in pair) for pair in highlighted_cells]
    for row, col in cells:
        _check_index(table, row, col)
    # One pass down the table: each highlighted cell sees the header index of the rows above it.
    by_row: dict[int, list[int]] = {}
    for i, (row, _) in enumerate(cells):
        by_row.setdefault(row, []).append(i)
    subtable: list[dict | None] = [None] * len(cells)
    index = _HeaderIndex(offsets)
    for row in range(max(by_row, default=-1) + 1):
        for i in by_row.get(row, ()):
            subtable[i] = _entry(table, row, cells[i][1], offsets, index)
        index.add_row(table, row, offsets)
    return subtable


def table_with_headers(table: Table) -> list[list[dict]]:
    """Every cell of the table with its headers, same shape as ``table``.

    Each entry has the keys of :func:`highlighted_subtable`; used by the
    full-table linearisation, which lists the headers of every cell.
    """
    offsets = adjusted_col_offsets(table)
    index = _HeaderIndex(offsets)
    out = []
    for r, row in enumerate(table):
        entries, left = [], []
        for c, cell in enumerate(row):
            entries.append(_entry(table, r, c, offsets, index, left))
            if cell["is_header"]:
                left.append(cell)
        out.append(entries)
        index.add_row(table, r, offsets)
    return out


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
