"""The official ToTTo metrics, computed offline: BLEU, PARENT and (optionally) BLEURT.

This reproduces what ``language/totto/totto_eval.sh`` (google-research/language)
does, step by step, without its temporary files:

1. prepare: predictions are stripped, an empty one becomes ``<null>``; references
   are the first three ``final_sentence``s padded to three with ``<null>``;
   both are lower-cased.  The PARENT tables are written as
   ``attribute|||value`` entries joined by tabs and lower-cased
   (see :mod:`table2text.data.tables`).
2. every one of those lines goes through the Moses detokeniser
   (``detokenizer.perl -l en``), re-implemented in :func:`moses_detokenize`;
3. BLEU: sacrebleu corpus BLEU, 13a tokenisation, exponential smoothing, three
   references;
4. PARENT (Dhingra et al. 2019, the ToTTo variant): 13a tokens, lower-cased;
   word-overlap entailment against the full (precision) table; table recall
   against the highlighted cells + titles; lambda per reference from how much
   of that table the reference mentions; n-grams up to 4; the reference with
   the best F is kept.  Scores are averaged over examples.

Lines are one-line records in the official files, so line breaks inside a
prediction, reference or table value are read here as spaces (the official
scripts would misalign their files instead).
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from pathlib import Path

from sacrebleu.metrics import BLEU
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

from table2text.data.tables import parent_precision_table, parent_recall_table

NULL = "<null>"
NUM_REFERENCES = 3
MAX_ORDER = 4
PARENT_SMOOTHING = 1e-5  # the official --smoothing default
SUBSETS = ("overall", "overlap", "non_overlap")
NOT_COMPUTED = "not computed"

_tokenize_13a = Tokenizer13a()


# --------------------------------------------------------------------------
# Moses detokeniser (English rules of scripts/tokenizer/detokenizer.perl)
# --------------------------------------------------------------------------

_MOSES_UNESCAPE = [
    ("&bar;", "|"), ("&#124;", "|"), ("&lt;", "<"), ("&gt;", ">"),
    ("&bra;", "["), ("&ket;", "]"), ("&quot;", '"'), ("&apos;", "'"),
    ("&#91;", "["), ("&#93;", "]"), ("&amp;", "&"),
]
_CLOSING = re.compile(r"^[,.?!:;\\%}\])]+$")
_QUOTES = re.compile("^['\"„“`]+$")
_CJK_RANGES = [(0x1100, 0x11FF), (0x2E80, 0xA4CF), (0xA840, 0xA87F), (0xAC00, 0xD7AF),
               (0xF900, 0xFAFF), (0xFE30, 0xFE4F), (0xFF65, 0xFFDC), (0x20000, 0x2FFFF)]


def _is_cjk(char: str) -> bool:
    code = ord(char)
    return any(lo <= code <= hi for lo, hi in _CJK_RANGES)


def _is_alpha(char: str) -> bool:
    return char.isalpha()


def _is_alnum(char: str) -> bool:
    # Perl's \p{IsAlnum}: alphabetic or decimal digit.
    return char.isalpha() or unicodedata.category(char) == "Nd"


def _opens(word: str) -> bool:
    # Currency symbols and opening brackets attach to the next word.
    return bool(word) and all(c in "([{¿¡" or unicodedata.category(c) == "Sc" for c in word)


def moses_detokenize(line: str) -> str:
    """Detokenise one line like ``detokenizer.perl -l en`` (no -penn, no -u).

    Only spaces separate words (tabs stay inside words, as in Perl's
    ``split(/ /)``), and lines that look like an XML tag (``<...>``) or are
    blank are returned unchanged, as the script does.
    """
    if re.match(r"^<.+>$", line) or not line.strip():
        return line
    text = f" {line} ".replace(" @-@ ", "-")
    for escaped, char in _MOSES_UNESCAPE:
        text = text.replace(escaped, char)
    words = text.split(" ")
    while words and words[-1] == "":  # Perl's split drops trailing empty fields
        words.pop()

    out = ""
    prepend = " "
    quote_count: dict[str, int] = {}
    for i, word in enumerate(words):
        prev = words[i - 1] if i > 0 else ""
        if word and _is_cjk(word[0]):
            out += word if (i > 0 and prev and _is_cjk(prev[-1])) else prepend + word
            prepend = " "
        elif _opens(word):
            out += prepend + word
            prepend = ""
        elif _CLOSING.match(word):
            out += word
            prepend = " "
        elif (i > 0 and len(word) > 1 and word[0] == "'" and _is_alpha(word[1])
              and prev and _is_alnum(prev[-1])):
            out += word  # English contraction: "it 's" -> "it's"
            prepend = " "
        elif _QUOTES.match(word):
            kind = '"' if re.match("^[„“”]+$", word) else word
            count = quote_count.get(kind, 0)
            if count % 2 == 0:
                if word == "'" and i > 0 and prev.endswith("s"):
                    out += word  # possessive: "the jones ' house"
                    prepend = " "
                else:
                    out += prepend + word
                    prepend = ""
                    quote_count[kind] = count + 1
            else:
                out += word
                prepend = " "
                quote_count[kind] = count + 1
        else:
            out += prepend + word
            prepend = " "
    out = re.sub(" +", " ", out)
    if out.startswith(" "):
        out = out[1:]
    if out.endswith(" "):
        out = out[:-1]
    return out


# --------------------------------------------------------------------------
# Preparing the official "files" in memory
# --------------------------------------------------------------------------

def _one_line(text: str) -> str:
    return re.sub(r"[\r\n]", " ", text)


def prepare_prediction(prediction: str) -> str:
    """As prepare_predictions_for_eval + detokeniser: stripped, ``<null>`` if empty, lower-cased."""
    prediction = _one_line(prediction).strip()
    return moses_detokenize((prediction or NULL).lower())


def prepare_references(references: list[str]) -> list[str]:
    """As prepare_references_for_eval + detokeniser: first three, padded with ``<null>``, lower-cased."""
    refs = [_one_line(r) for r in references[:NUM_REFERENCES]]
    refs += [NULL] * (NUM_REFERENCES - len(refs))
    return [moses_detokenize(r.lower()) for r in refs]


def _table_line(pairs: list[tuple[str, str]]) -> str:
    # Tabs separate entries in the official file, so none may remain in a value.
    entries = ("%s|||%s" % (attr, re.sub(r"[\t\r\n]", " ", value)) for attr, value in pairs)
    return moses_detokenize("\t".join(entries).lower())


def _tokens(text: str) -> list[str]:
    """The PARENT text normalisation: lower-case, 13a tokens."""
    return _tokenize_13a(text.strip().lower()).split()


def _parse_table(line: str) -> list[tuple[list[str], list[str]]]:
    table = []
    for entry in line.lower().split("\t"):
        if not entry.strip():
            continue
        attribute, _, value = entry.partition("|||")
        value_tokens = _tokens(value)
        if value_tokens:  # an empty value cannot be mentioned (official: division by zero)
            table.append((_tokens(attribute), value_tokens))
    return table


def parent_tables(example: dict) -> tuple[list, list]:
    """Tokenised (precision table, recall table) of an example, as the official eval builds them."""
    table = example["table"]
    precision = parent_precision_table(table, example["page_title"], example["section_title"],
                                       example["section_text"])
    recall = parent_recall_table(table, example["highlighted_cells"], example["page_title"],
                                 example["section_title"])
    return _parse_table(_table_line(precision)), _parse_table(_table_line(recall))


# --------------------------------------------------------------------------
# PARENT
# --------------------------------------------------------------------------

def _ngram_counts(tokens: list[str], order: int) -> Counter:
    return Counter(tuple(tokens[i:i + order]) for i in range(len(tokens) - order + 1))


def _lcs_length(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def _mention_probability(value: list[str], sentence: list[str]) -> float:
    """Share of a table value's tokens found, in order, in the sentence (LCS)."""
    return _lcs_length(value, sentence) / len(value)


def _geometric_mean(values: list[float]) -> float:
    return math.exp(math.fsum(math.log(v) / len(values) for v in values))


def parent_example(prediction: list[str], references: list[list[str]],
                   precision_table: list, recall_table: list,
                   max_order: int = MAX_ORDER, smoothing: float = PARENT_SMOOTHING
                   ) -> tuple[float, float, float]:
    """PARENT (precision, recall, F) of one tokenised prediction; best F over the references."""
    table_words = {tok for _, value in precision_table for tok in value}

    def entailed(ngram: tuple) -> float:
        # Word-overlap entailment: share of the n-gram's tokens found in the table.
        return sum(tok in table_words for tok in ngram) / len(ngram)

    # Table recall of the prediction does not depend on the reference.
    if recall_table:
        table_recall = sum(_mention_probability(v, prediction) for _, v in recall_table) / len(recall_table)
    else:
        table_recall = 0.0
    table_recall = table_recall or smoothing

    best = None
    for reference in references:
        precisions, recalls = [], []
        for order in range(1, max_order + 1):
            pred_counts = _ngram_counts(prediction, order)
            ref_counts = _ngram_counts(reference, order)

            numerator = denominator = 0.0
            for ngram, count in pred_counts.items():
                in_reference = min(1.0, ref_counts.get(ngram, 0) / count)
                numerator += count * (in_reference + (1.0 - in_reference) * entailed(ngram))
                denominator += count
            precisions.append(numerator / denominator if denominator else 0.0)

            numerator = denominator = 0.0
            for ngram, count in ref_counts.items():
                weight = entailed(ngram)
                in_prediction = min(1.0, pred_counts.get(ngram, 0) / count)
                numerator += count * weight * in_prediction
                denominator += count * weight
            recalls.append(numerator / denominator if denominator else 1.0)

        # Zero scores of orders 2..max are smoothed; a zero unigram score is not.
        for k in range(1, max_order):
            precisions[k] = precisions[k] or smoothing
            recalls[k] = recalls[k] or smoothing
        precision = 0.0 if 0.0 in precisions else _geometric_mean(precisions)
        reference_recall = smoothing if 0.0 in recalls else _geometric_mean(recalls)

        # lambda: how much of the highlighted table the reference leaves unsaid.
        if recall_table:
            mentioned = sum(_mention_probability(v, reference) for _, v in recall_table) / len(recall_table)
            weight = 1.0 - mentioned
        else:
            weight = 0.0  # no table to recall: reference recall only
        recall = math.exp((1.0 - weight) * math.log(reference_recall)
                          + weight * math.log(table_recall))
        f_score = 2.0 * precision * recall / (precision + recall + 1e-8)
        if best is None or f_score > best[2]:
            best = (precision, recall, f_score)
    return best


# --------------------------------------------------------------------------
# BLEU and BLEURT
# --------------------------------------------------------------------------

def corpus_bleu(predictions: list[str], references: list[list[str]]) -> float:
    """sacrebleu corpus BLEU (13a, exp smoothing) of prepared predictions and references."""
    streams = [list(refs) for refs in zip(*references)]
    bleu = BLEU(tokenize="13a", smooth_method="exp", lowercase=False)
    return bleu.corpus_score(predictions, streams).score


def load_bleurt_scorer(checkpoint: str | Path):
    """A ``score(references=, candidates=) -> list[float]`` function from a local BLEURT checkpoint.

    Raises ValueError when the folder is missing or the ``bleurt`` package
    (Google's, which the official script uses) is not installed.
    """
    path = Path(checkpoint)
    if not path.is_dir():
        raise ValueError(f"BLEURT checkpoint folder not found: {path}")
    try:
        from bleurt import score as bleurt_score  # type: ignore[import-not-found]
    except ImportError as err:
        raise ValueError(
            f"BLEURT checkpoint {path} was given but the 'bleurt' package is not installed "
            f"in this environment; install it or leave eval.bleurt_checkpoint empty") from err
    scorer = bleurt_score.BleurtScorer(str(path))
    return lambda references, candidates: list(scorer.score(references=references,
                                                            candidates=candidates))


def bleurt_mean(score_fn, predictions: list[str], references: list[list[str]]) -> float:
    """Mean BLEURT as totto_bleurt_eval computes it: per example, the mean over the three
    (padded) references; lower-cased text."""
    candidates = [p.strip().lower() for p in predictions]
    per_reference = [score_fn(references=[r.strip().lower() for r in refs], candidates=candidates)
                     for refs in zip(*references)]
    per_example = [sum(scores) / len(scores) for scores in zip(*per_reference)]
    return sum(per_example) / len(per_example)


# --------------------------------------------------------------------------
# The public entry point
# --------------------------------------------------------------------------

_REQUIRED = ("references", "table", "highlighted_cells", "page_title", "section_title",
             "section_text")


def _check_example(index: int, example: dict) -> None:
    for key in _REQUIRED:
        if key not in example:
            where = example.get("id", f"#{index}")
            raise ValueError(f"example {where} (index {index}) has no field '{key}'")


def prepare_examples(examples: list[dict]) -> list[tuple]:
    """The prediction-independent half of the scoring, per example: (prepared references, their PARENT
    tokens, precision table, recall table). compute_metrics(prepared=...) takes it, so scoring two models
    on the same examples (evaluate: fine-tuned and base) builds and tokenises the tables once."""
    for index, example in enumerate(examples):
        _check_example(index, example)
    out = []
    for example in examples:
        references = prepare_references(example["references"])
        out.append((references, [_tokens(ref) for ref in references], *parent_tables(example)))
    return out


def compute_metrics(predictions: list[str], examples: list[dict],
                    bleurt_checkpoint: str | Path | None = None,
                    prepared: list[tuple] | None = None) -> tuple[dict, list[dict]]:
    """Score predictions against ToTTo examples (normalised or processed dicts).

    Returns ``(summary, per_example)``.  ``summary[subset]`` for subset in
    overall / overlap / non_overlap holds ``count``, ``bleu`` (0-100),
    ``parent_precision``, ``parent_recall``, ``parent_f`` (0-1) and ``bleurt``
    (a number, or ``"not computed"`` without a checkpoint).  A subset without
    examples has count 0 and None metrics.  Examples whose ``overlap`` is None
    count in overall only.  ``per_example`` aligns with ``predictions``.
    """
    if len(predictions) != len(examples):
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
    if prepared is None:
        prepared = prepare_examples(examples)
    elif len(prepared) != len(examples):
        raise ValueError(f"{len(prepared)} prepared examples for {len(examples)} examples")
    bleurt_fn = load_bleurt_scorer(bleurt_checkpoint) if bleurt_checkpoint else None

    prepared_predictions = [prepare_prediction(p) for p in predictions]
    prepared_references = [references for references, *_ in prepared]

    per_example = []
    for prediction, (_, reference_tokens, precision_table, recall_table) in zip(prepared_predictions, prepared):
        p, r, f = parent_example(_tokens(prediction), reference_tokens, precision_table, recall_table)
        per_example.append({"parent_precision": p, "parent_recall": r, "parent_f": f})

    members = {
        "overall": list(range(len(examples))),
        "overlap": [i for i, ex in enumerate(examples) if ex.get("overlap") is True],
        "non_overlap": [i for i, ex in enumerate(examples) if ex.get("overlap") is False],
    }
    summary = {}
    for subset in SUBSETS:
        summary[subset] = _subset_scores(members[subset], prepared_predictions,
                                         prepared_references, per_example, bleurt_fn)
    return summary, per_example


def _subset_scores(indices, predictions, references, per_example, bleurt_fn) -> dict:
    scores = {"count": len(indices), "bleu": None, "parent_precision": None,
              "parent_recall": None, "parent_f": None,
              "bleurt": None if bleurt_fn else NOT_COMPUTED}
    if not indices:
        return scores
    preds = [predictions[i] for i in indices]
    refs = [references[i] for i in indices]
    scores["bleu"] = corpus_bleu(preds, refs)
    for key in ("parent_precision", "parent_recall", "parent_f"):
        scores[key] = sum(per_example[i][key] for i in indices) / len(indices)
    if bleurt_fn:
        scores["bleurt"] = bleurt_mean(bleurt_fn, preds, refs)
    return scores


# --------------------------------------------------------------------------
# Breakdowns for the plots
# --------------------------------------------------------------------------

def highlighted_cells_bucket(example: dict) -> str:
    n = len(example["highlighted_cells"])
    return str(n) if n < 5 else "5+"


HIGHLIGHTED_BUCKETS = ("1", "2", "3", "4", "5+")
TABLE_SIZE_BUCKETS = ("1-50", "51-100", "101-200", "201-500", "501+")


def table_size_bucket(example: dict) -> str:
    cells = sum(len(row) for row in example["table"])
    for label, upper in zip(TABLE_SIZE_BUCKETS, (50, 100, 200, 500)):
        if cells <= upper:
            return label
    return TABLE_SIZE_BUCKETS[-1]


def breakdown(predictions: list[str], examples: list[dict], per_example: list[dict],
              bucket_of, buckets) -> list[dict]:
    """BLEU and PARENT F per bucket (rows ``{"bucket", "count", "bleu", "parent_f"}``),
    in the order of ``buckets``; empty buckets are left out."""
    groups: dict[str, list[int]] = {}
    for i, example in enumerate(examples):
        groups.setdefault(bucket_of(example), []).append(i)
    rows = []
    for label in buckets:
        indices = groups.get(label)
        if not indices:
            continue
        bleu = corpus_bleu([prepare_prediction(predictions[i]) for i in indices],
                           [prepare_references(examples[i]["references"]) for i in indices])
        f = sum(per_example[i]["parent_f"] for i in indices) / len(indices)
        rows.append({"bucket": label, "count": len(indices), "bleu": bleu, "parent_f": f})
    return rows


def plot_tables(predictions: list[str], examples: list[dict],
                per_example: list[dict]) -> dict[str, list[dict]]:
    """The plot data: BLEU and PARENT F by number of highlighted cells and by table size (cells)."""
    return {
        "by_highlighted_cells": breakdown(predictions, examples, per_example,
                                          highlighted_cells_bucket, HIGHLIGHTED_BUCKETS),
        "by_table_size": breakdown(predictions, examples, per_example,
                                   table_size_bucket, TABLE_SIZE_BUCKETS),
    }
