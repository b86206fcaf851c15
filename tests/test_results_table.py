"""bench/results_table.py: the README results table is the one the committed JSON gives, and every
plot declared in bench/results/rows/dvc.yaml has its file and columns."""

import csv
from pathlib import Path

import yaml

from bench.results_table import collect, markdown, paired_bootstrap

ROOT = Path(__file__).resolve().parents[1]
ROWS = ROOT / "bench" / "results" / "rows"


def test_the_readme_table_is_the_one_the_committed_results_give():
    rows, missing, described = collect(ROWS)
    assert rows[0]["name"] == "zero-shot" and len(rows) > 1
    assert markdown(rows, described) in (ROOT / "README.md").read_text(encoding="utf-8")
    for name in missing:  # a row without results is named in the README as not run
        assert name in (ROOT / "README.md").read_text(encoding="utf-8")


def test_every_declared_plot_reads_an_existing_file_and_column():
    plots = yaml.safe_load((ROWS / "dvc.yaml").read_text(encoding="utf-8"))["plots"]
    assert {name for plot in plots for name in plot} >= {"rows_training_loss", "rows_final_scores_fetaqa"}
    for plot in plots:
        (spec,) = plot.values()
        for file, column in spec["y"].items():
            with open(ROWS / file, newline="", encoding="utf-8") as fh:
                header = next(csv.reader(fh))
            assert column in header and spec["x"] in header, (file, column, spec["x"], header)


def test_paired_bootstrap_of_a_constant_difference_is_that_difference():
    a = {str(i): 0.5 + i / 100 for i in range(50)}
    b = {k: v - 0.1 for k, v in a.items()}
    result = paired_bootstrap(a, b, rounds=200)
    assert result["examples"] == 50
    assert abs(result["mean"] - 0.1) < 1e-12 and abs(result["low"] - 0.1) < 1e-12 and abs(result["high"] - 0.1) < 1e-12


def test_paired_bootstrap_interval_covers_zero_for_a_symmetric_difference():
    a = {str(i): float(i % 2) for i in range(100)}
    b = {str(i): float((i + 1) % 2) for i in range(100)}
    result = paired_bootstrap(a, b, rounds=500)
    assert result["mean"] == 0 and result["low"] < 0 < result["high"]


def test_the_published_t5_rows_hold_the_peers_readme_numbers():
    rows, _, _ = collect(ROWS)
    peers = {r["name"]: r["fetaqa"] for r in rows if r.get("peer")}
    published = {"t5-small": (30.48, 0.542), "t5-base": (33.08, 0.583), "t5-large": (33.85, 0.596)}
    assert set(peers) == set(published)
    for name, (bleu, parent_f) in published.items():
        assert peers[name]["count"] == 500
        assert round(peers[name]["bleu"], 2) == bleu and round(peers[name]["parent_f"], 3) == parent_f


def test_a_row_without_a_totto_run_says_why():
    rows, _, described = collect(ROWS)
    table = markdown(rows, described)
    assert "| full-q-3ep-beam4 | not run: ToTTo's examples hold no question | | |" in table
    assert "| full-nq-3ep-beam4 | 30.1 · " in table  # its ToTTo run exists
