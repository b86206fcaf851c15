"""Micro-batching, collation and the completion-only loss (stages/batching.py)."""

from __future__ import annotations

import pytest
import torch

from stages.batching import (
    IGNORE,
    budget_for_memory,
    collate,
    completion_loss,
    naive_loss,
    plan_micro_batches,
)


def test_micro_batches_cover_every_example_once_within_the_budget():
    lengths = [50, 300, 120, 90, 300, 10, 200, 60]
    batches = plan_micro_batches(lengths, token_budget=600)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) * max(lengths[i] for i in b) <= 600  # padding counted
    # sorted by length: the two 300-token examples share a micro-batch
    assert any(set(b) == {1, 4} for b in batches)


def test_an_example_longer_than_the_budget_runs_alone():
    assert plan_micro_batches([900, 10, 10], token_budget=100) == [[0], [1, 2]]


def test_collate_pads_right_and_targets_the_next_completion_token():
    batch = collate([([2, 10, 11, 12, 1], 3), ([2, 20, 21], 2)], pad_id=0)
    assert batch["input_ids"].tolist() == [[2, 10, 11, 12, 1], [2, 20, 21, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    # position t predicts ids[t+1]; only completion ids (12, 1 and 21) are targets
    assert batch["targets"].tolist() == [[IGNORE, IGNORE, 12, 1, IGNORE], [IGNORE, 21, IGNORE, IGNORE, IGNORE]]


def test_collate_refuses_an_example_without_completion():
    with pytest.raises(ValueError, match="no completion"):
        collate([([2, 10, 11], 3)], pad_id=0)


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_logits_only_at_labels_equal_the_naive_full_logits_loss_and_gradients(tiny_model_dir, softcap):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.lm_head.weight.requires_grad_(False)  # tied to the embeddings; frozen as under LoRA
    model.model.embed_tokens.weight.requires_grad_(False)
    batch = collate([(list(range(5, 40)), 20), (list(range(100, 120)), 12), (list(range(7, 30)), 22)], pad_id=0)
    body = [p for p in model.parameters() if p.requires_grad]

    def grads(loss_fn):
        model.zero_grad()
        hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        loss = loss_fn(hidden)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in body]

    def naive(hidden):
        logits = model.lm_head(hidden)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return naive_loss(logits, batch["targets"])

    def ours(hidden):
        # a small chunk so that the chunking itself is exercised
        loss, n = completion_loss(hidden, batch["targets"], model.lm_head.weight, softcap=softcap, chunk_size=7)
        assert n == 15 + 8 + 1
        return loss

    ref_loss, ref_grads = grads(naive)
    loss, got = grads(ours)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-4)
    for g, r in zip(got, ref_grads):  # equal up to fp32 summation order, relative to the gradient's scale
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-4 * float(r.abs().max()))


def test_a_memory_cap_lowers_the_token_budget():
    gib = 2**30
    assert budget_for_memory(16384, 0, fixed_bytes=gib, bytes_per_token=1000) == 16384
    assert budget_for_memory(16384, 2, fixed_bytes=gib, bytes_per_token=gib // 1000) == 1000
    with pytest.raises(ValueError, match="max_memory_gb"):
        budget_for_memory(16384, 1, fixed_bytes=2 * gib, bytes_per_token=1000)
