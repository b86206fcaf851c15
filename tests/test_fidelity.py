"""The logit distance behind the merge and export checks: its KL is the float64 log-softmax KL."""

from __future__ import annotations

import pytest
import torch

from table2text.model.fidelity import LogitDistance, chunk_rows, kl_per_position

VOCAB = 262144  # Gemma 3's: the sum the precision argument is about


def float64_kl(reference: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.kl_div(candidate.double().log_softmax(-1), reference.double().log_softmax(-1),
                                      log_target=True, reduction="none").sum(-1)


@pytest.mark.parametrize("scale, tolerance", [(1e-5, 1e-3), (1e-3, 1e-5), (0.3, 1e-6), (3.0, 1e-6)])
def test_the_kl_equals_the_float64_log_softmax_kl_from_tiny_to_large_differences(scale, tolerance):
    torch.manual_seed(0)
    reference = torch.randn(6, VOCAB) * 3
    candidate = reference + torch.randn_like(reference) * scale
    ours = kl_per_position(reference, candidate - reference)
    assert ours.dtype == torch.float64
    assert torch.allclose(ours, float64_kl(reference, candidate), rtol=tolerance, atol=0)


def test_equal_distributions_have_no_distance_and_a_shift_of_every_logit_is_none():
    reference = torch.randn(3, VOCAB)
    assert float(kl_per_position(reference, torch.zeros_like(reference)).abs().max()) == 0.0
    assert float(kl_per_position(reference, torch.full_like(reference, 7.0)).abs().max()) < 1e-12


def test_a_logit_moved_beyond_the_float32_exponent_range_takes_the_float64_form():
    reference = torch.randn(2, VOCAB)
    candidate = reference.clone()
    candidate[1, 5] += 120.0  # e^120 overflows float32
    ours = kl_per_position(reference, candidate - reference)
    assert torch.isfinite(ours).all()
    assert torch.allclose(ours, float64_kl(reference, candidate), rtol=1e-6)


def test_the_distance_reports_agreement_kl_and_logit_spread_over_positions():
    reference = torch.zeros(4, 10)
    reference[:, 3] = 5.0
    candidate = reference.clone()
    candidate[0, 7] = 9.0  # position 0 now prefers token 7
    distance = LogitDistance()
    distance.add(reference, candidate)
    result = distance.result()
    assert result["positions"] == 4 and result["top1_agreement"] == 0.75
    assert result["max_logit_diff"] == 9.0 and result["finite"]
    assert result["mean_kl"] == pytest.approx(float(float64_kl(reference, candidate).sum()) / 4, rel=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_candidate_logit_marks_the_distance_not_finite(bad):
    reference = torch.randn(3, 50)
    candidate = reference.clone()
    distance = LogitDistance()
    distance.add(reference, candidate)
    assert distance.result()["finite"]
    candidate[2, 17] = bad
    distance.add(reference, candidate)
    assert not distance.result()["finite"]


@pytest.mark.parametrize("chunk_bytes", [VOCAB * 4, 3 * VOCAB * 4, None])  # one row, three, the default
def test_the_distance_in_chunks_of_rows_is_the_distance_of_the_whole_block(chunk_bytes):
    torch.manual_seed(1)
    reference = torch.randn(7, VOCAB) * 3
    candidate = reference + torch.randn_like(reference) * 0.1
    candidate[4, 11] += 30.0  # one far position, so the spread's maximum and a top-1 miss are in a late chunk
    whole, chunked = LogitDistance(chunk_bytes=0), LogitDistance(chunk_bytes=chunk_bytes)
    whole.add(reference, candidate)
    chunked.add(reference, candidate)
    a, b = whole.result(), chunked.result()
    assert a["top1_agreement"] == b["top1_agreement"] < 1.0
    assert {k: a[k] for k in ("max_logit_diff", "p99_logit_diff", "positions", "finite")} == \
        {k: b[k] for k in ("max_logit_diff", "p99_logit_diff", "positions", "finite")}
    # a one-row chunk's sums split between threads in another order: the same KL to float32 rounding
    assert b["mean_kl"] == pytest.approx(a["mean_kl"], rel=1e-9)


def test_chunks_hold_about_a_mebibyte_of_rows_a_thread_on_the_cpu_and_everything_elsewhere():
    threads = torch.get_num_threads()
    assert chunk_rows(torch.empty(300, VOCAB)) == threads  # a 262k-wide fp32 row is 1 MiB
    assert chunk_rows(torch.empty(300, 1024)) == threads * 256
    assert chunk_rows(torch.empty(300, VOCAB), chunk_bytes=0) == 300
    assert chunk_rows(torch.empty(300, VOCAB, device="meta")) == 300  # not the CPU: one pass over the block
