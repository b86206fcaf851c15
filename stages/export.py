"""Export stage: the merged model as GGUF files for llama.cpp, Ollama and LM Studio, each one verified.

    python -m stages.export [--params params.yaml]

For every type in export.types (bf16, q8_0, ...: table2text.model.gguf.TYPES) it writes
models/gguf/<export.name>-<type>.gguf from models/merged, then reads the file back: its metadata with the
gguf package's reader (architecture, shapes, vocabulary, special tokens, chat template, tensor names),
its tokenizer and weights with transformers' GGUF loader. On export.verify_prompts validation prompts the
read-back model's logits are compared with the merged model's (both computed in fp32) and must stay
within export.bounds.<type> (mean KL divergence, top-1 agreement); its greedy outputs are reported as the
share identical to the merged model's. The stage fails with one line when any check fails, and the
folder is replaced only when every file passed.

Outputs: models/gguf/ (one .gguf a type), metrics/export.json (no timings: it is DVC-tracked).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from table2text.model import gguf as gguf_export
from table2text.model import sources as model_sources
from table2text.io import readers
from table2text.io.atomic import current_umask, replace_dir, write_json
from table2text.config import group_settings
from table2text.errors import run_cli
from table2text.model.fidelity import compare_logits, prompt_logits
from table2text.generation import generate
from table2text.params import default_params_file, load_params

MERGED_DIR = Path("models/merged")
GGUF_DIR = Path("models/gguf")
VALIDATION_FILE = Path("data/processed/validation.jsonl")
METRICS_FILE = Path("metrics/export.json")
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
        # models/gguf is a DVC output, so it still exists: holding a note, and no stale .gguf to record
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
    model_sources.check_safetensors(merged_dir)
    prompts = prompts[: cfg["verify_prompts"]]
    if not prompts:
        raise gguf_export.ExportError("no validation prompts to verify the exported model on")
    device = model_sources.pick_device(cfg["device"])
    tokenizer = model_sources.load_tokenizer(merged_dir)
    prompt_ids = [tokenizer(p, add_special_tokens=True).input_ids for p in prompts]
    reference = model_sources.load_model(merged_dir, dtype=torch.float32, device=device).eval()
    # what the merged model computes and writes greedily, once: the logits and outputs each exported file
    # is held to (then the model goes: with a read-back model beside it, two fp32 copies in memory)
    reference_logits = prompt_logits(reference, prompt_ids, device)
    reference_text = generate(reference, tokenizer, prompts, cfg["max_new_tokens"], batch_size=len(prompts),
                              device=device, progress=False)
    del reference
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
                    # the tokenizer as a GGUF reader rebuilds it must split the prompts as the merged model's
                    gguf_tokenizer = gguf_export.load_gguf_tokenizer(file)
                    same = sum(gguf_tokenizer(p, add_special_tokens=True).input_ids == ids
                               for p, ids in zip(prompts, prompt_ids))
                    del gguf_tokenizer
                    if same != len(prompts):
                        raise gguf_export.ExportError(
                            f"{file.name}: the tokenizer read back from the GGUF splits {len(prompts) - same} of "
                            f"{len(prompts)} validation prompts differently from {merged_dir.as_posix()}'s")
                    tokenizer_fields = fields
                elif fields != tokenizer_fields:  # the same tokenizer in every file: one read-back covers all
                    raise gguf_export.ExportError(
                        f"{file.name}: tokenizer metadata differs from {cfg['types'][0]}'s")
                model = gguf_export.load_gguf_model(file, device)
                logits = compare_logits(reference_logits, model, prompt_ids, device)
                text = generate(model, tokenizer, prompts, cfg["max_new_tokens"], batch_size=len(prompts),
                                device=device, progress=False)
                del model
                bound = cfg["bounds"][out_type]
                passed = (logits["finite"] and logits["mean_kl"] <= float(bound["max_mean_kl"])
                          and logits["top1_agreement"] >= float(bound["min_top1_agreement"]))
                metrics["files"][out_type] = {
                    "file": (out_dir / file.name).as_posix(),
                    "bytes": file.stat().st_size,
                    "sha256": readers.sha256_file(file),
                    "tensors": expected["tensors_written"],
                    "tensor_types": sorted({t for t, _ in read["tensors"].values()}),
                    "metadata_keys": len(read["metadata"]),
                    "vocab_size": len(read["metadata"]["tokenizer.ggml.tokens"]),
                    "chat_template": "tokenizer.chat_template" in read["metadata"],
                    "tokenizer_prompts_identical": len(prompts),
                    **logits,
                    "greedy_identical": sum(a == b for a, b in zip(text, reference_text)) / len(prompts),
                    "max_mean_kl": float(bound["max_mean_kl"]),
                    "min_top1_agreement": float(bound["min_top1_agreement"]),
                    "passed": passed,
                }
                if not passed:
                    failures.append(
                        f"{out_type}: mean KL {logits['mean_kl']:.2e} (max {bound['max_mean_kl']}), top-1 "
                        f"agreement {logits['top1_agreement']:.4f} (min {bound['min_top1_agreement']}), max logit "
                        f"diff {logits['max_logit_diff']:.3f}, finite={logits['finite']}")
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=default_params_file(),
                        help="params file (default: $TOTTO_PARAMS or params.yaml)")
    args = parser.parse_args(argv)

    params = load_params(args.params)  # every setting checked here, before anything is loaded
    prompts = [r["prompt"] for r in readers.read_processed(VALIDATION_FILE)]
    started = time.monotonic()
    metrics = export(params, MERGED_DIR, GGUF_DIR, prompts)
    if not metrics["enabled"]:
        print("export: disabled (export.enabled: false), no GGUF written")
        return
    for out_type, m in metrics["files"].items():
        print(f"export: {m['file']} ({m['bytes'] / 2**20:.0f} MiB), mean KL {m['mean_kl']:.2e}, top-1 agreement "
              f"{m['top1_agreement']:.4f}, max logit diff {m['max_logit_diff']:.3f}, greedy outputs identical "
              f"{m['greedy_identical']:.0%} on {metrics['prompts']} prompts")
    # printed only: metrics/export.json is DVC-tracked and holds nothing that varies between runs
    print(f"export: {len(metrics['files'])} files written and verified in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    # FileNotFoundError: models/merged or its files missing
    sys.exit(run_cli(main, "export", user_errors=(FileNotFoundError,)))
