"""The key of the base model's cached predictions: the same inputs give the same key, any change another."""

import json
import shutil

import torch

from table2text import eval_cache

SETTINGS = {"max_new_tokens": 64, "batch_size": 16, "cache": "static", "batch_tokens": 0, "fp32_matmul": "tf32"}
CPU = torch.device("cpu")


def key(model_dir, prompts=("a", "b"), dtype=torch.float32, **settings):
    return eval_cache.base_key(eval_cache.base_inputs(model_dir, list(prompts), {**SETTINGS, **settings}, dtype, CPU))


def test_the_key_covers_model_prompts_settings_and_dtype(tiny_model_dir, tmp_path):
    first = key(tiny_model_dir)
    assert key(tiny_model_dir) == first
    assert key(tiny_model_dir, prompts=("a", "c")) != first
    assert key(tiny_model_dir, prompts=("b", "a")) != first
    assert key(tiny_model_dir, max_new_tokens=32) != first
    assert key(tiny_model_dir, fp32_matmul="ieee") != first
    assert key(tiny_model_dir, dtype=torch.bfloat16) != first

    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    assert key(copy) == first  # the files' content, not their folder
    config = json.loads((copy / "config.json").read_text(encoding="utf-8"))
    config["final_logit_softcapping"] = 7.0
    (copy / "config.json").write_text(json.dumps(config), encoding="utf-8")
    assert key(copy) != first


def test_the_key_covers_the_generating_code(tiny_model_dir, monkeypatch):
    first = key(tiny_model_dir)
    real = eval_cache.code_sha256
    monkeypatch.setattr(eval_cache, "code_sha256", lambda: {**real(), "generation.py": "edited"})
    assert key(tiny_model_dir) != first


def test_a_damaged_entry_is_reported_and_ignored(tmp_path, capsys):
    assert eval_cache.load("k", 2, tmp_path) is None  # nothing stored
    eval_cache.store("k", {}, ["one", "two"], tmp_path)
    assert eval_cache.load("k", 2, tmp_path) == ["one", "two"]
    assert eval_cache.load("k", 3, tmp_path) is None  # not the predictions of these prompts
    assert "ignoring the unusable base cache entry" in capsys.readouterr().err
    (tmp_path / "k.json").write_text('{"key": "k", "predictions": ["one"', encoding="utf-8")
    assert eval_cache.load("k", 2, tmp_path) is None
