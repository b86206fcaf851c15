"""How far one model's next-token distributions are from another's: the one measure behind the merge
check (stages.merge) and the GGUF export check (stages.export)."""

from __future__ import annotations

import torch

# On the CPU the distance's dozen elementwise passes run over chunks of rows, about 1 MiB a thread (one
# 262k-wide fp32 row each), which stay in the cores' caches, instead of over a prompt's whole [positions,
# vocabulary] block, which streams from memory at each pass (bench/logit_distance_bench.py, BENCHMARKS.md
# "Logit distance on the CPU"). Every operation is row-wise, so the values are the same up to the order
# of float32 sums within a row. On a GPU one kernel per operation over the whole block is faster.
CPU_CHUNK_BYTES_PER_THREAD = 1 << 20


def chunk_rows(logits: torch.Tensor, chunk_bytes: int | None = None) -> int:
    """Rows of `logits` ([positions, vocabulary]) per chunk: all of them off the CPU or when chunk_bytes is
    0; None: CPU_CHUNK_BYTES_PER_THREAD for each of torch's threads."""
    if logits.device.type != "cpu" or chunk_bytes == 0:
        return max(1, logits.shape[0])
    if chunk_bytes is None:
        chunk_bytes = CPU_CHUNK_BYTES_PER_THREAD * torch.get_num_threads()
    return max(1, chunk_bytes // (logits.shape[-1] * logits.element_size()))


class LogitDistance:
    """How far a candidate's next-token distributions are from a reference's, accumulated over prompts:
    top-1 agreement, mean KL(reference || candidate), the largest |logit difference| and its 99th / 99.9th
    percentile over positions (one bad position or many)."""

    def __init__(self, chunk_bytes: int | None = None):
        self.agree = self.positions = 0
        self.kl_sum = 0.0
        self.finite = True
        self.per_position: list[torch.Tensor] = []
        self.chunk_bytes = chunk_bytes

    def add(self, reference: torch.Tensor, candidate: torch.Tensor) -> None:
        """One prompt's logits, [positions, vocabulary] each, in chunks of chunk_rows(reference, chunk_bytes)."""
        step = chunk_rows(reference, self.chunk_bytes)
        for start in range(0, reference.shape[0], step):
            self._add_rows(reference[start:start + step], candidate[start:start + step])

    def _add_rows(self, reference: torch.Tensor, candidate: torch.Tensor) -> None:
        self.agree += int((reference.argmax(-1) == candidate.argmax(-1)).sum())
        self.positions += reference.shape[0]
        diff = candidate - reference
        spread = torch.linalg.vector_norm(diff, ord=float("inf"), dim=-1)  # max |diff|, one pass, NaN kept
        # With a finite reference, a non-finite candidate logit makes its position's spread non-finite: no
        # separate pass over the 262k-wide candidate.
        self.finite &= bool(torch.isfinite(spread).all())
        self.per_position.append(spread.cpu())
        self.kl_sum += float(kl_per_position(reference, diff).sum())

    def result(self) -> dict:
        spread = torch.cat(self.per_position)
        return {"mean_kl": self.kl_sum / self.positions, "top1_agreement": self.agree / self.positions,
                "max_logit_diff": float(spread.max()), "p99_logit_diff": float(spread.quantile(0.99)),
                "p999_logit_diff": float(spread.quantile(0.999)), "positions": self.positions,
                "finite": self.finite}


def kl_per_position(reference: torch.Tensor, diff: torch.Tensor) -> torch.Tensor:
    """KL(reference || candidate) at each position (float64), from the reference's logits and the
    difference diff = candidate - reference.

    With p = softmax(reference) and u = diff - E_p[diff]: KL = log E_p[e^diff] - E_p[diff] = log E_p[e^u]
    = log1p(E_p[expm1(u) - u]), since E_p[u] = 0. Every term expm1(u) - u is >= 0 and ~u^2/2, so no
    cancellation is left for fp32 to lose, and torch's cascade sums of these non-negative fp32 terms are
    as close as float64 sums (a float64 sum costs 15x an fp32 one on the CPU): a small adapter's effect
    (KL ~1e-10) comes out to ~1e-5 relative, where fp32 log-softmaxes would lose it in a 262k-term sum
    (tests/test_fidelity.py holds it to the float64 log-softmax form). An error in E_p[diff] moves the
    result only at second order. Positions where e^u overflows (a logit moved by more than ~88) take
    that float64 form."""
    p = reference.softmax(-1)
    norm = p.sum(-1, keepdim=True)
    u = diff - (p * diff).sum(-1, keepdim=True) / norm
    terms = torch.expm1(u).sub_(u).mul_(p)
    kl = torch.log1p(terms.sum(-1) / norm.squeeze(-1)).double()
    bad = ~torch.isfinite(kl)
    if bad.any():
        ref, cand = reference[bad].double(), (reference[bad] + diff[bad]).double()
        kl[bad] = torch.nn.functional.kl_div(cand.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                             reduction="none").sum(-1)
    return kl


@torch.no_grad()
def prompt_logits(model, prompts: list[list[int]], device: torch.device) -> list[torch.Tensor]:
    """The model's fp32 logits at every position of each prompt (token id lists), one tensor a prompt, on
    the CPU: a reference held for several candidates (8 FeTaQA prompts x 262k vocabulary: ~2 GB in fp32)
    must not take a 6 GB GPU's memory; compare_logits moves one prompt's at a time back."""
    return [model(input_ids=torch.tensor([ids], device=device)).logits[0].float().cpu() for ids in prompts]


@torch.no_grad()
def compare_logits(reference, candidate, prompts: list[list[int]], device: torch.device) -> dict:
    """LogitDistance of candidate from reference over every position of the prompts (token id lists).
    reference is a model, or its prompt_logits() on the same prompts: computed once when several
    candidates are held to one reference (the export stage's GGUF types)."""
    distance = LogitDistance()
    for i, ids in enumerate(prompts):
        x = torch.tensor([ids], device=device)
        ref = reference[i].to(device) if isinstance(reference, list) else reference(input_ids=x).logits[0].float()
        distance.add(ref, candidate(input_ids=x).logits[0].float())
    return distance.result()
