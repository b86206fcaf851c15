"""LoRA fused per module and computed in bf16 (table2text/training/fused_lora.py): the same function, the
same parameters and adapter file as PEFT's own modules."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from table2text.io.readers import read_processed
from table2text.model.lora import build_model, save_adapter
from table2text.params import load_params
from table2text.training import fused_lora
from table2text.training.loop import train

REPO = Path(__file__).resolve().parents[1]
IDS = torch.randint(5, 1000, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def _two_threads():
    torch.set_num_threads(2)  # the CPU is shared


def params_with(dropout=0.0, target_modules=None, **train):
    params = copy.deepcopy(load_params(REPO / "params.yaml"))
    # without levers named here: PEFT's own path (the defaults fuse and compute in the base's dtype)
    params["train"].update(quantization="none", device="cpu", **{"fuse_lora": False, "lora_compute_dtype": "float32",
                                                                 **train})
    params["lora"]["dropout"] = dropout
    if target_modules:
        params["lora"]["target_modules"] = target_modules
    return params


def model_with(model_dir, dtype=torch.float32, dropout=0.0, target_modules=None, **train):
    """build_model as the train stage calls it, LoRA B made non-zero (it starts at zero: no effect to test)."""
    torch.manual_seed(0)
    model = build_model(params_with(dropout, target_modules, **train), model_dir, torch.device("cpu"), dtype)
    generator = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return model


def output_and_grads(model):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=IDS).logits
    (logits.float().square().mean()).backward()
    return logits.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def largest_relative_error(grads, reference):
    return max(float((grads[k] - reference[k]).abs().max() / reference[k].abs().max()) for k in reference)


def test_fused_projections_compute_peft_forward_and_gradients(tiny_model_dir):
    peft_model = model_with(tiny_model_dir)
    fused = model_with(tiny_model_dir, fuse_lora=True)
    attention = fused.get_base_model().model.layers[0].self_attn
    assert isinstance(attention, fused_lora.FusedAttention) and isinstance(
        fused.get_base_model().model.layers[0].mlp, fused_lora.FusedMLP)
    ref, ref_grads = output_and_grads(peft_model)
    out, grads = output_and_grads(fused)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert largest_relative_error(grads, ref_grads) < 1e-4
    assert set(grads) == set(ref_grads) and len(grads) == 2 * 7 * 2  # A and B of 7 linears, 2 layers


def test_in_eval_mode_dropout_is_off_as_in_peft(tiny_model_dir):
    peft_model = model_with(tiny_model_dir, dropout=0.3).eval()
    fused = model_with(tiny_model_dir, dropout=0.3, fuse_lora=True, lora_compute_dtype="float32").eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=IDS).logits, peft_model(input_ids=IDS).logits,
                                   rtol=1e-5, atol=1e-5)
        fused.train()  # and in training it is on: the check above can fail
        assert not torch.allclose(fused(input_ids=IDS).logits, peft_model(input_ids=IDS).logits, atol=1e-3)


def test_each_module_of_a_group_draws_its_own_dropout_mask():
    x = torch.ones(4000, 4)
    eye = [torch.eye(4)] * 3  # A = B = identity: each module's output is its dropped input
    base = torch.zeros(4000, 12)
    torch.manual_seed(0)
    out = fused_lora.add_lora(base, x, eye, eye, 1.0, 0.5, True, torch.float32)
    q, k, v = out.split(4, dim=1)
    assert set(out.unique().tolist()) == {0.0, 2.0}  # dropped, or kept and scaled by 1 / (1 - p)
    assert not torch.equal(q, k) and not torch.equal(k, v)  # independent masks
    for part in (q, k, v):
        assert abs(float(part.mean()) - 1.0) < 0.05  # each an unbiased dropout of p = 0.5
    agree = float(((q > 0) == (k > 0)).float().mean())
    assert abs(agree - 0.5) < 0.05  # independent: half the positions agree, as two coin flips


def test_bf16_adapter_compute_stays_within_bf16_rounding_of_fp32(tiny_model_dir):
    reference, ref_grads = output_and_grads(model_with(tiny_model_dir))  # all fp32
    peft_bf16, peft_grads = output_and_grads(model_with(tiny_model_dir, dtype=torch.bfloat16))  # bf16 base
    bf16_error = float((peft_bf16 - reference).abs().max())
    bf16_grad_error = largest_relative_error(peft_grads, ref_grads)
    assert bf16_error > 0  # the base's own bf16 rounding: the scale the adapter's may not exceed by much
    for train in ({"lora_compute_dtype": "bfloat16"}, {"lora_compute_dtype": "auto", "fuse_lora": True}):
        out, grads = output_and_grads(model_with(tiny_model_dir, dtype=torch.bfloat16, **train))
        assert float((out - reference).abs().max()) < 2 * bf16_error, train
        assert largest_relative_error(grads, ref_grads) < 2 * bf16_grad_error, train
        # the master weights and their gradients stay fp32
        assert all(g.dtype == torch.float32 for g in grads.values())


def adapter_matmul_dtypes(model) -> list[torch.dtype]:
    """dtypes of the matmuls that have the LoRA rank (8) as a dimension, during a forward and backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
                tensors = [a for a in args if isinstance(a, torch.Tensor)]
                if any(8 in a.shape for a in tensors):
                    seen.extend(a.dtype for a in tensors)
            return func(*args, **(kwargs or {}))

    with Record():
        output_and_grads(model)
    return seen


def test_bf16_compute_leaves_no_fp32_adapter_matmul(tiny_model_dir):
    assert torch.float32 in adapter_matmul_dtypes(model_with(tiny_model_dir, dtype=torch.bfloat16))  # PEFT's
    for train in ({"lora_compute_dtype": "auto"}, {"lora_compute_dtype": "auto", "fuse_lora": True}):
        dtypes = adapter_matmul_dtypes(model_with(tiny_model_dir, dtype=torch.bfloat16, **train))
        assert dtypes and set(dtypes) == {torch.bfloat16}, train


def test_parameters_state_dict_and_saved_adapter_are_peft_s(tiny_model_dir, real_tokenizer, tmp_path):
    peft_model = model_with(tiny_model_dir)
    fused = model_with(tiny_model_dir, dtype=torch.float32, fuse_lora=True, lora_compute_dtype="bfloat16")
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in peft_model.named_parameters()]
    assert list(fused.state_dict()) == list(peft_model.state_dict())  # the fused weights are not state
    for name, model in (("peft", peft_model), ("fused", fused)):
        save_adapter(model, real_tokenizer, tmp_path / name, {})
    saved = load_file(tmp_path / "fused" / "adapter_model.safetensors")
    ref = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert list(saved) == list(ref) and all(torch.equal(saved[k], ref[k]) for k in ref)
    assert (tmp_path / "fused" / "adapter_config.json").read_text(encoding="utf-8") == (
        tmp_path / "peft" / "adapter_config.json").read_text(encoding="utf-8")


def test_the_base_weights_become_views_of_the_fused_weight(tiny_model_dir):
    fused = model_with(tiny_model_dir, fuse_lora=True)
    attention = fused.get_base_model().model.layers[1].self_attn
    weight = attention.fused_q_proj_k_proj_v_proj_weight
    start = 0
    for name in ("q_proj", "k_proj", "v_proj"):
        own = getattr(attention, name).base_layer.weight
        assert own.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()  # no second copy
        assert torch.equal(own, weight[start:start + own.shape[0]]) and not own.requires_grad
        start += own.shape[0]
    assert start == weight.shape[0]


def test_a_group_not_wholly_adapted_stays_apart_and_is_counted(tiny_model_dir):
    peft_model = model_with(tiny_model_dir, target_modules=["q_proj", "v_proj", "down_proj"])
    fused = model_with(tiny_model_dir, target_modules=["q_proj", "v_proj", "down_proj"], fuse_lora=True)
    assert not isinstance(fused.get_base_model().model.layers[0].self_attn, fused_lora.FusedAttention)
    counts = fused_lora.apply(model_with(tiny_model_dir, target_modules=["q_proj", "v_proj", "down_proj"]),
                              torch.float32, True)
    assert counts == {"fused_groups": 0, "unfused_groups": 4, "linears": 6}  # 2 layers x (attention, mlp)
    torch.testing.assert_close(output_and_grads(fused)[0], output_and_grads(peft_model)[0], rtol=1e-5, atol=1e-5)


def test_disabled_adapters_give_the_base_model(tiny_model_dir):
    fused = model_with(tiny_model_dir, fuse_lora=True)
    with torch.no_grad():
        with fused.disable_adapter():
            base = fused(input_ids=IDS).logits
        adapted = fused(input_ids=IDS).logits
        plain = model_with(tiny_model_dir)
        with plain.disable_adapter():
            torch.testing.assert_close(base, plain(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(base, adapted, atol=1e-3)


def test_two_steps_with_the_levers_give_the_old_path_s_losses(tiny_model_dir, real_tokenizer, processed_dir):
    records = read_processed(processed_dir / "train.jsonl")[:8]
    losses = {}
    for name, levers in (("peft", {}), ("fused_bf16", {"fuse_lora": True, "lora_compute_dtype": "bfloat16"})):
        params = params_with(effective_batch=4, max_steps=2, logging_steps=1, learning_rate=1e-2, warmup_ratio=0.0,
                             micro_batch_tokens=128, cpu_micro_batch_tokens=128, **levers)
        stats = train(params, records, None, checkpoint_dir=None, metrics_dir=None, model_dir=tiny_model_dir,
                      tokenizer=real_tokenizer, progress=False)
        losses[name] = [r["loss"] for r in stats["history"]]
    assert len(losses["peft"]) == 2
    # step 1 is the same model on the same batch (LoRA B starts at 0): bf16 rounding of the adapter only;
    # step 2 follows an update with bf16-rounded gradients
    assert losses["fused_bf16"] == pytest.approx(losses["peft"], rel=1e-2)


def test_compiled_fused_layers_compute_the_eager_fused_function(tiny_model_dir):
    import shutil

    from table2text.training.packed_forward import compile_layers

    if not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("torch.compile on the CPU needs a C++ compiler")
    # fp32 compute: the same function to rounding; bf16 compute is tested against eager above
    eager, compiled = model_with(tiny_model_dir, fuse_lora=True), model_with(tiny_model_dir, fuse_lora=True)
    assert compile_layers(compiled.get_base_model().model) == 2
    ref, ref_grads = output_and_grads(eager)
    out, grads = output_and_grads(compiled)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    # every adapter weight gets its gradient through the compiled layers (none taken for a constant)
    assert set(grads) == set(ref_grads) and all(float(g.abs().max()) > 0 for g in grads.values())
    assert largest_relative_error(grads, ref_grads) < 1e-3
