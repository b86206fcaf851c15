"""Failure labels of one prediction by four simple heuristics (hallucinated number, missing highlighted
cell, unsupported entity, empty), the worst examples by PARENT F, and the counts per label. LABELS says
each heuristic in a sentence; the functions say it precisely. The report is stages/error_analysis.py."""

from __future__ import annotations

import math
import re
import unicodedata



# The tags table2text.data.linearize writes around a cell: in `subtable` every <cell> is a highlighted cell; in
# `full_table` the highlighted ones are <highlighted_cell> and the others <cell>. (linearize.py writes
# them as literals; tests/test_error_analysis.py checks these against its output.)
CELL_TAG = "cell"
HIGHLIGHTED_TAG = "highlighted_cell"
LABELS = {
    "hallucinated_number": (
        "hallucinated number",
        "a number of the prediction (digits; thousands separators dropped, so 1,234 = 1234; decimals kept, "
        "trailing decimal zeros and leading zeros dropped) that is not a number of the prompt (titles, "
        "cells, headers, question). A year range such as 1989–90 in the prompt also supports 1990, and "
        "any year 1960-1969 of the prompt supports \"1960s\". A number the model computed (a sum, a "
        "count, a difference) counts too, even when it is right.",
    ),
    "missing_cell": (
        "missing highlighted cell",
        "a highlighted cell value that a reference mentions but the prediction does not. A text mentions "
        "a value when at least half (rounded up) of the value's words, stop words left out, are words of "
        "the text (lower-cased, accents and thousands separators dropped). Values with no such word "
        "(e.g. \"-\") are never missing.",
    ),
    "unsupported_entity": (
        "unsupported entity",
        "a name of the prediction (a run of capitalised words; stop words such as \"The\" or \"In\" that "
        "open a sentence are no names, one-letter words are left out, and \"of\", \"de\" and the like "
        "may join two words) with a word found in neither the prompt nor the references. A word "
        "is found when it is a word there, or shares with one a prefix of at least four letters and at "
        "least all but the last two letters of the shorter word (Ukrainian ~ Ukraine, Canadian ~ Canada). "
        "This stands for the issue's \"wrong entity\": a name the model made up or took from elsewhere.",
    ),
    "empty": ("empty prediction", "the prediction is empty or white space only."),
}


# Words that are never a name nor a content word of a cell, capitalised or not: function words and the
# usual sentence openers.
STOPWORDS = frozenset("""
a an the and or but nor for so yet of in on at to by with from into onto upon over under about above
below between among through throughout during before after since until till as than then there here
this that these those it its he she his her hers him they them their theirs we our us you your i me my
is are was were be been being has have had do does did will would can could may might shall should must
not no also both either neither each every all any some many most more less few several other another
such only just even still however although though while when where which who whom whose what why how
because if unless whether despite following according overall additionally furthermore moreover
meanwhile later earlier currently previously finally together instead thus therefore out up down off
per via against within without along across around behind beyond near
mr mrs ms dr jr sr
""".split())


NAME_JOINERS = frozenset("of de du da del der di la le van von y".split())  # may join two words of a name
_TAG = re.compile(r"</?[A-Za-z_]+>")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_TOKEN = re.compile(r"\d+(?:\.\d+)?|[^\W\d_]+")
_YEAR_RANGE = re.compile(r"(?<!\d)(\d{2})(\d{2})\s*[-–—/]\s*(\d{2})(?!\d)")
_NUMBER = re.compile(r"(\d+(?:,\d{3}(?!\d))*(?:\.\d+)?)(['’]?s\b)?")  # as `normalise` reads them
_POSSESSIVE = re.compile(r"['’]s\b")
_WORD = re.compile(r"[^\W\d_]+")
_JOIN = re.compile(rf"\s+|\s*-\s*|\s+(?:{'|'.join(sorted(NAME_JOINERS))})\s+")
FIELDS = ("id", "prompt", "prediction", "references", "parent")
SCORES = ("parent_precision", "parent_recall", "parent_f")


def analyse(row: dict) -> dict:
    """Labels of one example, with what set them off."""
    prompt, prediction, references = row["prompt"], row["prediction"], row["references"]
    found = {
        "hallucinated_number": hallucinated_numbers(prediction, prompt),
        "missing_cell": missing_cells(highlighted_values(prompt), prediction, references),
        "unsupported_entity": unsupported_entities(prediction, prompt, references),
        "empty": ["(empty)"] if not prediction.strip() else [],
    }
    return {"labels": [label for label in LABELS if found[label]], **found}


def normalise(text: str) -> str:
    """Lower case, accents and compatibility forms folded (²⁸⁶ -> 286), thousands separators dropped."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).casefold()
    return _THOUSANDS.sub("", text)


def canonical_number(digits: str) -> str:
    """'007' -> '7', '10.70' -> '10.7', '5.0' -> '5'."""
    whole, _, decimals = digits.partition(".")
    whole, decimals = whole.lstrip("0") or "0", decimals.rstrip("0")
    return f"{whole}.{decimals}" if decimals else whole


def words(text: str) -> list[str]:
    """Normalised words of `text`: runs of letters, and numbers in canonical form."""
    return [canonical_number(t) if t[0].isdigit() else t for t in _TOKEN.findall(normalise(text))]


def numbers(text: str) -> list[str]:
    return [w for w in words(text) if w[0].isdigit()]


def hallucinated_numbers(prediction: str, prompt: str) -> list[str]:
    """Numbers of the prediction (as written there) that are not numbers of the prompt.

    Both sides are compared in canonical form: thousands separators dropped ("1,234" = "1234"), decimals
    kept ("10.7" != "10"), leading zeros and trailing decimal zeros dropped. A year range "1989–90" of
    the prompt also supplies 1990 (and "1999–00" 2000); a decade "1960s" of the prediction is supported
    by any year 1960-1969 of the prompt."""
    source = set(numbers(_TAG.sub(" ", prompt)))
    for century, start, end in _YEAR_RANGE.findall(normalise(prompt)):
        source.add(str(int(century) + (int(end) < int(start))) + end)
    out = []
    for match in _NUMBER.finditer(unicodedata.normalize("NFKC", prediction)):
        number = canonical_number(match.group(1).replace(",", ""))
        decade = bool(match.group(2)) and len(number) == 4 and number.endswith("0")
        supported = number in source or (decade and any(len(n) == 4 and n[:3] == number[:3] for n in source))
        if not supported and match.group(1) not in out:
            out.append(match.group(1))
    return out


def highlighted_values(prompt: str) -> list[str]:
    """The highlighted cell values of a prompt of either linearisation (see table2text.data.linearize): the text
    after each <highlighted_cell> tag, or after each <cell> tag when there is none (subtable)."""
    for tag in (HIGHLIGHTED_TAG, CELL_TAG):
        values = re.findall(rf"<{tag}>\s*([^<]*)", prompt)
        if values:
            return [v.strip() for v in values if v.strip()]
    return []


def content_words(text: str) -> list[str]:
    return [w for w in words(text) if w not in STOPWORDS]


def mentions(text_words: set[str], value: str) -> bool:
    """Whether a text (its set of words) mentions a cell value: half its content words, rounded up."""
    needed = content_words(value)
    return sum(w in text_words for w in needed) >= math.ceil(len(needed) / 2)


def missing_cells(values: list[str], prediction: str, references: list[str]) -> list[str]:
    """Highlighted cell values (distinct) that some reference mentions and the prediction does not."""
    predicted = set(words(prediction))
    referenced = [set(words(ref)) for ref in references]
    out, seen = [], set()
    for value in values:
        key = tuple(content_words(value))
        if not key or key in seen:
            continue
        seen.add(key)
        if any(mentions(ref, value) for ref in referenced) and not mentions(predicted, value):
            out.append(value)
    return out


def names(prediction: str) -> list[str]:
    """Runs of capitalised words of the prediction, as written there ("'s" dropped). Stop words and
    one-letter words are never part of a name; "of", "de" and the like join two capitalised words."""
    text = _POSSESSIVE.sub("", prediction)
    spans: list[list[int]] = []
    for match in _WORD.finditer(text):
        word = match.group()
        if len(word) < 2 or not word[0].isupper() or word.casefold() in STOPWORDS:
            continue
        if spans and _JOIN.fullmatch(text[spans[-1][1]:match.start()]):
            spans[-1][1] = match.end()
        else:
            spans.append([match.start(), match.end()])
    return [text[start:end] for start, end in spans]


def found_in(word: str, source: set[str]) -> bool:
    """`word` (normalised) is a source word, or shares with one a prefix of >= 4 letters that covers all
    but the last two letters of the shorter of the two."""
    if word in source:
        return True
    for other in source:
        shared = len(_common_prefix(word, other))
        if shared >= 4 and shared >= min(len(word), len(other)) - 2:
            return True
    return False


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def unsupported_entities(prediction: str, prompt: str, references: list[str]) -> list[str]:
    """Names of the prediction (see `names`) with a word found in neither prompt nor references; the
    joining words ("of", "de", ...) need not be found."""
    source = set(words(_TAG.sub(" ", prompt)))
    for ref in references:
        source.update(words(ref))
    out = []
    for name in names(prediction):
        needed = [w for w in words(name) if w not in NAME_JOINERS and w not in STOPWORDS]
        if not all(found_in(w, source) for w in needed) and name not in out:
            out.append(name)
    return out


def worst_examples(rows: list[dict], n: int) -> list[dict]:
    """The `n` lowest PARENT F; ties by id (numeric ids in numeric order, before other ids)."""
    def key(row):
        example_id = row["id"]
        return row["parent"]["parent_f"], (0, int(example_id), "") if example_id.isdigit() else (1, 0, example_id)
    return sorted(rows, key=key)[:n]


def count(rows: list[dict], label: str | None) -> int:
    """Examples with `label`; with None, examples with no label at all."""
    if label is None:
        return sum(not row["analysis"]["labels"] for row in rows)
    return sum(label in row["analysis"]["labels"] for row in rows)


def percent(n: int, total: int) -> str:
    return f"{n} ({100 * n / total:.1f}%)"


def mean_f(rows: list[dict], label: str | None) -> str:
    chosen = [r for r in rows if (label in r["analysis"]["labels"] if label else not r["analysis"]["labels"])]
    return f"{sum(r['parent']['parent_f'] for r in chosen) / len(chosen):.3f}" if chosen else "—"


def count_lines(rows: list[dict], worst: list[dict]) -> list[str]:
    lines = [f"error_analysis: {len(rows)} examples; label: all / worst {len(worst)}"]
    for label, (title, _) in [*LABELS.items(), (None, ("no label", ""))]:
        lines.append(f"  {title:<26} {percent(count(rows, label), len(rows)):>14}  "
                     f"{percent(count(worst, label), len(worst)):>12}")
    return lines
