"""table2text/model/finetuned.py: the model that was trained is the adapter on the base as training saw it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from table2text.model import finetuned
from table2text.model.sources import load_model
from table2text.model.nf4 import dequantize_frozen_nf4
from table2text.io.readers import read_processed
from table2text.training.loop import train
from test_train import small_params

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def nf4_adapter(tmp_path_factory, tiny_model_dir, real_tokenizer):
    """An adapter trained by the train stage's own loop under NF4 QLoRA (tiny model, CPU)."""
    pytest.importorskip("bitsandbytes")
    from conftest import write_processed

    folder = tmp_path_factory.mktemp("nf4")
    processed = write_processed(folder / "processed", n_train=4, n_validation=2)
    adapter = folder / "adapter"
    train(small_params(quantization="nf4", max_steps=2, learning_rate=1e-2), read_processed(processed / "train.jsonl"),
          adapter, checkpoint_dir=None, metrics_dir=None, model_dir=tiny_model_dir, tokenizer=real_tokenizer,
          progress=False)
    return adapter


def linear_weights(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("proj.weight")}


def test_the_trained_base_is_the_nf4_dequantised_base_training_computed_with(nf4_adapter, tiny_model_dir):
    info = finetuned.read_training_info(nf4_adapter)
    quantization, train_dtype = finetuned.training_base(info)
    assert quantization == "nf4" and train_dtype == getattr(torch, info["dtype"])
    trained = finetuned.load_base(tiny_model_dir, info, "trained", CPU, torch.float32)
    # what stages.train.build_model holds: load in NF4 in the compute dtype, dequantise once
    expected = load_model(tiny_model_dir, quantization="nf4", dtype=train_dtype, device=CPU)
    dequantize_frozen_nf4(expected)
    got, want = linear_weights(trained), {n: w.float() for n, w in linear_weights(expected).items()}
    assert got.keys() == want.keys() and len(got) == 14
    assert all(torch.equal(got[n], want[n]) for n in got)
    assert not hasattr(trained.config, "quantization_config")  # a plain model: saved without bitsandbytes

    original = linear_weights(finetuned.load_base(tiny_model_dir, info, "original", CPU, torch.float32))
    assert not any(torch.equal(got[n], original[n]) for n in got), "NF4 moves every quantised weight"


def test_the_adapter_goes_on_the_trained_base_by_default(nf4_adapter, tiny_model_dir):
    trained = finetuned.load_adapter_model(nf4_adapter, tiny_model_dir, CPU, torch.float32)
    original = finetuned.load_adapter_model(nf4_adapter, tiny_model_dir, CPU, torch.float32, base="original")
    x = torch.tensor([[2, 100, 200, 300]])
    with torch.no_grad():
        assert not torch.allclose(trained(input_ids=x).logits, original(input_ids=x).logits)
    name = next(n for n, _ in trained.named_parameters() if "lora_B" in n)
    assert dict(trained.named_parameters())[name].abs().sum() > 0  # the trained adapter, not a fresh one


def test_a_trained_base_needs_the_training_record(nf4_adapter, tiny_model_dir, tmp_path):
    info = {"base_model": {"name": "x"}}  # an adapter made elsewhere: no params.train, no dtype
    assert not finetuned.records_training_base(info)
    with pytest.raises(finetuned.AdapterError, match="cannot rebuild the base as training saw it"):
        finetuned.load_base(tiny_model_dir, info, "trained", CPU, torch.float32)
    with pytest.raises(finetuned.AdapterError, match="base must be one of"):
        finetuned.load_base(tiny_model_dir, info, "nf4", CPU, torch.float32)


@pytest.mark.parametrize("content, message", [
    (None, "training_info.json: missing"),
    ('{"base_model": ', "training_info.json:1: invalid JSON"),
    ("[1, 2]", "training_info.json: expected a JSON object"),
])
def test_training_info_problems_name_the_file(tmp_path, content, message):
    if content is not None:
        (tmp_path / "training_info.json").write_text(content, encoding="utf-8")
    with pytest.raises(finetuned.AdapterError, match=message):
        finetuned.read_training_info(tmp_path)
    if content is None:
        assert finetuned.read_training_info(tmp_path, required=False) is None


def test_training_info_records_the_base_training_held(nf4_adapter):
    info = json.loads((nf4_adapter / "training_info.json").read_text(encoding="utf-8"))
    assert info["params"]["train"]["quantization"] == "nf4" and info["dtype"] in ("float32", "bfloat16")
    assert finetuned.records_training_base(info)


def test_a_full_run_is_loaded_as_the_trained_model_and_not_as_an_adapter(tiny_model_dir, real_tokenizer, tmp_path):
    from conftest import write_processed

    processed = write_processed(tmp_path / "processed", n_train=4, n_validation=2)
    out = tmp_path / "out"
    train(small_params(method="full", max_steps=2, learning_rate=1e-3), read_processed(processed / "train.jsonl"),
          out, checkpoint_dir=None, metrics_dir=None, model_dir=tiny_model_dir, tokenizer=real_tokenizer,
          progress=False)
    assert finetuned.training_method(finetuned.read_training_info(out)) == "full"
    model = finetuned.load_trained_model(out, tiny_model_dir, CPU, torch.float32)  # what eval.model adapter loads
    saved = load_model(out, dtype=torch.float32, device=CPU)
    base = load_model(tiny_model_dir, dtype=torch.float32, device=CPU)
    for (name, p), q, b in zip(model.named_parameters(), saved.parameters(), base.parameters()):
        assert torch.equal(p, q) and not torch.equal(p, b), name
    with pytest.raises(finetuned.AdapterError, match="holds a fully fine-tuned model"):
        finetuned.load_adapter_model(out, tiny_model_dir, CPU, torch.float32)
    other = tmp_path / "other-base"  # the base identity is checked as for an adapter
    shutil.copytree(tiny_model_dir, other)
    with torch.no_grad():
        base.model.norm.weight.add_(1.0)
    base.save_pretrained(other, safe_serialization=True)
    with pytest.raises(finetuned.AdapterError, match="trained on base weights"):
        finetuned.load_trained_model(out, other, CPU, torch.float32)
