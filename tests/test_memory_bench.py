"""bench/memory_bench.py on the CPU with the tiny model: a smoke test that it runs the train step under a
cap and under auto, and writes its results (the real measurement is on a GPU)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bench import memory_bench

REPO = Path(__file__).resolve().parents[1]


def test_synthetic_records_have_at_least_the_asked_completion_tokens(real_tokenizer):
    records = memory_bench.synthetic_records(real_tokenizer, 3, prompt_tokens=20, completion_tokens=600)
    assert len(records) == 3 and len({r["completion"] for r in records}) == 3
    for r in records:
        assert len(real_tokenizer(r["completion"], add_special_tokens=False).input_ids) >= 600


def test_the_bench_runs_on_the_cpu_and_reports_each_run(tiny_model_dir, tmp_path):
    torch.set_num_threads(2)
    out = tmp_path / "memory.json"
    code = memory_bench.main(["--out", str(out), "--params", str(REPO / "params.yaml"), "--model", str(tiny_model_dir),
                              "--device", "cpu", "--quantization", "none", "--cap-gb", "2",
                              "--completion-tokens", "40", "--prompt-tokens", "16", "--examples", "2", "--steps", "1"])
    assert code == 0
    doc = json.loads(out.read_text(encoding="utf-8"))
    capped, auto = doc["results"]
    assert capped["name"] == "cap2-completion40" and capped["cap_gb"] == 2.0 and capped["completion_tokens_min"] >= 40
    assert auto["max_memory_gb"] == "auto" and auto["cap_gb"] == 0.0  # no cap off a GPU
    assert capped["peak_kind"] == "cpu_max_rss" and capped["under_cap"] is None  # RSS is not what the cap bounds
