"""Micro-batching, collation and the completion-only loss (table2text/training/batching.py)."""

from __future__ import annotations

import pytest
import torch

from table2text.training.batching import (
    IGNORE,
    activation_bytes_per_token,
    budget_for_memory,
    collate,
    collate_packed,
    completion_loss,
    head_chunk_bytes,
    head_chunk_positions,
    naive_loss,
    pack_rows,
    packed_attention_masks,
    plan_packed_micro_batches,
)


def test_packing_puts_every_example_in_exactly_one_row_within_its_length():
    lengths = [50, 300, 120, 90, 300, 10, 200, 60]
    rows = pack_rows(lengths, row_tokens=320)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 320 for row in rows)
    # first-fit decreasing: 1130 tokens in four rows of 320 (the lower bound), not one row per example
    assert len(rows) == 4


def test_an_example_longer_than_the_row_is_refused():
    with pytest.raises(ValueError, match="does not fit"):
        pack_rows([900, 10], row_tokens=512)


def test_packed_micro_batches_hold_at_most_the_given_rows():
    plan = plan_packed_micro_batches([100] * 7, row_tokens=200, rows_per_micro_batch=3)
    assert [len(micro) for micro in plan] == [3, 1]  # 4 rows of two examples
    assert sorted(i for micro in plan for row in micro for i in row) == list(range(7))


def test_collate_packed_restarts_positions_and_targets_per_example():
    batch = collate_packed([([2, 10, 11, 12, 1], 3), ([2, 20, 21], 2)], rows=[[0, 1]], row_tokens=10, pad_id=0)
    assert batch["input_ids"].tolist() == [[2, 10, 11, 12, 1, 2, 20, 21, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0, 1]]
    assert batch["doc_ids"].tolist() == [[0, 0, 0, 0, 0, 1, 1, 1, -1, -1]]
    # the last token of example 0 (its EOS, 1) predicts nothing: the next token belongs to example 1
    assert batch["targets"].tolist() == [[IGNORE, IGNORE, 12, 1, IGNORE, IGNORE, 21, IGNORE, IGNORE, IGNORE]]


def test_packed_masks_stay_inside_each_example_and_inside_the_window():
    batch = collate_packed([([2, 3, 4, 5], 1), ([2, 6, 7], 1)], rows=[[0, 1]], row_tokens=8, pad_id=0)
    masks = packed_attention_masks(batch["doc_ids"], batch["position_ids"], sliding_window=2)
    full, sliding = masks["full_attention"][0, 0], masks["sliding_attention"][0, 0]
    assert full[3].tolist() == [True, True, True, True, False, False, False, False]
    assert full[5].tolist() == [False, False, False, False, True, True, False, False]  # 2nd example only
    assert sliding[3].tolist() == [False, False, True, True, False, False, False, False]  # 2 positions back
    assert full[7].tolist() == [False] * 7 + [True]  # a pad sees the pads before it and itself: never empty


def test_collate_pads_right_and_targets_the_next_completion_token():
    batch = collate([([2, 10, 11, 12, 1], 3), ([2, 20, 21], 2)], pad_id=0)
    assert batch["input_ids"].tolist() == [[2, 10, 11, 12, 1], [2, 20, 21, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    # position t predicts ids[t+1]; only completion ids (12, 1 and 21) are targets
    assert batch["targets"].tolist() == [[IGNORE, IGNORE, 12, 1, IGNORE], [IGNORE, 21, IGNORE, IGNORE, IGNORE]]


def test_collate_refuses_an_example_without_completion():
    with pytest.raises(ValueError, match="no completion"):
        collate([([2, 10, 11], 3)], pad_id=0)


@pytest.mark.parametrize("softcap, smoothing", [(None, 0.0), (30.0, 0.0), (None, 0.1), (30.0, 0.2)])
def test_logits_only_at_labels_equal_the_naive_full_logits_loss_and_gradients(tiny_model_dir, softcap, smoothing):
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
        return naive_loss(logits, batch["targets"], label_smoothing=smoothing)  # F.cross_entropy's smoothing

    def ours(hidden):
        # a small chunk so that the chunking itself is exercised
        loss, n = completion_loss(hidden, batch["targets"], model.lm_head.weight, softcap=softcap, chunk_size=7,
                                  label_smoothing=smoothing)
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


def test_the_activation_estimate_keeps_a_measured_overflow_out_of_a_5_gib_cap(packaged_model_dir):
    # Measured on an H200 (BENCHMARKS.md, 2026-12-02): 4 packed rows of 1,024 tokens of Gemma 3 270M
    # peaked at 5.57 GiB. So under train.max_memory_gb=5 the budget must come out below 4,096 tokens.
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(packaged_model_dir)
    weights = 268_098_176 * 2  # the bf16 model with its NF4 linears held dequantised
    budget = budget_for_memory(4096, 5, fixed_bytes=weights, bytes_per_token=activation_bytes_per_token(config))
    assert budget < 4096
    assert budget // 1024 >= 2  # and still room for two rows: not so pessimistic that it runs one at a time


def _out_of_place_head_loss(hidden, weight, targets, softcap):
    """The loss and input gradient as the formulas read, one position block at a time and nothing in place
    (the code before the in-place rewrite): the reference the in-place loss must equal bit for bit."""
    raw = (hidden @ weight.T).float()
    logits = torch.tanh(raw / softcap) * softcap if softcap else raw
    log_z = torch.logsumexp(logits, dim=-1)
    total = (log_z - logits.gather(1, targets[:, None]).squeeze(1)).sum()
    grad = torch.exp(logits - log_z[:, None])
    grad[torch.arange(len(targets)), targets] -= 1.0
    if softcap:
        grad *= 1.0 - (logits / softcap) ** 2
    return total, (grad.to(weight.dtype) @ weight).to(hidden.dtype)


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_the_in_place_head_loss_computes_exactly_the_formulas(softcap):
    torch.manual_seed(0)
    weight = torch.randn(1000, 16, dtype=torch.bfloat16)
    hidden = torch.randn(40, 16, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 1000, (40,))
    want_loss, want_grad = _out_of_place_head_loss(hidden.detach(), weight, targets, softcap)
    loss, n = completion_loss(hidden[None], targets[None], weight, softcap=softcap, chunk_size=40)
    loss.backward()
    assert n == 40 and torch.equal(loss.detach(), want_loss)
    assert torch.equal(hidden.grad, want_grad)


@pytest.mark.parametrize("softcap, smoothing", [(None, 0.0), (30.0, 0.1)])
def test_a_trainable_head_gets_the_gradient_of_plain_cross_entropy(softcap, smoothing):
    # train.method full trains the head: its gradient, summed chunk by chunk, is autograd's through full logits
    torch.manual_seed(0)
    weight = torch.randn(1000, 16, requires_grad=True)
    hidden = torch.randn(1, 40, 16, requires_grad=True)
    targets = torch.randint(0, 1000, (1, 40))
    targets[0, :5] = IGNORE  # prompt positions carry no loss and no gradient
    loss, n = completion_loss(hidden, targets, weight, softcap=softcap, chunk_size=7, label_smoothing=smoothing)
    loss.backward()
    got = weight.grad.clone(), hidden.grad.clone()
    weight.grad = hidden.grad = None
    logits = hidden @ weight.T
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    naive_loss(logits, targets, label_smoothing=smoothing).backward()
    assert n == 35 and got[0].abs().sum() > 0
    for mine, autograd in zip(got, (weight.grad, hidden.grad)):  # fp32 sums in another order
        torch.testing.assert_close(mine, autograd, rtol=1e-4, atol=1e-5 * float(autograd.abs().max()))


def test_completion_positions_from_the_host_give_the_mask_s_loss_and_gradients():
    # what the train loop passes (table2text.training.loop.stage_micro_batches): the flat indices of the
    # set targets, so the loss does not read a boolean mask back from the device
    torch.manual_seed(0)
    weight = torch.randn(1000, 16)
    targets = torch.full((2, 30), IGNORE)
    targets[0, 3:11], targets[1, 20:29] = torch.randint(0, 1000, (8,)), torch.randint(0, 1000, (9,))
    positions = (targets.reshape(-1) != IGNORE).nonzero().squeeze(1)
    results = []
    for given in (None, positions):
        hidden = torch.randn(2, 30, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
        loss, n = completion_loss(hidden, targets, weight, chunk_size=7, positions=given)
        loss.backward()
        results.append((loss.detach(), n, hidden.grad))
    (mask_loss, mask_n, mask_grad), (loss, n, grad) = results
    assert n == mask_n == 17 and torch.equal(loss, mask_loss) and torch.equal(grad, mask_grad)


def test_label_smoothing_changes_the_loss_and_is_range_checked():
    torch.manual_seed(0)
    weight = torch.randn(1000, 16)
    hidden = torch.randn(1, 40, 16)
    targets = torch.randint(0, 1000, (1, 40))
    plain, _ = completion_loss(hidden, targets, weight)
    smoothed, _ = completion_loss(hidden, targets, weight, label_smoothing=0.1)
    assert smoothed.item() != pytest.approx(plain.item(), rel=1e-3)
    with pytest.raises(ValueError, match="label_smoothing"):
        completion_loss(hidden, targets, weight, label_smoothing=1.0)


def test_the_head_chunk_the_loss_uses_is_the_one_the_memory_model_counts():
    # Gemma 3's 262,144-word vocabulary: 256 positions a chunk, 512 MiB at the chunk's peak (no softcap)
    assert head_chunk_positions(262144) == 256
    assert head_chunk_bytes(262144) == 256 * 262144 * 8 == 2**29
    assert head_chunk_bytes(262144, softcap=30.0) == 3 * 2**28
    assert head_chunk_positions(10**9) == 1
    # completion_loss chunks by head_chunk_positions of its head: a 2**20-word head takes 64 positions a chunk
    seen = []
    weight = torch.zeros(2**20, 4)
    original = torch.Tensor.__matmul__

    def spy(a, b):
        seen.append(a.shape[0])
        return original(a, b)

    hidden, targets = torch.zeros(1, 600, 4), torch.zeros(1, 600, dtype=torch.long)
    torch.Tensor.__matmul__ = spy
    try:
        completion_loss(hidden, targets, weight)
    finally:
        torch.Tensor.__matmul__ = original
    assert seen == [64] * 9 + [24]  # 600 positions (no input gradient asked: one matmul a chunk)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="measures CUDA memory")
@pytest.mark.parametrize("positions", [128, 512, 2048])
def test_on_a_gpu_the_head_loss_peaks_within_its_modelled_chunk(positions):
    device = torch.device("cuda")
    vocab, dim = 262144, 640
    weight = torch.randn(vocab, dim, dtype=torch.bfloat16, device=device) * 0.02
    hidden = torch.randn(1, positions, dim, dtype=torch.bfloat16, device=device, requires_grad=True)
    targets = torch.randint(0, vocab, (1, positions), device=device)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    loss, _ = completion_loss(hidden, targets, weight)
    loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated(device) - before
    per_position = dim * 2 * 4  # the picked hidden rows, their gradient, its copy into .grad: a few bf16 rows
    assert peak <= head_chunk_bytes(vocab) + positions * per_position + 2**20
