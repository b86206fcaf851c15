"""Merge stage: fold the LoRA adapter into the base model and save a plain model for evaluation.

    python -m stages.merge [--params params.yaml]

The base is reloaded unquantised in fp32 (merging into NF4 weights would round the base a second time),
the adapter applied and merged, and the result saved in merge.dtype (bf16 by default; fp16 only after
a check on validation prompts shows finite outputs with the same top-1 as bf16, since Gemma 3 overflows
fp16). The saved model is reloaded and compared with base + adapter (fp32) on merge.verify_prompts
validation prompts; the stage fails beyond merge.max_logit_diff / merge.min_top1_agreement.

Outputs: models/merged/ (safetensors, tokenizer, generation_config.json), metrics/merge.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from stages import model_sources
from stages.errors import UserError, run_cli
from stages.params import PARAMS_FILE, default_params_file, load_params
from stages.train import ADAPTER_DIR, read_jsonl, replace_dir, write_json

VALIDATION_FILE = Path("data/processed/validation.jsonl")
MERGED_DIR = Path("models/merged")
METRICS_FILE = Path("metrics/merge.json")
# float32 keeps the merge exact (base + adapter computed once, no rounding), at twice bf16's size
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
END_TOKENS = ("<end_of_turn>",)  # besides tokenizer.eos_token: Gemma's turn end, used by chat templates


# Free space the merged folder needs beyond its estimated size: metadata, and the file system's own.
DISK_MARGIN = 1.05
DISK_SLACK_BYTES = 64 * 2**20


class MergeError(UserError, RuntimeError):
    pass


def estimated_bytes(model, model_dir: Path) -> int:
    """Bytes the saved merged model will take: its weights in their dtype, plus the base folder's other
    files (tokenizer, configs), which are saved alongside. Tied tensors (Gemma's embedding is its output
    head) are stored once."""
    weights = sum({t.data_ptr(): t.numel() * t.element_size() for t in model.state_dict().values()}.values())
    others = sum(f.stat().st_size for f in Path(model_dir).iterdir() if f.is_file() and f.suffix != ".safetensors")
    return weights + others


def check_disk_space(folder: Path, needed: int) -> None:
    """Refuse to start writing what the disk cannot hold: a half-written model is only lost time."""
    needed = int(needed * DISK_MARGIN) + DISK_SLACK_BYTES
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise MergeError(f"not enough disk space in {folder.as_posix()} for the merged model: needs about "
                         f"{needed:,} bytes ({needed / 2**30:.2f} GiB), {free:,} bytes free ({free / 2**30:.2f} GiB)")


def end_token_ids(tokenizer) -> list[int]:
    """Every token that ends a generation for this model: <eos> and <end_of_turn> where it exists."""
    ids = [tokenizer.eos_token_id]
    for token in END_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is not None and token_id != tokenizer.unk_token_id and token_id not in ids:
            ids.append(token_id)
    return ids


def check_base_identity(adapter_dir: Path, base_sha256: str) -> dict:
    info_file = adapter_dir / "training_info.json"
    if not info_file.is_file():
        raise MergeError(f"{info_file} missing: run the train stage first")
    info = json.loads(info_file.read_text())
    trained_on = info["base_model"]["weights_sha256"]
    if trained_on != base_sha256:
        raise MergeError(
            f"{adapter_dir} was trained on base weights sha256 {trained_on[:16]}... "
            f"({info['base_model']['name']}), but model.name resolves to weights {base_sha256[:16]}...: "
            "retrain the adapter or point model.name at the base it was trained on"
        )
    return info


@torch.no_grad()
def compare_logits(reference, candidate, prompts: list[list[int]], device: torch.device) -> dict:
    """Top-1 agreement and largest |logit difference| of candidate vs reference over all prompt positions,
    and how the differences spread: the 99th and 99.9th percentile over positions of each position's
    largest |difference|, and the mean KL divergence of the candidate's next-token distribution from the
    reference's. The gate uses the first two; the spread says whether a failing maximum is one position
    or many (long full-table prompts failed on the maximum with 99.5% top-1 agreement, BENCHMARKS.md)."""
    agree = positions = 0
    finite = True
    per_position, kl_sum = [], 0.0
    for ids in prompts:
        x = torch.tensor([ids], device=device)
        ref = reference(input_ids=x).logits[0].float()
        out = candidate(input_ids=x).logits[0].float()
        finite &= bool(torch.isfinite(out).all())
        agree += int((ref.argmax(-1) == out.argmax(-1)).sum())
        positions += ref.shape[0]
        per_position.append((ref - out).abs().amax(-1).cpu())
        kl_sum += float(torch.nn.functional.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                                   reduction="sum"))
    spread = torch.cat(per_position)
    return {"top1_agreement": agree / positions, "max_logit_diff": float(spread.max()),
            "p99_logit_diff": float(spread.quantile(0.99)), "p999_logit_diff": float(spread.quantile(0.999)),
            "mean_kl": kl_sum / positions, "positions": positions, "finite": finite}


def merge(
    params: dict,
    adapter_dir: Path,
    merged_dir: Path,
    prompts: list[str],
    *,
    metrics_file: Path | None = METRICS_FILE,
    model_dir: Path | None = None,
) -> dict:
    """Merge adapter_dir into the base, verify, save merged_dir; returns the metrics (raises MergeError).
    model_dir overrides params model.name (tests)."""
    from peft import PeftModel
    from transformers import GenerationConfig

    cfg = params["merge"]
    if cfg["dtype"] not in DTYPES:
        raise MergeError(f"merge.dtype must be one of {sorted(DTYPES)}, got {cfg['dtype']!r}")
    save_dtype = DTYPES[cfg["dtype"]]
    start = time.perf_counter()
    device = model_sources.pick_device(cfg.get("device", "auto"))
    model_dir = Path(model_dir) if model_dir else model_sources.resolve_model(params["model"]["name"])
    base_sha256 = model_sources.weights_sha256(model_dir)
    check_base_identity(adapter_dir, base_sha256)
    model_sources.check_safetensors(adapter_dir, "adapter_model.safetensors")  # never peft's .bin fallback
    tokenizer = model_sources.load_tokenizer(model_dir)
    prompt_ids = [tokenizer(p, add_special_tokens=True).input_ids for p in prompts[: int(cfg["verify_prompts"])]]
    if not prompt_ids:
        raise MergeError("no validation prompts to verify the merged model on")

    def base_with_adapter():
        base = model_sources.load_model(model_dir, quantization="none", dtype=torch.float32, device=device)
        return PeftModel.from_pretrained(base, adapter_dir).eval()

    # 1. merge in fp32 and save in the target dtype (in a temp folder next to the destination)
    merged = base_with_adapter().merge_and_unload().to(save_dtype)
    merged_dir.parent.mkdir(parents=True, exist_ok=True)
    check_disk_space(merged_dir.parent, estimated_bytes(merged, model_dir))
    tmp = Path(tempfile.mkdtemp(prefix=f".{merged_dir.name}-", dir=merged_dir.parent))
    try:
        merged.config.name_or_path = f"{params['model']['name']} + LoRA {adapter_dir}"
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        generation = GenerationConfig.from_model_config(merged.config)
        generation.eos_token_id = end_token_ids(tokenizer)
        generation.pad_token_id = tokenizer.pad_token_id
        generation.bos_token_id = tokenizer.bos_token_id
        generation.save_pretrained(tmp)
        del merged

        # 2. verify the model as saved against base + adapter in fp32. The saved weights are upcast and
        #    computed in fp32 on every device, so the check measures the rounding of the saved weights
        #    alone (bf16 *compute* on a GPU adds noise of its own: measured max logit diff 2.5 on an H200).
        run_dtype = torch.float32
        reference = base_with_adapter()
        saved = model_sources.load_model(tmp, quantization="none", dtype=run_dtype, device=device).eval()
        result = compare_logits(reference, saved, prompt_ids, device)
        metrics = {
            "dtype": cfg["dtype"],
            "verify_compute_dtype": str(run_dtype).removeprefix("torch."),
            "prompts": len(prompt_ids),
            **result,
            "max_logit_diff_allowed": float(cfg["max_logit_diff"]),
            "min_top1_agreement": float(cfg["min_top1_agreement"]),
            "eos_token_id": end_token_ids(tokenizer),
            "base_weights_sha256": base_sha256,
        }
        if save_dtype == torch.float16:
            # fp16 must prove itself against bf16 on the same prompts (Gemma 3 activations overflow fp16)
            bf16 = model_sources.load_model(tmp, quantization="none", dtype=torch.bfloat16, device=device).eval()
            fp16_check = compare_logits(bf16, saved, prompt_ids, device)
            metrics["fp16_vs_bf16"] = fp16_check
            if not fp16_check["finite"] or fp16_check["top1_agreement"] < float(cfg["min_top1_agreement"]):
                raise MergeError(
                    f"merge.dtype=float16 refused: on {len(prompt_ids)} validation prompts fp16 outputs are "
                    f"{'finite' if fp16_check['finite'] else 'NOT finite (overflow)'} with top-1 agreement "
                    f"{fp16_check['top1_agreement']:.4f} vs bf16 (need {cfg['min_top1_agreement']}); use bfloat16"
                )
        metrics["passed"] = (
            result["finite"]
            and result["max_logit_diff"] <= float(cfg["max_logit_diff"])
            and result["top1_agreement"] >= float(cfg["min_top1_agreement"])
        )
        metrics["seconds"] = time.perf_counter() - start
        if metrics_file is not None:  # written before failing too: it says by how much
            write_json(metrics_file, metrics)
        if not metrics["passed"]:
            raise MergeError(
                f"merged model disagrees with base + adapter on {len(prompt_ids)} validation prompts: "
                f"top-1 agreement {result['top1_agreement']:.4f} (min {cfg['min_top1_agreement']}), "
                f"max logit difference {result['max_logit_diff']:.3f} (max {cfg['max_logit_diff']}; 99.9th "
                f"percentile of positions {result['p999_logit_diff']:.3f}, mean KL {result['mean_kl']:.2e}), "
                f"finite={result['finite']}"
            )
        replace_dir(tmp, merged_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=PARAMS_FILE, help="params file (default params.yaml)")
    args = parser.parse_args(argv)

    params = load_params(args.params)
    prompts = [r["prompt"] for r in read_jsonl(VALIDATION_FILE)]
    try:
        metrics = merge(params, ADAPTER_DIR, MERGED_DIR, prompts)
    except (MergeError, model_sources.WeightsError) as err:
        sys.exit(f"merge: {err}")
    print(
        f"merge: {MERGED_DIR} ({metrics['dtype']}), top-1 agreement {metrics['top1_agreement']:.4f}, "
        f"max logit diff {metrics['max_logit_diff']:.3f} (99.9th percentile {metrics['p999_logit_diff']:.3f}) "
        f"on {metrics['prompts']} prompts"
    )


if __name__ == "__main__":
    # $TOTTO_PARAMS as the default --params (a --params given on the command line comes later and wins)
    sys.exit(run_cli(main, "merge", ["--params", str(default_params_file()), *sys.argv[1:]],
                     user_errors=(FileNotFoundError,)))
