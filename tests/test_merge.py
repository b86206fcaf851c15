"""The merge stage (stages/merge.py), run end to end after the train stage on a tiny random Gemma 3."""

from __future__ import annotations

import copy
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
from table2text.model.finetuned import AdapterError
from stages import train as train_stage
from table2text.model import merging

REPO = Path(__file__).resolve().parents[1]


def trained_and_merged(folder: Path, tiny_model_dir: Path, train: dict, merge: dict) -> Path:
    """`folder` made a project where `python -m stages.train` and `python -m stages.merge` have run on the
    tiny model, with these train and merge settings over params.yaml's."""
    write_processed(folder / "data" / "processed", n_train=8, n_validation=4)
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    params["model"]["name"] = str(tiny_model_dir)
    params["train"].update(quantization="none", effective_batch=4, max_steps=3, save_steps=2, warmup_ratio=0.0,
                           device="cpu", **train)
    params["merge"].update(device="cpu", verify_prompts=4, **merge)
    (folder / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    torch.set_num_threads(2)
    cwd = os.getcwd()
    os.chdir(folder)  # the stages read and write paths relative to the project root
    try:
        train_stage.main(["--params", "params.yaml"])
        merge_stage.main(["--params", "params.yaml"])
    finally:
        os.chdir(cwd)
    return folder


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A project folder where the LoRA train stage and the merge stage have run (tiny model)."""
    return trained_and_merged(tmp_path_factory.mktemp("project"), tiny_model_dir, {"learning_rate": 1e-2}, {})


def test_merged_model_reproduces_the_trained_model(pipeline_dir):
    metrics = json.loads((pipeline_dir / "metrics" / "merge.json").read_text(encoding="utf-8"))
    assert metrics["passed"] and metrics["base"] == "trained" and metrics["stored_dtype"] == "bfloat16"
    effect, error = metrics["adapter_effect"], metrics["merge_error"]
    for distance in (effect, error):
        assert {"max_logit_diff", "mean_kl", "top1_agreement"} <= set(distance)
        assert 0 <= distance["p99_logit_diff"] <= distance["p999_logit_diff"] <= distance["max_logit_diff"]
        assert distance["positions"] > 100 and distance["finite"]
    # the adapter moves the model far; the merged checkpoint stays a small fraction of that from it
    assert error["mean_kl"] <= metrics["max_error_ratio"] * effect["mean_kl"]
    assert metrics["error_ratio"] == pytest.approx(error["mean_kl"] / effect["mean_kl"])
    info = json.loads((pipeline_dir / "models" / "merged" / "merge_info.json").read_text(encoding="utf-8"))
    assert info["base"] == "trained" and info["stored_dtype"] == "bfloat16"
    assert not any(k in metrics for k in ("seconds", "wall_seconds")), "no timings in a DVC-tracked metric"


def stated_model(pipeline_dir, base="trained"):
    from table2text.model import finetuned

    params = yaml.safe_load((pipeline_dir / "params.yaml").read_text(encoding="utf-8"))
    return finetuned.load_adapter_model(pipeline_dir / "models" / "adapter", Path(params["model"]["name"]),
                                        torch.device("cpu"), torch.float32, base=base)


def check_prompts(pipeline_dir, n=4):
    from table2text.model.sources import load_tokenizer

    params = yaml.safe_load((pipeline_dir / "params.yaml").read_text(encoding="utf-8"))
    tokenizer = load_tokenizer(Path(params["model"]["name"]))
    lines = (pipeline_dir / "data" / "processed" / "validation.jsonl").read_text(encoding="utf-8").splitlines()
    return [tokenizer(json.loads(line)["prompt"]).input_ids for line in lines[:n]]


def test_the_plain_base_fails_the_check(pipeline_dir):
    # What the old gate (max logit diff / top-1 agreement) passed: a "merged" model without the adapter.
    stated = stated_model(pipeline_dir)
    base = copy.deepcopy(stated).unload()  # the base weights, LoRA layers removed unmerged
    check = merging.StatedReference(stated, check_prompts(pipeline_dir), torch.device("cpu")).measure(base)
    assert check["error_ratio"] == pytest.approx(1.0)
    assert "do not hold the adapter" in merging.fidelity_problem(check, 0.01)


def test_a_half_applied_adapter_fails_the_check(pipeline_dir):
    stated = stated_model(pipeline_dir)
    half = copy.deepcopy(stated)
    for name, weight in half.named_parameters():
        if "lora_B" in name:
            weight.data.mul_(0.5)
    half = half.merge_and_unload()
    check = merging.StatedReference(stated, check_prompts(pipeline_dir), torch.device("cpu")).measure(half)
    # KL grows about with the square of the missing half (0.25); this adapter's large effect measured 0.09
    assert 0.05 < check["error_ratio"] < 0.5
    assert merging.fidelity_problem(check, 0.01) is not None


def test_the_full_merge_passes_the_check(pipeline_dir):
    stated = stated_model(pipeline_dir)
    merged = copy.deepcopy(stated).merge_and_unload()
    check = merging.StatedReference(stated, check_prompts(pipeline_dir), torch.device("cpu")).measure(merged)
    assert check["error_ratio"] < 1e-6 and merging.fidelity_problem(check, 0.01) is None


@pytest.fixture(scope="module")
def tiny_adapter(pipeline_dir, tmp_path_factory) -> Path:
    """The trained adapter with its B matrices scaled by 1e-4: a delta far below bf16's resolution of the
    base weights (the demo's 2-step adapter is like this)."""
    from safetensors.torch import load_file, save_file

    adapter = tmp_path_factory.mktemp("tiny-adapter") / "adapter"
    shutil.copytree(pipeline_dir / "models" / "adapter", adapter)
    weights = load_file(adapter / "adapter_model.safetensors")
    save_file({k: v * 1e-4 if "lora_B" in k else v for k, v in weights.items()}, adapter / "adapter_model.safetensors")
    return adapter


def test_bf16_is_refused_for_a_delta_it_cannot_hold(pipeline_dir, tiny_adapter, tmp_path):
    params = yaml.safe_load((pipeline_dir / "params.yaml").read_text(encoding="utf-8"))
    params["merge"]["dtype"] = "bfloat16"
    with pytest.raises(merging.MergeError, match="do not hold the adapter"):
        merging.merge(params, tiny_adapter, tmp_path / "merged", prompts_of(pipeline_dir), metrics_file=None)
    assert not (tmp_path / "merged").exists() and not list(tmp_path.glob(".merged-*"))


def test_auto_stores_float32_with_the_reason_when_bf16_cannot_hold_the_delta(pipeline_dir, tiny_adapter, tmp_path):
    params = yaml.safe_load((pipeline_dir / "params.yaml").read_text(encoding="utf-8"))
    params["merge"]["dtype"] = "auto"
    metrics = merging.merge(params, tiny_adapter, tmp_path / "merged", prompts_of(pipeline_dir),
                                metrics_file=None)
    assert metrics["passed"] and metrics["stored_dtype"] == "float32"
    assert metrics["reason"].startswith("bfloat16 refused:") and metrics["attempts"][0]["error_ratio"] > 0.01
    with safe_open(tmp_path / "merged" / "model.safetensors", framework="pt") as fh:
        assert {fh.get_slice(k).get_dtype() for k in fh.keys()} == {"F32"}


def prompts_of(pipeline_dir) -> list[str]:
    return [json.loads(line)["prompt"] for line in
            (pipeline_dir / "data" / "processed" / "validation.jsonl").read_text(encoding="utf-8").splitlines()]


def test_merged_model_is_bf16_with_every_end_token(pipeline_dir):
    merged = pipeline_dir / "models" / "merged"
    with safe_open(merged / "model.safetensors", framework="pt") as fh:
        dtypes = {fh.get_slice(k).get_dtype() for k in fh.keys()}
        assert not any("lora" in k for k in fh.keys())  # merged and unloaded
    assert dtypes == {"BF16"}
    generation = json.loads((merged / "generation_config.json").read_text(encoding="utf-8"))
    assert generation["eos_token_id"] == [1, 106]  # <eos> and <end_of_turn>
    assert (merged / "tokenizer.json").is_file()


def test_merge_refuses_an_adapter_trained_on_another_base(pipeline_dir, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(pipeline_dir / "models" / "adapter", adapter)
    info = json.loads((adapter / "training_info.json").read_text(encoding="utf-8"))
    info["base_model"]["weights_sha256"] = "0" * 64
    (adapter / "training_info.json").write_text(json.dumps(info), encoding="utf-8")
    params = yaml.safe_load((pipeline_dir / "params.yaml").read_text(encoding="utf-8"))
    with pytest.raises(AdapterError, match="trained on base weights sha256 0000"):
        merging.merge(params, adapter, tmp_path / "merged", ["x"], metrics_file=None)
    assert not (tmp_path / "merged").exists()


def test_float32_merge_is_exact(pipeline_dir, tmp_path):
    # merge.dtype float32: no rounding of base + adapter, so the check sees only fp32 arithmetic noise
    params = yaml.safe_load((pipeline_dir / "params.yaml").read_text(encoding="utf-8"))
    params["merge"]["dtype"] = "float32"
    metrics = merging.merge(params, pipeline_dir / "models" / "adapter", tmp_path / "merged",
                                prompts_of(pipeline_dir), metrics_file=None)
    bf16 = json.loads((pipeline_dir / "metrics" / "merge.json").read_text(encoding="utf-8"))
    assert metrics["passed"] and metrics["merge_error"]["top1_agreement"] == 1.0
    assert metrics["merge_error"]["max_logit_diff"] < 1e-3 < bf16["merge_error"]["max_logit_diff"]
    with safe_open(tmp_path / "merged" / "model.safetensors", framework="pt") as fh:
        assert {fh.get_slice(k).get_dtype() for k in fh.keys()} == {"F32"}


# ------------------------------------------------------------------------- train.method full
@pytest.fixture(scope="module")
def full_pipeline_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A project folder where the train stage ran with train.method full and the merge stage after it."""
    return trained_and_merged(tmp_path_factory.mktemp("project-full"), tiny_model_dir,
                              {"method": "full", "learning_rate": 1e-3}, {"dtype": "float32"})


@torch.no_grad()
def test_the_merge_of_a_full_run_stores_the_trained_model(full_pipeline_dir, tiny_model_dir):
    from table2text.model.sources import load_model

    cpu = torch.device("cpu")
    trained = load_model(full_pipeline_dir / "models" / "adapter", dtype=torch.float32, device=cpu).eval()
    merged = load_model(full_pipeline_dir / "models" / "merged", dtype=torch.float32, device=cpu).eval()
    base = load_model(tiny_model_dir, dtype=torch.float32, device=cpu).eval()
    for ids in check_prompts(full_pipeline_dir):
        x = torch.tensor([ids])
        assert torch.equal(merged(input_ids=x).logits, trained(input_ids=x).logits)
        assert not torch.equal(base(input_ids=x).logits, trained(input_ids=x).logits)  # training moved it
    metrics = json.loads((full_pipeline_dir / "metrics" / "merge.json").read_text(encoding="utf-8"))
    assert metrics["passed"] and metrics["stored_dtype"] == "float32" and metrics["base"] == "trained"
    # adapter_effect: the base against the trained model; merge_error: the stored weights against it (none)
    assert metrics["adapter_effect"]["mean_kl"] > 0 and metrics["merge_error"]["mean_kl"] == 0
    assert metrics["merge_error"]["top1_agreement"] == 1.0 and metrics["error_ratio"] == 0
    assert json.loads((full_pipeline_dir / "models" / "merged" / "merge_info.json").read_text(
        encoding="utf-8"))["stored_dtype"] == "float32"
    assert merged.config.use_cache


def test_the_merge_of_a_full_run_keeps_the_lora_metrics_keys(full_pipeline_dir, pipeline_dir):
    full = json.loads((full_pipeline_dir / "metrics" / "merge.json").read_text(encoding="utf-8"))
    lora = json.loads((pipeline_dir / "metrics" / "merge.json").read_text(encoding="utf-8"))
    assert set(full) == set(lora)
    assert set(full["adapter_effect"]) == set(lora["adapter_effect"]) and set(full["merge_error"]) == set(lora["merge_error"])


def test_auto_stores_a_full_run_in_bf16_only_when_the_check_proves_it(full_pipeline_dir, tmp_path):
    params = yaml.safe_load((full_pipeline_dir / "params.yaml").read_text(encoding="utf-8"))
    params["merge"]["dtype"] = "auto"
    metrics = merging.merge(params, full_pipeline_dir / "models" / "adapter", tmp_path / "merged",
                            prompts_of(full_pipeline_dir), metrics_file=None)
    first = metrics["attempts"][0]
    assert first["dtype"] == "bfloat16" and metrics["passed"]
    # bf16 kept when its merge error is within the bound, else float32 with bf16's refusal as the reason
    assert (metrics["stored_dtype"] == "bfloat16") == (first["problem"] is None)
    assert first["error_ratio"] > 0  # bf16 rounds fp32 weights: never exact


def test_merge_base_original_is_refused_for_a_full_run(full_pipeline_dir, tmp_path):
    params = yaml.safe_load((full_pipeline_dir / "params.yaml").read_text(encoding="utf-8"))
    params["merge"]["base"] = "original"
    with pytest.raises(merging.MergeError, match="holds a fully fine-tuned model .* set merge.base: trained"):
        merging.merge(params, full_pipeline_dir / "models" / "adapter", tmp_path / "merged",
                      prompts_of(full_pipeline_dir), metrics_file=None)


def test_the_stated_reference_is_computed_once_for_every_candidate():
    """dtype auto checks bf16, then float32: both against one StatedReference, so the stated model and the
    base run once a prompt, and each candidate once a prompt."""
    import types

    class Counting(torch.nn.Module):  # logits: the ids' one-hot times a scale, enough for the distances
        def __init__(self, scale):
            super().__init__()
            self.scale, self.calls = scale, 0

        def forward(self, input_ids):
            self.calls += 1
            return types.SimpleNamespace(logits=torch.nn.functional.one_hot(input_ids, 11).float() * self.scale)

    prompts, cpu = [[1, 2, 3], [4, 5]], torch.device("cpu")
    stated, base = Counting(2.0), Counting(1.0)
    reference = merging.StatedReference(stated, prompts, cpu, base_model=base)
    same, closer = Counting(2.0), Counting(1.5)
    assert reference.measure(same)["error_ratio"] == 0
    assert 0 < reference.measure(closer)["error_ratio"] < 1  # nearer the stated model than the base is
    assert (stated.calls, base.calls, same.calls, closer.calls) == (2, 2, 2, 2)
    assert reference.measure(closer) == merging.StatedReference(stated, prompts, cpu, base_model=base).measure(closer)
