"""The merge stage (stages/merge.py), run end to end after the train stage on a tiny random Gemma 3."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from conftest import write_processed
from stages import merge as merge_stage
from stages import train as train_stage

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A project folder where `python -m stages.train` and `python -m stages.merge` have run (tiny model)."""
    folder = tmp_path_factory.mktemp("project")
    write_processed(folder / "data" / "processed", n_train=8, n_validation=4)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["model"]["name"] = str(tiny_model_dir)
    params["train"].update(quantization="none", effective_batch=4, max_steps=3, save_steps=2, learning_rate=1e-2,
                           warmup_ratio=0.0, device="cpu")
    params["merge"].update(device="cpu", verify_prompts=4)
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    torch.set_num_threads(2)
    cwd = os.getcwd()
    os.chdir(folder)  # the stages read and write paths relative to the project root
    try:
        train_stage.main(["--params", "params.yaml"])
        merge_stage.main(["--params", "params.yaml"])
    finally:
        os.chdir(cwd)
    return folder


def test_merged_model_equals_base_plus_adapter(pipeline_dir):
    metrics = json.loads((pipeline_dir / "metrics" / "merge.json").read_text())
    assert metrics["passed"] and metrics["finite"]
    assert metrics["max_logit_diff"] <= metrics["max_logit_diff_allowed"]
    # the spread of the differences is reported beside the maximum that gates
    assert 0 <= metrics["p99_logit_diff"] <= metrics["p999_logit_diff"] <= metrics["max_logit_diff"]
    assert 0 <= metrics["mean_kl"] < 1e-2
    assert metrics["top1_agreement"] >= metrics["min_top1_agreement"]
    assert metrics["positions"] > 100


def test_merged_model_is_bf16_with_every_end_token(pipeline_dir):
    merged = pipeline_dir / "models" / "merged"
    with safe_open(merged / "model.safetensors", framework="pt") as fh:
        dtypes = {fh.get_slice(k).get_dtype() for k in fh.keys()}
        assert not any("lora" in k for k in fh.keys())  # merged and unloaded
    assert dtypes == {"BF16"}
    generation = json.loads((merged / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [1, 106]  # <eos> and <end_of_turn>
    assert (merged / "tokenizer.json").is_file()


def test_merge_refuses_an_adapter_trained_on_another_base(pipeline_dir, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(pipeline_dir / "models" / "adapter", adapter)
    info = json.loads((adapter / "training_info.json").read_text())
    info["base_model"]["weights_sha256"] = "0" * 64
    (adapter / "training_info.json").write_text(json.dumps(info))
    params = yaml.safe_load((pipeline_dir / "params.yaml").read_text())
    with pytest.raises(merge_stage.MergeError, match="trained on base weights sha256 0000"):
        merge_stage.merge(params, adapter, tmp_path / "merged", ["x"], metrics_file=None)
    assert not (tmp_path / "merged").exists()


def test_float32_merge_is_exact(pipeline_dir, tmp_path):
    # merge.dtype float32: no rounding of base + adapter, so the check sees only fp32 arithmetic noise
    params = yaml.safe_load((pipeline_dir / "params.yaml").read_text())
    params["merge"]["dtype"] = "float32"
    prompts = [json.loads(line)["prompt"] for line in
               (pipeline_dir / "data" / "processed" / "validation.jsonl").read_text().splitlines()]
    metrics = merge_stage.merge(params, pipeline_dir / "models" / "adapter", tmp_path / "merged", prompts,
                                metrics_file=None)
    bf16 = json.loads((pipeline_dir / "metrics" / "merge.json").read_text())
    assert metrics["passed"] and metrics["top1_agreement"] == 1.0
    assert metrics["max_logit_diff"] < 1e-3 < bf16["max_logit_diff"]  # bf16 rounding is what moves logits
    with safe_open(tmp_path / "merged" / "model.safetensors", framework="pt") as fh:
        assert {fh.get_slice(k).get_dtype() for k in fh.keys()} == {"F32"}
