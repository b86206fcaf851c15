"""Packed rows through the decoder (table2text/training/packed_forward.py): every example computes what it would alone."""

from __future__ import annotations

import pytest
import torch

from table2text.training.batching import collate, collate_packed, completion_loss, naive_loss
from table2text.training.packed_forward import PackedDecoder, compile_layers
from tests.conftest import TINY

# Examples longer than the window, so that the sliding-window layer's mask is exercised too.
EXAMPLES = [(list(range(5, 40)), 20), (list(range(100, 120)), 12), (list(range(7, 30)), 22), (list(range(50, 62)), 4)]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, sliding_window=8)
    assert model.config.layer_types == TINY["layer_types"] and model.config.sliding_window == 8
    model.requires_grad_(False)
    for name, p in model.named_parameters():  # a trainable body, a frozen tied head (as under LoRA)
        if "layers.0" in name or "layers.1.mlp" in name:
            p.requires_grad_(True)
    return model


def loss_and_grads(model, fn):
    body = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in body]


def alone(model):
    """The reference: each example by itself, the library's own causal and sliding masks, full logits."""
    total = 0.0
    for example in EXAMPLES:
        batch = collate([example], pad_id=0)
        hidden = model.model(input_ids=batch["input_ids"]).last_hidden_state
        total = total + naive_loss(model.lm_head(hidden), batch["targets"])
    return total


def packed(model, rows, row_tokens, doc_ids=None):
    batch = collate_packed(EXAMPLES, rows, row_tokens, pad_id=0)
    hidden = PackedDecoder(model.model)(batch["input_ids"], batch["position_ids"],
                                        batch["doc_ids"] if doc_ids is None else doc_ids)
    return completion_loss(hidden, batch["targets"], model.lm_head.weight)[0]


@pytest.mark.parametrize("rows, row_tokens", [([[0, 1, 2, 3]], 96), ([[0, 3], [1, 2]], 64), ([[2, 0], [3, 1]], 64)])
def test_packed_examples_give_the_loss_and_gradients_of_each_example_alone(model, rows, row_tokens):
    ref_loss, ref_grads = loss_and_grads(model, lambda: alone(model))
    loss, grads = loss_and_grads(model, lambda: packed(model, rows, row_tokens))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-4)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-4 * float(r.abs().max()))


def test_attention_across_examples_would_change_the_loss(model):
    # the check above can fail: the same row with every token in one "document" attends across examples
    rows, row_tokens = [[0, 1, 2, 3]], 96
    one_doc = torch.zeros(1, row_tokens, dtype=torch.long)
    with torch.no_grad():
        assert abs(float(packed(model, rows, row_tokens, one_doc)) - float(alone(model))) > 1e-2


def test_compiled_layers_compute_the_same_loss_and_gradients(tiny_model_dir):
    import shutil

    from transformers import AutoModelForCausalLM

    if not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("torch.compile on the CPU needs a C++ compiler")

    def fresh():
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, sliding_window=8)
        m.requires_grad_(False)
        for name, p in m.named_parameters():
            if "layers.0" in name:
                p.requires_grad_(True)
        return m

    eager, compiled = fresh(), fresh()
    assert compile_layers(compiled.model) == TINY["num_hidden_layers"]
    rows, row_tokens = [[0, 3], [1, 2]], 64
    ref_loss, ref_grads = loss_and_grads(eager, lambda: packed(eager, rows, row_tokens))
    loss, grads = loss_and_grads(compiled, lambda: packed(compiled, rows, row_tokens))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5 * float(r.abs().max()))


@pytest.mark.parametrize("levers, grad_atol", [({"fuse_lora": True}, 1e-3),
                                               ({"fuse_lora": True, "lora_compute_dtype": "bfloat16"}, 1e-2)],
                         ids=["fused", "fused_bf16"])
def test_packed_rows_through_fused_lora_give_each_example_s_loss_alone(tiny_model_dir, levers, grad_atol):
    # the fused q/k/v and gate/up (table2text.training.fused_lora) see packed rows as the model's own masks
    import copy
    from pathlib import Path

    from table2text.model.lora import build_model
    from table2text.params import load_params

    params = copy.deepcopy(load_params(Path(__file__).resolve().parents[1] / "params.yaml"))
    params["train"].update(quantization="none", device="cpu", **levers)
    params["lora"]["dropout"] = 0.0
    torch.manual_seed(0)
    peft_model = build_model(params, tiny_model_dir, torch.device("cpu"), torch.float32)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    model = peft_model.get_base_model()
    from table2text.training.fused_lora import FusedAttention

    assert isinstance(model.model.layers[0].self_attn, FusedAttention)
    model.model.config.sliding_window = 8  # examples longer than the window, as above
    rows, row_tokens = [[0, 3], [1, 2]], 64
    ref_loss, ref_grads = loss_and_grads(model, lambda: alone(model))
    loss, grads = loss_and_grads(model, lambda: packed(model, rows, row_tokens))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-3)
    for g, r in zip(grads, ref_grads):
        # bf16: the adapter gradients' rounding (2^-8 relative) in matmuls of other shapes
        torch.testing.assert_close(g, r, rtol=1e-2, atol=grad_atol * float(r.abs().max()))
