"""Table linearisation of the ToTTo paper's baselines (google-research/language, baseline_preprocessing).

Two modes (``data.linearization``), both with page and section title:
  * ``subtable``   the highlighted cells only, in highlighted order, each with its heuristic headers:
      ``<page_title> P </page_title> <section_title> S </section_title> <table> <cell> v
      <col_header> h </col_header> <row_header> r </row_header> </cell> ... </table>``
  * ``full_table`` every cell, row by row, each with its headers; highlighted cells are written
      ``<highlighted_cell> v ... </highlighted_cell>`` and rows are wrapped in ``<row> ... </row>``.

Headers come from table2text.data.tables (the official heuristics, spans handled through adjusted column
offsets); this module only writes strings. Empty titles are left out, as in the official code.
"""

from __future__ import annotations

from table2text.data.tables import highlighted_subtable, table_with_headers

MODES = ("subtable", "full_table")


def linearize(example: dict, mode: str = "subtable", spans: list | None = None) -> str:
    """The table text of a normalised example (see table2text.data.sources) in the given mode.

    With `spans` (a list), appends the (start, end) character offsets in the text of each highlighted
    cell's value, in text order: what stages.preprocess needs to tell which highlighted cells a
    truncated prompt still holds."""
    parts = [_titles(example), "<table> "]
    size = sum(map(len, parts))

    def add(text: str) -> None:
        nonlocal size
        parts.append(text)
        size += len(text)

    def add_cell(tag: str, item: dict, highlighted: bool) -> None:
        head = f"<{tag}> "
        add(head)
        if highlighted and spans is not None:
            spans.append((size, size + len(item["cell"]["value"])))
        add(_cell(tag, item)[len(head):])

    if mode == "subtable":
        for item in highlighted_subtable(example["table"], example["highlighted_cells"]):
            add_cell("cell", item, True)
    elif mode == "full_table":
        highlighted = {(int(r), int(c)) for r, c in example["highlighted_cells"]}
        for row in table_with_headers(example["table"]):
            add("<row> ")
            for item in row:
                is_highlighted = (item["row_index"], item["col_index"]) in highlighted
                add_cell("highlighted_cell" if is_highlighted else "cell", item, is_highlighted)
            add("</row> ")
    else:
        raise ValueError(f"data.linearization must be one of {MODES}, got {mode!r}")
    add("</table>")
    return "".join(parts)


def _titles(example: dict) -> str:
    text = ""
    if example.get("page_title"):
        text += f"<page_title> {example['page_title']} </page_title> "
    if example.get("section_title"):
        text += f"<section_title> {example['section_title']} </section_title> "
    return text


def _cell(tag: str, item: dict) -> str:
    # Value first, then column headers (top to bottom), then row headers (left to right).
    text = f"<{tag}> {item['cell']['value']} "
    text += "".join(f"<col_header> {h['value']} </col_header> " for h in item["col_headers"])
    text += "".join(f"<row_header> {h['value']} </row_header> " for h in item["row_headers"])
    return text + f"</{tag}> "
