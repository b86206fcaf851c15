"""The export pipeline: the merged model written as one GGUF file per export.types entry and each file
verified against it before the output folder is replaced (the export stage, stages/export.py, runs it).

A file passes when the gguf package's reader finds the metadata and tensor names as written
(check_metadata), the tokenizer transformers rebuilds from it splits every verify prompt as the merged
model's does, and the model read back from it keeps its fp32 logits within export.bounds.<type> of the
merged model's (mean KL divergence, top-1 agreement; a bf16 file against the merged model with its weights
rounded to bf16, what bf16 can hold, the cost of that rounding reported as "storage"); its greedy outputs
are reported as the share identical to the merged model's.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from table2text import phases
from table2text.config import group_settings
from table2text.generation import generate
from table2text.io import readers
from table2text.io.atomic import current_umask, replace_dir, write_json
from table2text.model import gguf as gguf_export
from table2text.model import sources as model_sources
from table2text.model.fidelity import LogitDistance, compare_logits, prompt_logits
from table2text.paths import METRICS_DIR

METRICS_FILE = METRICS_DIR / "export.json"
DISABLED_NOTE = "EXPORT_DISABLED.txt"


def check_metadata(path: Path, read: dict, expected: dict) -> None:
    """The file's metadata and tensor names as written; raises ExportError naming the first difference."""
    meta, tensors = read["metadata"], read["tensors"]
    for key, value in expected["metadata"].items():
        if key not in meta:
            raise gguf_export.ExportError(f"{path.as_posix()}: metadata key {key} missing")
        got = meta[key]
        same = abs(got - value) <= 1e-6 * abs(value) if isinstance(value, float) else got == value
        if not same:
            shown = f"{len(got)} items" if isinstance(got, list) else repr(got)[:80]
            raise gguf_export.ExportError(f"{path.as_posix()}: metadata {key} is {shown}, expected "
                                          f"{f'{len(value)} items' if isinstance(value, list) else repr(value)[:80]}")
    if set(tensors) != set(expected["tensors"]):
        diff = sorted(set(tensors) ^ set(expected["tensors"]))
        raise gguf_export.ExportError(f"{path.as_posix()}: tensor {diff[0]} "
                                      f"{'unexpected' if diff[0] in tensors else 'missing'}")


def export(params: dict, merged_dir: Path, out_dir: Path, prompts: list[str], *,
           metrics_file: Path | None = METRICS_FILE) -> dict:
    """Write and verify every export.types file of merged_dir into out_dir; returns the metrics."""
    cfg = group_settings("export", params["export"])  # checked, defaults filled in (table2text.config)
    if not cfg["enabled"]:
        return write_disabled(out_dir, metrics_file)
    model_sources.check_safetensors(merged_dir)
    prompts = prompts[: cfg["verify_prompts"]]
    if not prompts:
        raise gguf_export.ExportError("no validation prompts to verify the exported model on")
    device = model_sources.pick_device(cfg["device"])
    phases.enter("load")
    tokenizer = model_sources.load_tokenizer(merged_dir)
    reference = merged_reference(merged_dir, tokenizer, prompts, cfg["max_new_tokens"], device,
                                 bf16_too="bf16" in cfg["types"])
    merged_config = json.loads((merged_dir / "config.json").read_text(encoding="utf-8"))

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    os.chmod(tmp, 0o777 & ~current_umask())  # a plain folder's permissions, not mkdtemp's private 0700
    metrics = {"enabled": True, "name": cfg["name"], "merged_dtype": merged_config.get("dtype"),
               "verify_compute_dtype": "float32", "prompts": len(prompts), "max_new_tokens": cfg["max_new_tokens"],
               "files": {}}
    failures = []
    tokenizer_fields = None
    try:
        phases.enter("work")  # writing each file and verifying it
        # each file parsed once by the gguf reader, for the metadata check and transformers' loader alike
        with gguf_export.parse_each_file_once():
            for out_type in cfg["types"]:
                file = tmp / f"{cfg['name']}-{out_type}.gguf"
                expected = gguf_export.write_gguf(merged_dir, file, out_type, name=cfg["name"],
                                                  tokenizer=tokenizer)
                read = gguf_export.read_metadata(file)
                check_metadata(file, read, expected)
                fields = {k: v for k, v in read["metadata"].items() if k.startswith("tokenizer.")}
                if tokenizer_fields is None:
                    check_tokenizer(file, prompts, reference["prompt_ids"], merged_dir)
                    tokenizer_fields = fields
                elif fields != tokenizer_fields:  # the same tokenizer in every file: one read-back covers all
                    raise gguf_export.ExportError(
                        f"{file.name}: tokenizer metadata differs from {cfg['types'][0]}'s")
                entry = verify_file(file, read, expected, reference, tokenizer, prompts, cfg, out_type, device)
                metrics["files"][out_type] = {"file": (out_dir / file.name).as_posix(), **entry}
                if not entry["passed"]:
                    failures.append(failure_line(out_type, entry, cfg["bounds"][out_type]))
        phases.enter("save")
        metrics["passed"] = not failures
        if metrics_file is not None:  # written before failing too: it says by how much
            write_json(metrics_file, metrics)
        if failures:
            raise gguf_export.ExportError(f"exported GGUF disagrees with {merged_dir.as_posix()} on "
                                          f"{len(prompts)} validation prompts: " + "; ".join(failures))

        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return metrics


def write_disabled(out_dir: Path, metrics_file: Path | None) -> dict:
    """export.enabled false: models/gguf is a DVC output, so it still exists, holding a note and no stale .gguf."""
    metrics = {"enabled": False, "files": {}}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    os.chmod(tmp, 0o777 & ~current_umask())
    (tmp / DISABLED_NOTE).write_text("export.enabled is false in params.yaml: no GGUF file was written.\n",
                                     encoding="utf-8")
    replace_dir(tmp, out_dir)
    if metrics_file is not None:
        write_json(metrics_file, metrics)
    return metrics


def merged_reference(merged_dir: Path, tokenizer, prompts: list[str], max_new_tokens: int, device, *,
                     bf16_too: bool = False) -> dict:
    """What the merged model computes (fp32 logits) and writes greedily on the prompts, once: what each
    exported file is held to. The model goes afterwards: with a read-back model beside it, two fp32 copies
    would be in memory.

    bf16_too: also the logits of the merged model with every weight a bf16 GGUF stores in bf16 (all but the
    1-D norms) rounded to bf16 -- what a bf16 file can hold exactly. A bf16 file is checked against these,
    so its bound measures the export alone; what bf16 storage itself costs against an fp32 merged model
    is reported beside it ("storage"), not mistaken for an export error."""
    prompt_ids = [tokenizer(p, add_special_tokens=True).input_ids for p in prompts]
    model = model_sources.load_model(merged_dir, dtype=torch.float32, device=device).eval()
    logits = prompt_logits(model, prompt_ids, device)
    text = generate(model, tokenizer, prompts, max_new_tokens, batch_size=len(prompts), device=device,
                    progress=False)
    reference = {"prompt_ids": prompt_ids, "logits": logits, "text": text}
    if bf16_too:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:  # round to nearest even, as the writer converts them
                    p.copy_(p.to(torch.bfloat16).float())
        reference["bf16_logits"] = prompt_logits(model, prompt_ids, device)
    del model
    return reference


def check_tokenizer(file: Path, prompts: list[str], prompt_ids: list[list[int]], merged_dir: Path) -> None:
    """The tokenizer a GGUF reader rebuilds from `file` must split the prompts as the merged model's does."""
    gguf_tokenizer = gguf_export.load_gguf_tokenizer(file)
    same = sum(gguf_tokenizer(p, add_special_tokens=True).input_ids == ids for p, ids in zip(prompts, prompt_ids))
    del gguf_tokenizer
    if same != len(prompts):
        raise gguf_export.ExportError(
            f"{file.name}: the tokenizer read back from the GGUF splits {len(prompts) - same} of "
            f"{len(prompts)} validation prompts differently from {merged_dir.as_posix()}'s")


def verify_file(file: Path, read: dict, expected: dict, reference: dict, tokenizer, prompts: list[str], cfg: dict,
                out_type: str, device) -> dict:
    """The model read back from `file` against the merged model's logits and outputs: its metrics entry
    (without "file"), "passed" saying whether it stayed within export.bounds.<out_type>."""
    model = gguf_export.load_gguf_model(file, device)
    # a bf16 file against the merged model as bf16 can hold it (see merged_reference); other types against
    # the merged model itself
    held_to = reference["bf16_logits"] if out_type == "bf16" else reference["logits"]
    logits = compare_logits(held_to, model, reference["prompt_ids"], device)
    text = generate(model, tokenizer, prompts, cfg["max_new_tokens"], batch_size=len(prompts), device=device,
                    progress=False)
    del model
    bound = cfg["bounds"][out_type]
    passed = (logits["finite"] and logits["mean_kl"] <= float(bound["max_mean_kl"])
              and logits["top1_agreement"] >= float(bound["min_top1_agreement"]))
    return {
        "bytes": file.stat().st_size,
        "sha256": readers.sha256_file(file),
        "tensors": expected["tensors_written"],
        "tensor_types": sorted({t for t, _ in read["tensors"].values()}),
        "metadata_keys": len(read["metadata"]),
        "vocab_size": len(read["metadata"]["tokenizer.ggml.tokens"]),
        "chat_template": "tokenizer.chat_template" in read["metadata"],
        "tokenizer_prompts_identical": len(prompts),
        **logits,
        "reference": "merged model, weights rounded to bf16" if out_type == "bf16" else "merged model",
        **({"storage": storage_cost(reference)} if out_type == "bf16" else {}),
        "greedy_identical": sum(a == b for a, b in zip(text, reference["text"])) / len(prompts),
        "max_mean_kl": float(bound["max_mean_kl"]),
        "min_top1_agreement": float(bound["min_top1_agreement"]),
        "passed": passed,
    }


def storage_cost(reference: dict) -> dict:
    """Mean KL and top-1 agreement of the bf16-rounded merged model against the merged model itself: what
    storing it in bf16 costs (0 when the merged model is bf16 already)."""
    distance = LogitDistance()
    for ref, rounded in zip(reference["logits"], reference["bf16_logits"]):
        distance.add(ref, rounded)
    result = distance.result()
    return {"mean_kl": result["mean_kl"], "top1_agreement": result["top1_agreement"]}


def failure_line(out_type: str, entry: dict, bound: dict) -> str:
    """Why a file failed its bounds (export.bounds.<out_type> as given), for the stage's one-line error."""
    return (f"{out_type}: mean KL {entry['mean_kl']:.2e} (max {bound['max_mean_kl']}), top-1 agreement "
            f"{entry['top1_agreement']:.4f} (min {bound['min_top1_agreement']}), max logit diff "
            f"{entry['max_logit_diff']:.3f}, finite={entry['finite']}")
