"""The train stage (stages/train.py) on a tiny random Gemma 3 with the real tokenizer, on CPU."""

from __future__ import annotations

import copy
import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from table2text.training.batching import encode_record
from table2text.params import load_params
from table2text.training.packed_forward import PackedDecoder
from table2text.training.loop import accumulate_gradients, train
from table2text.training.schedule import batch_indices, row_length
from table2text.model.lora import build_model
from table2text.io.readers import read_processed
from table2text.training import loop
from table2text.training import memory
from table2text.training import schedule

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _two_threads():
    torch.set_num_threads(2)  # the CPU is shared


def small_params(**train_overrides) -> dict:
    params = copy.deepcopy(load_params(REPO / "params.yaml"))
    params["train"].update(
        quantization="none", effective_batch=4, max_steps=4, save_steps=2, logging_steps=1,
        learning_rate=1e-2, warmup_ratio=0.0, device="cpu", micro_batch_tokens=128, cpu_micro_batch_tokens=128,
    )
    params["train"].update(train_overrides)
    return params


def test_the_data_order_is_a_seeded_shuffle_per_epoch():
    epoch0 = [i for step in range(3) for i in batch_indices(step, 10, 4, seed=7)]
    assert sorted(epoch0) == list(range(10))  # 3 steps (4 + 4 + 2) cover the epoch once
    assert batch_indices(3, 10, 4, seed=7) != batch_indices(0, 10, 4, seed=7)  # next epoch reshuffled
    assert batch_indices(1, 10, 4, seed=7) == batch_indices(1, 10, 4, seed=7)


def test_a_few_steps_reduce_the_loss_on_a_repeated_batch(tiny_model_dir, real_tokenizer, processed_dir, tmp_path):
    records = read_processed(processed_dir / "train.jsonl")[:4]  # effective batch 4: every step sees all 4
    params = small_params(max_steps=6, save_steps=100)
    stats = train(params, records, None, checkpoint_dir=None, metrics_dir=tmp_path, model_dir=tiny_model_dir, tokenizer=real_tokenizer,
                  progress=False)
    with open(tmp_path / "train" / "plots" / "metrics" / "loss.tsv", encoding="utf-8") as fh:
        losses = [float(row["loss"]) for row in csv.DictReader(fh, delimiter="\t")]
    assert len(losses) == 6
    assert losses[-1] < losses[0] - 0.1
    summary = json.loads((tmp_path / "train.json").read_text(encoding="utf-8"))
    assert summary["steps"] == 6 and summary["samples"] == 24 and summary["final_loss"] == stats["final_loss"]


def test_accumulated_micro_batches_give_the_gradient_of_one_big_batch(tiny_model_dir, real_tokenizer, processed_dir):
    params = small_params()
    params["lora"]["dropout"] = 0.0  # deterministic forward
    examples = [encode_record(real_tokenizer, r) for r in read_processed(processed_dir / "train.jsonl")[:6]]
    torch.manual_seed(0)
    model = build_model(params, tiny_model_dir, torch.device("cpu"), torch.float32)
    for name, p in model.named_parameters():  # LoRA B starts at zero; make the test see all gradients
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    base = model.get_base_model()
    trainable = [p for p in model.parameters() if p.requires_grad]

    forward = PackedDecoder(base.get_decoder())
    longest = row_length([len(ids) for ids, _ in examples])

    def gradients(row_tokens, rows_per_micro_batch):
        model.zero_grad(set_to_none=True)
        loss = accumulate_gradients(forward, base.lm_head.weight, examples, row_tokens, rows_per_micro_batch, 0,
                                    torch.device("cpu"))
        return loss, [p.grad.clone() for p in trainable]

    big_loss, big = gradients(row_tokens=6 * longest, rows_per_micro_batch=1)  # one row holds all six
    small_loss, small = gradients(row_tokens=longest, rows_per_micro_batch=1)  # a micro-batch per row
    assert big_loss == pytest.approx(small_loss, rel=1e-5)
    for a, b in zip(small, big):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * float(b.abs().max()))


def whole_and_resumed(params, records, tmp_path, out, model_dir, tokenizer, crashed):
    """Stats of a run straight through (tmp_path/whole) and of one (tmp_path/resumed) that crashes after
    step 3, is checked by crashed(folder), and is run again: it resumes from the checkpoint of step 2."""
    def run(folder, on_step=None):
        return train(params, records, folder / out, checkpoint_dir=folder / "ckpt", metrics_dir=folder / "metrics",
                     model_dir=model_dir, tokenizer=tokenizer, on_step=on_step, progress=False)

    whole = run(tmp_path / "whole")

    def crash(step):
        if step == 3:  # after the checkpoint of step 2 and one more (lost) step
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed", on_step=crash)
    crashed(tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "metrics")  # as `dvc repro` deletes outputs before a rerun
    return whole, run(tmp_path / "resumed")


def test_an_interrupted_and_resumed_run_ends_with_the_same_adapter(tiny_model_dir, real_tokenizer, processed_dir, tmp_path):
    records = read_processed(processed_dir / "train.jsonl")  # 12 records, effective batch 4: 3 steps an epoch
    params = small_params(max_steps=5, save_steps=2)  # crosses an epoch; dropout on (RNG state restored)

    def crashed(folder):
        assert not (folder / "adapter").exists()

    whole, resumed = whole_and_resumed(params, records, tmp_path, "adapter", tiny_model_dir, real_tokenizer, crashed)

    assert resumed["resumed_from_step"] == 2 and resumed["steps"] == whole["steps"] == 5
    assert resumed["samples"] == whole["samples"]
    a = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) == 2 * 7 * 2  # A and B, 7 modules, 2 layers
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    # the loss curve of the resumed run still covers every step, with the uninterrupted run's values
    def curve(folder):
        with open(folder / "metrics" / "train" / "plots" / "metrics" / "loss.tsv", newline="", encoding="utf-8") as fh:
            return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(fh, delimiter="\t")]

    assert [s for s, _ in curve(tmp_path / "resumed")] == [1, 2, 3, 4, 5]
    assert [v for _, v in curve(tmp_path / "resumed")] == pytest.approx([v for _, v in curve(tmp_path / "whole")])
    # only the last 2 checkpoints are kept
    assert sorted(p.name for p in (tmp_path / "resumed" / "ckpt").iterdir()) == ["step-000004", "step-000005"]
    # what DVC tracks is byte-identical whether the run was resumed or not; how it ran is in the runtime file
    def tracked(folder):
        files = sorted((folder / "adapter").iterdir()) + sorted((folder / "metrics" / "train").rglob("*"))
        return {p.relative_to(folder).as_posix(): p.read_bytes() for p in files + [folder / "metrics" / "train.json"]
                if p.is_file()}

    assert tracked(tmp_path / "resumed") == tracked(tmp_path / "whole")
    assert "metrics/train/plots/metrics/tokens_per_s.tsv" not in tracked(tmp_path / "whole")
    modules = json.loads((tmp_path / "whole" / "adapter" / "adapter_config.json").read_text(encoding="utf-8"))["target_modules"]
    assert modules == sorted(modules)  # not set order, which changes with each process's hash seed
    runtime = json.loads((tmp_path / "resumed" / "metrics" / "runtime" / "train.json").read_text(encoding="utf-8"))
    assert runtime["resumed_from_step"] == 2 and runtime["train_seconds"] > 0 and runtime["tokens_per_s"] > 0
    assert [row["step"] for row in runtime["history"]] == [1, 2, 3, 4, 5]

    info = json.loads((tmp_path / "whole" / "adapter" / "training_info.json").read_text(encoding="utf-8"))
    assert info["steps"] == 5 and info["base_model"]["weights_sha256"] and info["steps_with_nonzero_lr"] == 5
    assert not {"train_seconds", "wall_seconds", "tokens_per_s", "peak_memory_gb", "resumed_from_step"} & set(info)
    assert info["data_sha256"] == loop.records_sha256(records)
    assert (tmp_path / "whole" / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "whole" / "adapter" / "tokenizer.json").is_file()


# ------------------------------------------------------------------------- train.method full
def full_params(**train_overrides) -> dict:
    """small_params for full fine-tuning: every weight trained, at a rate that moves them in a few steps."""
    return small_params(**{"method": "full", "learning_rate": 1e-3, **train_overrides})


def test_full_fine_tuning_trains_every_weight_and_saves_what_it_trained(tiny_model_dir, real_tokenizer,
                                                                       processed_dir, tmp_path):
    from table2text.model.sources import load_model

    records = read_processed(processed_dir / "train.jsonl")[:4]  # effective batch 4: every step sees all 4
    recipe = loop.LoRARecipe(full_params(max_steps=6), records, adapter_dir=tmp_path / "out", checkpoint_dir=None,
                             metrics_dir=tmp_path / "metrics", dvclive=False, model_dir=tiny_model_dir,
                             data_sha256=None, on_step=None, progress=False, tokenizer=real_tokenizer)
    recipe.setup()
    recipe.run()
    stats = recipe.finish()
    losses = [row["loss"] for row in stats["history"]]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.1
    base = dict(load_model(tiny_model_dir, dtype=torch.float32, device=torch.device("cpu")).named_parameters())
    trained = dict(recipe.model.named_parameters())
    assert set(trained) == set(base) and stats["trainable_params"] == sum(p.numel() for p in base.values())
    # every kind of weight moved: the tied embedding/head, attention, MLP and every norm
    kinds = {"embed_tokens", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
             "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
             "post_feedforward_layernorm", "q_norm", "k_norm", "model.norm"}
    assert all(any(k in name for name in base) for k in kinds)
    unchanged = [name for name in base if torch.equal(base[name], trained[name].detach())]
    assert unchanged == []
    assert recipe.base.lm_head.weight is recipe.base.model.embed_tokens.weight  # still one tensor
    # what was saved is what was trained: fp32 safetensors, the tied head once, loading back equal
    out = tmp_path / "out"
    stored = load_file(out / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in stored.values()) and not (out / "adapter_config.json").exists()
    loaded = load_model(out, dtype=torch.float32, device=torch.device("cpu"))
    for name, p in loaded.named_parameters():
        assert torch.equal(p, trained[name].detach()), name
    assert loaded.config.use_cache and (out / "tokenizer.json").is_file()
    info = json.loads((out / "training_info.json").read_text(encoding="utf-8"))
    assert info["method"] == "full" and info["dtype"] == "float32" and info["steps"] == 6
    assert stats["method"] == "full" and stats["cuda_graphs"] is False and stats["autocast"] is None
    assert stats["precision"].startswith("method full: all ") and "fp32 compute" in stats["precision"]


def test_an_interrupted_and_resumed_full_run_ends_with_the_same_weights(tiny_model_dir, real_tokenizer,
                                                                          processed_dir, tmp_path):
    records = read_processed(processed_dir / "train.jsonl")  # 12 records, effective batch 4: 3 steps an epoch
    params = full_params(max_steps=5, save_steps=2)

    def crashed(folder):
        assert sorted(p.name for p in (folder / "ckpt").iterdir()) == ["step-000002"]
        assert (folder / "ckpt" / "step-000002" / "weights.safetensors").is_file()

    whole, resumed = whole_and_resumed(params, records, tmp_path, "out", tiny_model_dir, real_tokenizer, crashed)
    assert resumed["resumed_from_step"] == 2 and resumed["steps"] == whole["steps"] == 5
    assert [row["loss"] for row in resumed["history"]] == pytest.approx([row["loss"] for row in whole["history"]])
    a = load_file(tmp_path / "whole" / "out" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "out" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_a_full_run_does_not_resume_a_lora_checkpoint(tiny_model_dir, real_tokenizer, processed_dir, tmp_path):
    records = read_processed(processed_dir / "train.jsonl")[:4]
    kwargs = dict(checkpoint_dir=tmp_path / "ckpt", metrics_dir=None, model_dir=tiny_model_dir,
                  tokenizer=real_tokenizer, progress=False)
    train(small_params(max_steps=2, save_steps=1), records, None, **kwargs)
    assert train(full_params(max_steps=2, save_steps=1), records, None, **kwargs)["resumed_from_step"] == 0


@pytest.mark.parametrize("scheduler, warmup_ratio, steps, expected", [
    ("cosine", 0.06, 2, 1),    # the earlier demo: ceil(0.06 x 2) = 1 warm-up step at lr 0, then one at 5e-5
    ("cosine", 0.5, 1, 0),     # a one-step run that is all warm-up: the weights never move
    ("linear", 0.0, 3, 3),
    ("constant", 0.5, 4, 4),   # no warm-up in a constant schedule
])
def test_steps_with_nonzero_lr_replays_the_schedule(scheduler, warmup_ratio, steps, expected):
    cfg = {"lr_scheduler": scheduler, "warmup_ratio": warmup_ratio, "learning_rate": 5e-5}
    assert schedule.steps_with_nonzero_lr(cfg, steps) == expected


def test_a_checkpoint_of_other_params_is_not_resumed(tiny_model_dir, real_tokenizer, processed_dir, tmp_path):
    records = read_processed(processed_dir / "train.jsonl")[:4]
    kwargs = dict(checkpoint_dir=tmp_path / "ckpt", metrics_dir=None, model_dir=tiny_model_dir, tokenizer=real_tokenizer, progress=False)
    train(small_params(max_steps=2, save_steps=1), records, None, **kwargs)
    stats = train(small_params(max_steps=2, save_steps=1, learning_rate=2e-2), records, None, **kwargs)
    assert stats["resumed_from_step"] == 0


def test_lora_on_the_real_gemma3_270m_config_has_1898496_parameters(packaged_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    params = load_params(REPO / "params.yaml")["lora"]
    config = AutoConfig.from_pretrained(packaged_model_dir)
    with torch.device("meta"):  # shapes only, no memory
        model = AutoModelForCausalLM.from_config(config)
    lora = LoraConfig(r=8, lora_alpha=params["alpha"], target_modules=params["target_modules"],
                      task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 1_898_496  # 7.6 MB in fp32


def test_nf4_quantised_training_runs_a_step_on_cpu(tiny_model_dir, real_tokenizer, processed_dir):
    pytest.importorskip("bitsandbytes")
    records = read_processed(processed_dir / "train.jsonl")[:4]
    stats = train(small_params(quantization="nf4", max_steps=1), records, None, checkpoint_dir=None,
                  metrics_dir=None, model_dir=tiny_model_dir, tokenizer=real_tokenizer, progress=False)
    assert stats["steps"] == 1 and stats["trainable_params"] > 0
    assert torch.isfinite(torch.tensor(stats["final_loss"]))


def test_nf4_weights_held_dequantised_compute_what_bitsandbytes_computes(tiny_model_dir):
    bnb = pytest.importorskip("bitsandbytes")
    from table2text.model.sources import load_model
    from table2text.model.nf4 import DequantizedLinear, dequantize_frozen_nf4

    model = load_model(tiny_model_dir, quantization="nf4", dtype=torch.float32, device=torch.device("cpu"))
    layer = model.model.layers[0].mlp.up_proj
    assert isinstance(layer, bnb.nn.Linear4bit)
    x = torch.randn(3, 5, layer.in_features, requires_grad=True)  # a training input: more than one row
    expected = layer(x)
    expected.sum().backward()
    expected_grad, x.grad = x.grad.clone(), None

    assert dequantize_frozen_nf4(model) == 2 * 7  # every linear of the two layers
    layer = model.model.layers[0].mlp.up_proj
    assert isinstance(layer, DequantizedLinear) and not layer.weight.requires_grad
    got = layer(x)
    got.sum().backward()
    assert torch.equal(got, expected) and torch.equal(x.grad, expected_grad)


# ------------------------------------------------------------------------------------- memory cap
def test_max_memory_gb_auto_caps_at_the_free_gpu_memory_less_the_stated_margin():
    gib = 2**30
    cap, why = memory.memory_cap("auto", torch.device("cuda", 0), mem_get_info=lambda d: (int(5.2 * gib), 6 * gib))
    assert cap == pytest.approx(5.2 * 0.9 - 0.5)  # 4.18 GiB on a 6 GB laptop card with 5.2 GiB free
    assert "5.20 GiB of 6.00 GiB free on cuda:0, less 10% and 0.5 GiB" in why
    assert memory.memory_cap("auto", torch.device("cpu")) == (0.0, "max_memory_gb=auto: no cap off a GPU")
    assert memory.memory_cap(5, torch.device("cuda", 0))[0] == 5.0  # a number is used as given
    assert memory.memory_cap(0, torch.device("cpu"))[0] == 0.0
    assert memory.auto_memory_cap_gb(0) == 0.0


@pytest.mark.parametrize("bad", ["5GB", -1, True, None, [5]])
def test_a_bad_max_memory_gb_is_named(bad):
    with pytest.raises(ValueError, match="train.max_memory_gb must be auto or a number"):
        memory.memory_cap_setting(bad)


def test_the_memory_model_keeps_long_completions_under_the_cap(packaged_model_dir):
    """Under max_memory_gb=5 (the laptop's card), the budget plus the head chunk of the loss fits whatever
    the completion length: the loss's chunks never hold more than head_chunk_bytes, which the model counts
    (before, it counted 3 x 128 MiB of logits while the loss made chunks of 4,096 positions: +1.45 GiB
    measured at 512 completion positions)."""
    from transformers import AutoConfig

    from table2text.training.batching import activation_bytes_per_token, budget_for_memory, head_chunk_bytes

    config = AutoConfig.from_pretrained(packaged_model_dir)
    weights, lora = 268_098_176 * 2, 1_900_000 * 4 * 3
    fixed = weights + lora + head_chunk_bytes(config.vocab_size, config.final_logit_softcapping)
    per_token = activation_bytes_per_token(config)
    budget = budget_for_memory(4096, 5, fixed_bytes=fixed, bytes_per_token=per_token)
    assert fixed + budget * per_token <= 5 * 2**30
    assert 2048 <= budget < 4096  # two rows of 1,024 still fit


def test_train_logs_the_memory_cap_it_used(tiny_model_dir, processed_dir, capsys):
    records = read_processed(processed_dir / "train.jsonl")
    stats = train(small_params(max_steps=1, max_memory_gb=2), records, None, checkpoint_dir=None,
                  metrics_dir=None, model_dir=tiny_model_dir, progress=False)
    assert "train: memory cap 2.00 GiB (max_memory_gb=2) -> micro_batch_tokens=128" in capsys.readouterr().out
    assert stats["memory_cap_gb"] == 2.0
