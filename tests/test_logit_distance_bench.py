"""bench.logit_distance_bench: every chunk size measured, the same distance whatever the chunking."""

import json

from bench import logit_distance_bench


def test_the_bench_measures_each_chunk_size_and_finds_the_same_distance(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(logit_distance_bench, "OUT_DIR", tmp_path)
    # 16 positions x 4,096 columns: rows of 16 KiB, so 0.0625 MiB chunks hold 4 rows
    logit_distance_bench.main(["--positions", "16", "--vocab", "4096", "--repeats", "2",
                               "--chunk-mib", "0", "0.0625"])
    (path,) = tmp_path.glob("*-logit-distance.json")
    doc = json.loads(path.read_text(encoding="utf-8"))
    sizes = [r["chunk_bytes"] for r in doc["results"]]
    assert sizes[:2] == [0, 65536] and doc["default_chunk_bytes"] in sizes
    assert sum(r["default"] for r in doc["results"]) == 1
    assert all(r["same_top1_and_spread"] and r["mean_kl_rel_diff_vs_whole"] < 1e-9 for r in doc["results"])
    assert all(r["positions"] == 16 and r["seconds"] > 0 for r in doc["results"])
    assert doc["command"].endswith("--chunk-mib 0 0.0625") and doc["repeats"] == 2
    assert "| whole block |" in capsys.readouterr().out
