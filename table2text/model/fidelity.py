"""How far one model's next-token distributions are from another's: the one measure behind the merge
check (stages.merge) and the GGUF export check (stages.export)."""

from __future__ import annotations

import torch


class LogitDistance:
    """How far a candidate's next-token distributions are from a reference's, accumulated over prompts:
    top-1 agreement, mean KL(reference || candidate), the largest |logit difference| and its 99th / 99.9th
    percentile over positions (one bad position or many)."""

    def __init__(self):
        self.agree = self.positions = 0
        self.kl_sum = 0.0
        self.finite = True
        self.per_position: list[torch.Tensor] = []

    def add(self, reference: torch.Tensor, candidate: torch.Tensor) -> None:
        self.finite &= bool(torch.isfinite(candidate).all())
        self.agree += int((reference.argmax(-1) == candidate.argmax(-1)).sum())
        self.positions += reference.shape[0]
        self.per_position.append((reference - candidate).abs().amax(-1).cpu())
        # in float64: a small adapter's effect (KL ~1e-10) is below fp32's rounding of a 262k-term sum
        self.kl_sum += float(torch.nn.functional.kl_div(candidate.double().log_softmax(-1),
                                                        reference.double().log_softmax(-1),
                                                        log_target=True, reduction="sum"))

    def result(self) -> dict:
        spread = torch.cat(self.per_position)
        return {"mean_kl": self.kl_sum / self.positions, "top1_agreement": self.agree / self.positions,
                "max_logit_diff": float(spread.max()), "p99_logit_diff": float(spread.quantile(0.99)),
                "p999_logit_diff": float(spread.quantile(0.999)), "positions": self.positions,
                "finite": self.finite}


@torch.no_grad()
def prompt_logits(model, prompts: list[list[int]], device: torch.device) -> list[torch.Tensor]:
    """The model's fp32 logits at every position of each prompt (token id lists), one tensor a prompt."""
    return [model(input_ids=torch.tensor([ids], device=device)).logits[0].float() for ids in prompts]


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
