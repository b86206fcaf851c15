"""The official ToTTo metrics: fidelity to the published numbers, PARENT by hand, edge cases."""

import gzip
import math
import os
from pathlib import Path

import pytest

from table2text.metrics.totto import (
    NOT_COMPUTED,
    bleurt_mean,
    compute_metrics,
    load_bleurt_scorer,
    moses_detokenize,
    parent_example,
    plot_tables,
    prepare_examples,
    prepare_prediction,
    prepare_references,
)

SHARED = Path(os.environ.get("TOTTO_SHARED_DATA",
                             Path(__file__).resolve().parents[1].parent / "shared" / "data"))
FIXTURE = SHARED / "totto" / "eval_fixture"


@pytest.fixture(scope="module")
def fixture_data():
    examples_path = FIXTURE / "dev_sample.jsonl.gz"
    predictions_path = FIXTURE / "output_sample.txt.gz"
    if not (examples_path.exists() and predictions_path.exists()):
        pytest.skip(f"ToTTo eval fixture not found in {FIXTURE} (set TOTTO_SHARED_DATA)")
    from table2text.data.sources import read_totto_jsonl
    examples = read_totto_jsonl(examples_path)
    with gzip.open(predictions_path, "rt", encoding="utf-8") as f:
        predictions = [line.rstrip("\n") for line in f]
    return predictions, examples


# Published by the official README for output_sample.txt vs dev_sample.jsonl.
PUBLISHED = {
    "overall": {"count": 5, "bleu": 45.5, "parent_precision": 0.7611,
                "parent_recall": 0.4383, "parent_f": 0.5334},
    "overlap": {"count": 3, "bleu": 37.2, "parent_precision": 0.7140,
                "parent_recall": 0.3135, "parent_f": 0.4134},
    "non_overlap": {"count": 2, "bleu": 58.3, "parent_precision": 0.8317,
                    "parent_recall": 0.6256, "parent_f": 0.7135},
}


@pytest.mark.parametrize("subset", PUBLISHED)
def test_fidelity_to_the_published_scores(fixture_data, subset):
    predictions, examples = fixture_data
    summary, per_example = compute_metrics(predictions, examples)
    got, want = summary[subset], PUBLISHED[subset]
    assert got["count"] == want["count"]
    assert got["bleu"] == pytest.approx(want["bleu"], abs=0.1)
    for key in ("parent_precision", "parent_recall", "parent_f"):
        assert got[key] == pytest.approx(want[key], abs=0.001), key
    assert got["bleurt"] == NOT_COMPUTED
    assert len(per_example) == 5


def test_identical_prediction_scores_high_and_nonsense_scores_low(fixture_data):
    _, examples = fixture_data
    summary, per_example = compute_metrics([ex["references"][0] for ex in examples], examples)
    assert summary["overall"]["bleu"] == pytest.approx(100.0)
    assert summary["overall"]["parent_precision"] > 0.95
    assert summary["overall"]["parent_f"] > 0.8

    summary, per_example = compute_metrics(["zebra quantum xylophone marmalade"] * 5, examples)
    assert summary["overall"]["bleu"] < 1.0
    assert all(row["parent_f"] < 0.01 for row in per_example)


def test_empty_prediction_is_scored_as_null(fixture_data):
    predictions, examples = fixture_data
    predictions = ["   "] + predictions[1:]
    summary, per_example = compute_metrics(predictions, examples)
    assert prepare_prediction("   ") == "<null>"
    assert per_example[0]["parent_f"] < 0.01
    assert summary["overall"]["parent_f"] < PUBLISHED["overall"]["parent_f"]


def small_example(overlap, references=("john smith was born in 1950.",)):
    return {
        "id": "x", "references": list(references), "overlap": overlap,
        "table": [[{"value": "Name", "is_header": True, "column_span": 1, "row_span": 1},
                   {"value": "Born", "is_header": True, "column_span": 1, "row_span": 1}],
                  [{"value": "John Smith", "is_header": False, "column_span": 1, "row_span": 1},
                   {"value": "1950", "is_header": False, "column_span": 1, "row_span": 1}]],
        "highlighted_cells": [[1, 0], [1, 1]],
        "page_title": "John Smith", "section_title": "Life", "section_text": "",
    }


def test_a_subset_without_examples_has_count_zero_and_null_metrics():
    summary, _ = compute_metrics(["John Smith was born in 1950."], [small_example(True)])
    assert summary["overlap"]["count"] == 1
    assert summary["non_overlap"] == {"count": 0, "bleu": None, "parent_precision": None,
                                      "parent_recall": None, "parent_f": None,
                                      "bleurt": NOT_COMPUTED}


def test_examples_without_overlap_flag_count_in_overall_only():
    summary, _ = compute_metrics(["x", "y"], [small_example(None), small_example(False)])
    assert [summary[s]["count"] for s in ("overall", "overlap", "non_overlap")] == [2, 0, 1]


def test_bad_input_is_reported():
    with pytest.raises(ValueError, match="2 predictions for 1 examples"):
        compute_metrics(["a", "b"], [small_example(True)])
    broken = small_example(True)
    del broken["page_title"]
    with pytest.raises(ValueError, match="'page_title'"):
        compute_metrics(["a"], [broken])


def test_references_are_padded_to_three_and_lowercased():
    assert prepare_references(["A B.", "C d"]) == ["a b.", "c d", "<null>"]
    assert prepare_references(["1", "2", "3", "4"]) == ["1", "2", "3"]


def test_moses_detokenizer_english_rules():
    assert moses_detokenize("hello , world !") == "hello, world!"
    assert moses_detokenize("it 's john 's car") == "it's john's car"
    assert moses_detokenize("costs $ 5 ( about 4 % )") == "costs $5 (about 4%)"
    assert moses_detokenize('he said " yes " .') == 'he said "yes".'
    assert moses_detokenize("the jones ' house") == "the jones' house"
    assert moses_detokenize("a &amp; b @-@ c") == "a & b-c"
    # XML-looking and blank lines pass through untouched, as in detokenizer.perl.
    assert moses_detokenize("<null>") == "<null>"
    assert moses_detokenize("   ") == "   "
    # Only spaces split words: a tab stays inside the word "x\t,".
    assert moses_detokenize("cell|||x\t, y") == "cell|||x\t, y"


def test_parent_by_hand():
    # prediction "a b x", reference "a b c"; the table holds a, b, c; recall table is "c".
    table = [(["cell"], ["a"]), (["cell"], ["b"]), (["cell"], ["c"])]
    recall_table = [(["cell"], ["c"])]
    s = 1e-5
    p, r, f = parent_example(["a", "b", "x"], [["a", "b", "c"]], table, recall_table)
    # Precision per order: x is neither in the reference nor the table; the bigram
    # (b, x) is half entailed; no 4-grams -> 0, smoothed.
    want_p = (2 / 3 * (1.5 / 2) * (2 / 3) * s) ** 0.25
    # Recall per order: 2/3, 1/2, 0 (smoothed), 1 (no reference 4-grams).
    # The reference mentions all of the recall table, so lambda = 0: reference recall only.
    want_r = (2 / 3 * 1 / 2 * s * 1.0) ** 0.25
    assert p == pytest.approx(want_p)
    assert r == pytest.approx(want_r)
    assert f == pytest.approx(2 * want_p * want_r / (want_p + want_r + 1e-8))


def test_parent_lambda_uses_what_the_reference_leaves_unsaid():
    table = [(["cell"], ["a"]), (["cell"], ["b"]), (["cell"], ["c"]), (["cell"], ["d"])]
    # The reference mentions nothing of the recall table "d": lambda = 1, so recall is
    # the table recall of the prediction alone, which mentions "d".
    _, r, _ = parent_example(["a", "b", "c", "d"], [["a", "b", "c", "e"]], table, [(["cell"], ["d"])])
    assert r == pytest.approx(1.0)


def test_parent_keeps_the_reference_with_the_best_f():
    table = [(["cell"], list("abcd"))]
    best = parent_example(list("abcd"), [list("wxyz"), list("abcd")], table, table)
    alone = parent_example(list("abcd"), [list("abcd")], table, table)
    assert best == alone
    assert math.isclose(best[2], 1.0, abs_tol=1e-6)


def test_bleurt_is_not_computed_without_a_checkpoint_and_fails_clearly_with_a_bad_one(tmp_path):
    summary, _ = compute_metrics(["x"], [small_example(True)])
    assert summary["overall"]["bleurt"] == NOT_COMPUTED
    with pytest.raises(ValueError, match="checkpoint folder not found"):
        compute_metrics(["x"], [small_example(True)], bleurt_checkpoint=tmp_path / "missing")
    try:
        import bleurt  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="'bleurt' package is not installed"):
            load_bleurt_scorer(tmp_path)


def test_bleurt_mean_averages_the_three_references_per_example():
    def fake_scorer(references, candidates):
        return [1.0 if r == c else 0.0 for r, c in zip(references, candidates)]

    refs = [["a", "b", "<null>"], ["c", "c", "c"]]
    assert bleurt_mean(fake_scorer, ["A", "c"], refs) == pytest.approx((1 / 3 + 1.0) / 2)


def test_plot_tables_bucket_every_example(fixture_data):
    predictions, examples = fixture_data
    _, per_example = compute_metrics(predictions, examples)
    plots = plot_tables(predictions, examples, per_example)
    # Highlighted cells in the fixture: 4, 1, 2, 2, 2.
    assert [(r["bucket"], r["count"]) for r in plots["by_highlighted_cells"]] == [
        ("1", 1), ("2", 3), ("4", 1)]
    assert sum(r["count"] for r in plots["by_table_size"]) == 5
    for rows in plots.values():
        for row in rows:
            assert set(row) == {"bucket", "count", "bleu", "parent_f"}
            assert 0.0 <= row["parent_f"] <= 1.0


def test_examples_prepared_once_score_two_models_as_scoring_each_alone(fixture_data, monkeypatch):
    """evaluate scores the fine-tuned and the base model on one prepare_examples(): the same scores, and the
    tables are built and tokenised once, not once per model."""
    import table2text.metrics.totto as totto

    _, examples = fixture_data
    tuned, base = [ex["references"][0] for ex in examples], ["zebra quantum"] * len(examples)
    alone = [compute_metrics(tuned, examples), compute_metrics(base, examples)]
    built = []
    real = totto.parent_tables
    monkeypatch.setattr(totto, "parent_tables", lambda example: built.append(1) or real(example))
    prepared = prepare_examples(examples)
    shared = [compute_metrics(tuned, examples, prepared=prepared), compute_metrics(base, examples, prepared=prepared)]
    assert shared == alone
    assert len(built) == len(examples)
    with pytest.raises(ValueError, match="4 prepared examples for 5 examples"):
        compute_metrics(tuned, examples, prepared=prepared[:4])
