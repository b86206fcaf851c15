"""The merge: fold a LoRA adapter into a base model, and prove the saved model equals the stated one.

merge.base picks the model the merged checkpoint must reproduce (table2text.model.finetuned): `trained`, the adapter
on the base exactly as training saw it (the NF4-dequantised weights under train.quantization nf4: the
model that was trained), or `original`, the adapter on the unquantised base (PEFT's merge_and_unload).
The adapter is merged in fp32 and saved in merge.dtype; `auto` saves bf16 when the check below proves it
faithful and fp32 otherwise (the reason printed and recorded).

The check runs in fp32 on merge.verify_prompts validation prompts and measures two distances from the
stated model (base + adapter, unmerged): the base alone (`adapter_effect`: what the adapter changes) and
the saved merged model (`merge_error`). It passes only when the merge error's mean KL is at most
merge.max_error_ratio (0.01) times the adapter effect's. KL grows about with the square of a lost fraction
of the effect, so 0.01 asks that ~90% of it be kept: the plain base (ratio 1) and a half-applied adapter
(0.25 for small effects, 0.09 measured for a large one) fail, whatever their raw logit differences.

Under train.method full (training_info.json's method) there is nothing to fold: the stated model is the
trained fp32 weights of the train folder, saved in merge.dtype by the same rule and checked the same way
(adapter_effect: the base model against the trained one, the effect of fine-tuning; merge_error: the
stored model against the trained one), so metrics/merge.json has the same keys. merge.base must be trained.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from table2text.model import finetuned
from table2text.model import sources as model_sources
from table2text.io.atomic import check_free_space, check_writable, staged_dir, write_json
from table2text.config import group_settings
from table2text.errors import UserError
from table2text.model.fidelity import compare_logits, prompt_logits
from table2text.generation import end_token_ids
from table2text import phases
from table2text.paths import METRICS_DIR

INFO_FILE = "merge_info.json"
# float32 keeps the merge exact (base + adapter computed once, no rounding), at twice bf16's size
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
AUTO = ("bfloat16", "float32")  # merge.dtype auto: the first of these that the check proves faithful


# Free space the merged folder needs beyond its estimated size: metadata, and the file system's own.
DISK_MARGIN = 1.05
DISK_SLACK_BYTES = 64 * 2**20


class MergeError(UserError, RuntimeError):
    pass


def estimated_bytes(model, model_dir: Path, dtype: torch.dtype) -> int:
    """Bytes the saved merged model will take: its weights in `dtype`, plus the base folder's other files
    (tokenizer, configs), which are saved alongside. Tied tensors (Gemma's embedding is its output head)
    are stored once; LoRA weights are merged away."""
    numel = {t.data_ptr(): t.numel() for n, t in model.state_dict().items() if "lora_" not in n}
    weights = sum(numel.values()) * torch.empty(0, dtype=dtype).element_size()
    others = sum(f.stat().st_size for f in Path(model_dir).iterdir() if f.is_file() and f.suffix != ".safetensors")
    return weights + others


class StatedReference:
    """The stated model's fp32 logits on the check prompts, and the adapter's effect (the base alone against
    the stated model: a PeftModel with its adapter disabled, or `base_model` when given, for a fully
    fine-tuned stated model), computed once and held to every saved candidate: dtype auto checks bf16,
    then float32, against the same reference, so the second check pays one forward pass a prompt, not
    three. The logits wait on the CPU (fidelity.prompt_logits)."""

    @torch.no_grad()
    def __init__(self, stated, prompts: list[list[int]], device: torch.device, base_model=None):
        self.prompts, self.device = prompts, device
        self.logits = prompt_logits(stated, prompts, device)
        if base_model is not None:
            self.effect = compare_logits(self.logits, base_model, prompts, device)
        else:
            with stated.disable_adapter():
                self.effect = compare_logits(self.logits, stated, prompts, device)

    def measure(self, candidate) -> dict:
        """adapter_effect, merge_error (candidate against the stated model, same positions, fp32) and
        error_ratio = merge error's mean KL / adapter effect's."""
        error = compare_logits(self.logits, candidate, self.prompts, self.device)
        effect_kl = self.effect["mean_kl"]
        ratio = error["mean_kl"] / effect_kl if effect_kl > 0 else float("inf")
        return {"adapter_effect": dict(self.effect), "merge_error": error, "error_ratio": ratio}


def fidelity_problem(check: dict, max_error_ratio: float) -> str | None:
    """Why the check fails, None if it passes."""
    effect, error = check["adapter_effect"], check["merge_error"]
    if not error["finite"]:
        return "the merged model's logits are not finite"
    if effect["mean_kl"] <= 0:
        return ("the adapter changes no output on the check prompts (adapter effect mean KL 0): a merged model "
                "cannot be told from the base; train more steps")
    if check["error_ratio"] > max_error_ratio:
        return (f"merge error mean KL {error['mean_kl']:.3e} is {check['error_ratio']:.3f} x the adapter's effect "
                f"({effect['mean_kl']:.3e}; allowed {max_error_ratio}): the saved weights do not hold the adapter "
                f"(top-1 agreement {error['top1_agreement']:.4f}, max logit diff {error['max_logit_diff']:.3f})")
    return None


class Unfaithful(Exception):
    """A saved merge that the check refused (its numbers in .check)."""

    def __init__(self, check: dict):
        super().__init__(check["problem"])
        self.check = check


def plain_copy(stated):
    """A plain model equal to the stated one, in its fp32 weights: the adapter folded in (PEFT's
    merge_and_unload on a copy), or a copy of a fully fine-tuned model, which has nothing to fold."""
    if finetuned.is_peft(stated):
        return copy.deepcopy(stated).merge_and_unload()
    return copy.deepcopy(stated)


def save_checked(stated, tokenizer, merged_dir: Path, dtype: torch.dtype, name: str, verify) -> dict:
    """Merge a copy of the stated model in its fp32 weights (plain_copy), round once to `dtype`, save it
    next to merged_dir and check the saved files (`verify(folder) -> dict` with a "problem"); only a
    checkpoint that passes replaces merged_dir (atomic_io.staged_dir: a refused or interrupted one is removed)."""
    from transformers import GenerationConfig

    with staged_dir(merged_dir) as tmp:
        merged = plain_copy(stated).to(dtype)
        merged.config.name_or_path = name
        merged.config.use_cache = True  # the merged model decodes with a KV cache, whatever the loaded config says
        phases.enter("save")
        merged.save_pretrained(tmp, safe_serialization=True)
        del merged
        tokenizer.save_pretrained(tmp)
        config = stated.get_base_model().config if finetuned.is_peft(stated) else stated.config
        generation = GenerationConfig.from_model_config(config)
        generation.eos_token_id = end_token_ids(tokenizer)
        generation.pad_token_id = tokenizer.pad_token_id
        generation.bos_token_id = tokenizer.bos_token_id
        generation.save_pretrained(tmp)
        phases.enter("work")  # the check: the saved files reloaded and compared
        check = verify(tmp)
        if check["problem"] is not None:
            raise Unfaithful(check)
        write_json(tmp / INFO_FILE, {"base": check["base"], "stored_dtype": check["dtype"],
                                     "error_ratio": check["error_ratio"],
                                     "base_weights_sha256": check["base_weights_sha256"]})
    return check


def merge(
    params: dict,
    adapter_dir: Path,
    merged_dir: Path,
    prompts: list[str],
    *,
    metrics_file: Path | None = METRICS_DIR / "merge.json",
    model_dir: Path | None = None,
) -> dict:
    """Merge adapter_dir into the base merge.base names, verify, save merged_dir; returns the metrics
    (raises MergeError). model_dir overrides params model.name (tests)."""
    cfg = group_settings("merge", params["merge"])  # checked, defaults filled in (table2text.config)
    merged_dir = Path(merged_dir)
    check_writable(merged_dir.parent, "merged model folder")  # before minutes of work, not after
    if metrics_file is not None:
        check_writable(Path(metrics_file).parent, "metrics folder")
    device = model_sources.pick_device(cfg["device"])
    model_dir = Path(model_dir) if model_dir else model_sources.resolve_model(params["model"]["name"])
    phases.enter("load", "base identity, tokenizer")  # its weights hashed
    info = finetuned.read_training_info(adapter_dir)
    base_sha256 = finetuned.check_base_identity(adapter_dir, info, model_dir)
    tokenizer = model_sources.load_tokenizer(model_dir)
    prompt_ids = [tokenizer(p, add_special_tokens=True).input_ids for p in prompts[: int(cfg["verify_prompts"])]]
    if not prompt_ids:
        raise MergeError("no validation prompts to verify the merged model on")

    # The stated model in fp32, unmerged: what the merged checkpoint must reproduce.
    phases.detail("stated model")
    stated, base_model, name = stated_model(params, cfg["base"], adapter_dir, model_dir, device, info)
    phases.enter("work")  # merging and the fidelity check of each saved candidate
    reference = StatedReference(stated, prompt_ids, device, base_model)

    def verify(dtype_name: str):
        def check_folder(folder: Path) -> dict:
            # The saved weights upcast and computed in fp32 on every device, so the check measures the
            # rounding of the saved weights alone (bf16 compute on a GPU adds noise of its own).
            saved = model_sources.load_model(folder, quantization="none", dtype=torch.float32, device=device).eval()
            check = reference.measure(saved)
            del saved
            problem = fidelity_problem(check, float(cfg["max_error_ratio"]))
            if problem is None and dtype_name == "float16":
                problem = fp16_problem(folder, prompt_ids, device)
            return {**check, "problem": problem, "dtype": dtype_name, "base": cfg["base"],
                    "base_weights_sha256": base_sha256}
        return check_folder

    merged_dir.parent.mkdir(parents=True, exist_ok=True)
    attempts = []
    for dtype_name in AUTO if cfg["dtype"] == "auto" else (cfg["dtype"],):
        needed = int(estimated_bytes(stated, model_dir, DTYPES[dtype_name]) * DISK_MARGIN) + DISK_SLACK_BYTES
        check_free_space(merged_dir.parent, needed, f"the merged model ({dtype_name})")
        try:
            check = save_checked(stated, tokenizer, merged_dir, DTYPES[dtype_name], name, verify(dtype_name))
        except Unfaithful as refused:
            check = refused.check
        attempts.append({"dtype": dtype_name, "error_ratio": check["error_ratio"], "problem": check["problem"]})
        if check["problem"] is None:
            break

    passed = check["problem"] is None
    refused = "; ".join(f"{a['dtype']} refused: {a['problem']}" for a in attempts if a["problem"])
    metrics = {
        "base": cfg["base"],
        "dtype": cfg["dtype"],
        "stored_dtype": dtype_name if passed else None,
        "reason": refused or f"{dtype_name} proved faithful",
        "prompts": len(prompt_ids),
        **{k: check[k] for k in ("adapter_effect", "merge_error", "error_ratio")},
        "max_error_ratio": float(cfg["max_error_ratio"]),
        "attempts": attempts,
        "passed": passed,
        "eos_token_id": end_token_ids(tokenizer),
        "base_weights_sha256": base_sha256,
    }
    if metrics_file is not None:  # written before failing too: it says by how much
        write_json(metrics_file, metrics)
    if not passed:
        raise MergeError(f"merged model ({dtype_name}) is not base + adapter on {len(prompt_ids)} validation "
                         f"prompts: {check['problem']}")
    return metrics


def stated_model(params: dict, base: str, train_dir: Path, model_dir: Path, device: torch.device, info: dict):
    """(the stated model in fp32, the base to measure the effect against: None for a PeftModel, whose
    adapter is switched off instead; the merged model's name) of the train folder's method."""
    if finetuned.training_method(info) == "full":
        if base != "trained":
            raise MergeError(f"merge.base {base!r}: {Path(train_dir).as_posix()} holds a fully fine-tuned model "
                             "(train.method full), which is on no base: set merge.base: trained")
        stated = finetuned.load_full_model(train_dir, model_dir, device, torch.float32, info)
        base_model = model_sources.load_model(model_dir, quantization="none", dtype=torch.float32, device=device)
        return stated, base_model.eval(), f"{params['model']['name']} fully fine-tuned ({Path(train_dir).as_posix()})"
    stated = finetuned.load_adapter_model(train_dir, model_dir, device, torch.float32, base=base, info=info)
    return stated, None, f"{params['model']['name']} + LoRA {Path(train_dir).as_posix()} (on the {base} base)"


def fp16_problem(folder: Path, prompt_ids, device) -> str | None:
    """fp16 must prove itself against bf16 on the same prompts: Gemma 3's activations overflow fp16."""
    fp16 = model_sources.load_model(folder, quantization="none", dtype=torch.float16, device=device).eval()
    bf16 = model_sources.load_model(folder, quantization="none", dtype=torch.bfloat16, device=device).eval()
    result = compare_logits(bf16, fp16, prompt_ids, device)
    if not result["finite"] or result["top1_agreement"] < 0.98:
        return (f"float16 outputs are {'finite' if result['finite'] else 'NOT finite (overflow)'} with top-1 "
                f"agreement {result['top1_agreement']:.4f} against bf16 (need 0.98); use bfloat16 or auto")
    return None
