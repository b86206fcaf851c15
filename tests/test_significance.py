"""bench/significance.py: the paired bootstrap of PARENT F and BLEU resamples the scorer's own numbers."""

import pytest

from bench.significance import bleu_from_statistics, bleu_statistics, paired_bootstrap, per_example
from table2text.metrics.totto import compute_metrics

REFERENCES = [["Alpha came out in 2001 on the first label."], ["Beta came out in 2004 with two songs."],
              ["Gamma was the last album, in 2009."], ["Delta won the award in 2011."]]


def examples():
    table = [[{"value": "Year", "is_header": True, "column_span": 1, "row_span": 1}],
             [{"value": "2001", "is_header": False, "column_span": 1, "row_span": 1}]]
    return [{"id": str(i), "table": table, "highlighted_cells": [[1, 0]], "page_title": "P", "section_title": "S",
             "section_text": "", "references": refs, "overlap": None} for i, refs in enumerate(REFERENCES)]


def test_bleu_from_per_example_statistics_is_the_scorers_corpus_bleu():
    predictions = ["Alpha came out in 2001.", "Beta came out with two songs.", "Gamma, 2009.", "Delta won in 2011."]
    summary, _ = compute_metrics(predictions, examples())
    stats = bleu_statistics(predictions, REFERENCES)
    assert len(stats) == 4 and all(len(s) == 10 for s in stats)
    assert bleu_from_statistics(stats) == pytest.approx(summary["overall"]["bleu"], abs=1e-9)


def test_a_system_against_itself_differs_by_nothing():
    predictions = ["Alpha came out in 2001.", "Beta came out.", "Gamma, 2009.", "Delta won in 2011."]
    exs = examples()
    _, scored = compute_metrics(predictions, exs)
    a = per_example(predictions, exs, scored)
    result = paired_bootstrap(a, a, rounds=100)
    assert result["examples"] == 4
    for metric in ("parent_f", "bleu"):
        assert result[metric] == {"mean": 0.0, "low": 0.0, "high": 0.0}


def test_the_better_system_is_ahead_on_both_metrics():
    exs = examples()
    good = [r[0] for r in REFERENCES]
    bad = ["The table has a year.", "It is a list.", "Something happened.", "A thing was won."]
    a = per_example(good, exs, compute_metrics(good, exs)[1])
    b = per_example(bad, exs, compute_metrics(bad, exs)[1])
    result = paired_bootstrap(a, b, rounds=200)
    assert result["parent_f"]["low"] > 0 and result["bleu"]["low"] > 50
    assert result["bleu"]["mean"] == pytest.approx(compute_metrics(good, exs)[0]["overall"]["bleu"]
                                                   - compute_metrics(bad, exs)[0]["overall"]["bleu"])


def test_no_shared_ids_is_an_error():
    with pytest.raises(ValueError, match="share no example ids"):
        paired_bootstrap({"1": {"parent_f": 1.0, "bleu_stats": [0] * 10}}, {"2": {"parent_f": 1.0, "bleu_stats": [0] * 10}})


def test_the_command_reads_predictions_files_and_peer_records(tmp_path, capsys):
    import gzip
    import json

    from bench import significance

    exs, better = examples(), ["Alpha came out in 2001 on the first label.", "Beta came out in 2004.",
                               "Gamma was the last album.", "Delta won the award in 2011."]
    scored = compute_metrics(better, exs)[1]
    rows = [{"id": ex["id"], "prediction": p, "references": ex["references"], "parent": s}
            for ex, p, s in zip(exs, better, scored)]
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as fh:  # an evaluate stage's predictions
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    worse = ["Alpha.", "Beta.", "Gamma.", "Delta."]
    peer = {"per_example": per_example(worse, exs, compute_metrics(worse, exs)[1])}
    (tmp_path / "peer.json").write_text(json.dumps(peer), encoding="utf-8")  # bench/score_peers.py's record
    result = significance.main([str(tmp_path / "a.jsonl.gz"), str(tmp_path / "peer.json"), "--rounds", "50"])
    assert result["examples"] == 4 and result["parent_f"]["mean"] > 0 and result["bleu"]["mean"] > 0
    assert "a.jsonl.gz - peer.json on 4 examples" in capsys.readouterr().out
