"""Stage 4: generate a sentence for every validation example and score it with the official ToTTo metrics.

    python -m stages.evaluate [--params FILE]

Reads params.yaml (eval.*, model.name; TOTTO_PARAMS or --params point at another file) and
data/processed/validation.jsonl. The fine-tuned model is models/merged (eval.model: merged) or the base
model with models/adapter on top (eval.model: adapter). With eval.compare_base the untuned base model
answers the same prompts, so every run shows its gain. Writes
  metrics/predictions.jsonl     one line per example: id, prompt, prediction (base_prediction), references,
                                overlap, PARENT of each prediction, highlighted cells and table size;
  metrics/eval.json             the headline (bleu, parent_f, parent_f_gain: fine-tuned overall), scores
                                (overall / overlap / non_overlap), gain over the base, and how many
                                predictions equal the base's (DVC-tracked: nothing that varies run to run);
  metrics/runtime/evaluate.json device, dtype, generation speed (git-ignored, see stages.runtime);
  metrics/plots/by_highlighted.csv, metrics/plots/by_table_size.csv   BLEU and PARENT F per bucket.
Bad input or settings end with one clear line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import time
from pathlib import Path

import torch

from stages import model_sources
from stages.atomic_io import write_atomic, write_json, write_jsonl
from stages.generation import FP32_MATMUL, generate
from stages.params import PARAMS_FILE, load_params
from stages.runtime import RUNTIME_DIR, write_runtime
from stages.totto_metrics import SUBSETS, compute_metrics, plot_tables

VALIDATION_FILE = Path("data/processed/validation.jsonl")
MERGED_DIR = Path("models/merged")
ADAPTER_DIR = Path("models/adapter")
PREDICTIONS_FILE = Path("metrics/predictions.jsonl")
EVAL_FILE = Path("metrics/eval.json")
PLOTS_DIR = Path("metrics/plots")
PLOT_FILES = {"by_highlighted_cells": "by_highlighted.csv", "by_table_size": "by_table_size.csv"}
MODEL_KINDS = ("merged", "adapter")


class EvalError(Exception):
    """Bad input or settings, reported as one line without a traceback."""


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    params = load_params(args.params)
    cfg = params["eval"]
    if cfg["model"] not in MODEL_KINDS:
        raise EvalError(f"eval.model must be one of {MODEL_KINDS}, got {cfg['model']!r}")
    fp32_matmul = cfg.get("fp32_matmul", "tf32")
    if fp32_matmul not in FP32_MATMUL:
        raise EvalError(f"eval.fp32_matmul must be one of {sorted(FP32_MATMUL)}, got {fp32_matmul!r}")
    if int(cfg.get("num_threads", 0) or 0) > 0:
        torch.set_num_threads(int(cfg["num_threads"]))
    records = read_processed(VALIDATION_FILE, int(cfg["max_examples"]))
    prompts = [r["prompt"] for r in records]
    check_finetuned_files(cfg["model"])  # fail before the slow loading starts

    device = model_sources.pick_device(cfg["device"])
    dtype = eval_dtype(cfg.get("dtype", "auto"), device)
    base_dir = model_sources.resolve_model(params["model"]["name"])
    model = load_finetuned(cfg["model"], base_dir, device, dtype)
    tokenizer = model_sources.load_tokenizer(base_dir)  # the one preprocess built the prompts with
    bleurt = cfg.get("bleurt_checkpoint") or None
    gen_args = dict(max_new_tokens=int(cfg["max_new_tokens"]), batch_size=int(cfg["batch_size"]), device=device,
                    cache=cfg.get("cache", "dynamic"), batch_tokens=int(cfg.get("batch_tokens", 0) or 0),
                    fp32_matmul=fp32_matmul)

    start = time.perf_counter()
    predictions = generate(model, tokenizer, prompts, **gen_args)
    seconds = time.perf_counter() - start
    del model
    summary, per_example = compute_metrics(predictions, records, bleurt_checkpoint=bleurt)

    base_predictions = base_summary = base_per_example = base_seconds = None
    if cfg["compare_base"]:
        base = model_sources.load_model(base_dir, quantization="none", dtype=dtype, device=device)
        start = time.perf_counter()
        base_predictions = generate(base, tokenizer, prompts, **gen_args)
        base_seconds = time.perf_counter() - start
        del base
        base_summary, base_per_example = compute_metrics(base_predictions, records, bleurt_checkpoint=bleurt)

    write_jsonl(PREDICTIONS_FILE, prediction_rows(records, predictions, per_example,
                                                  base_predictions, base_per_example))
    # metrics/eval.json (DVC-tracked, what `dvc metrics diff` compares): the scores only. How the run went
    # (device, dtype, speed) varies from host to host and run to run: metrics/runtime/evaluate.json.
    overall_gain = (gain(summary, base_summary) or {}).get("overall", {})
    result = {
        # the headline, flat and short so that `dvc exp show` (README's command) fits them in 120 columns
        "bleu": summary["overall"]["bleu"],
        "parent_f": summary["overall"]["parent_f"],
        "parent_f_gain": overall_gain.get("parent_f"),
        "finetuned": drop_bleurt(summary, bleurt),
        "base": drop_bleurt(base_summary, bleurt),
        "gain": gain(summary, base_summary),
        "examples": len(records),
    }
    if bleurt:
        result["bleurt"] = bleurt_report(summary, base_summary)
    if base_predictions is not None:
        result["same_as_base"] = sum(p == b for p, b in zip(predictions, base_predictions))
    runtime = {
        "model": {"kind": cfg["model"], "base": params["model"]["name"], "device": str(device), "dtype": str(dtype)},
        "generation": {
            "examples_per_s": len(records) / seconds if seconds > 0 else None,
            "seconds": seconds,
            "base_seconds": base_seconds,
            "batch_size": gen_args["batch_size"],
            "max_new_tokens": gen_args["max_new_tokens"],
            "cache": gen_args["cache"],
            "batch_tokens": gen_args["batch_tokens"],
            "fp32_matmul": gen_args["fp32_matmul"],
        },
    }
    write_json(EVAL_FILE, result)
    write_runtime("evaluate", runtime)
    write_plots(PLOTS_DIR, records, predictions, per_example, base_predictions, base_per_example)
    print_summary(result, runtime, training_info(cfg["model"]))
    return {**result, **runtime}
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m stages.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path(os.environ.get("TOTTO_PARAMS", PARAMS_FILE)),
                        help="params file (default: $TOTTO_PARAMS or params.yaml)")
    return parser.parse_args(argv)


def read_processed(path: Path, max_examples: int = 0) -> list[dict]:
    """Processed records of `path` (the first `max_examples`, all when 0); bad lines name file and line."""
    if not path.is_file():
        raise EvalError(f"{path.as_posix()}: no such file (run the preprocess stage first)")
    records = []
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise EvalError(f"{path.as_posix()}:{line_no}: invalid JSON ({err.msg})") from None
            for field in ("id", "prompt", "references", "table", "highlighted_cells"):
                if field not in record:
                    raise EvalError(f"{path.as_posix()}:{line_no}: field {field!r}: missing")
            if not isinstance(record["prompt"], str):
                raise EvalError(f"{path.as_posix()}:{line_no}: field 'prompt': expected str")
            records.append(record)
            if max_examples > 0 and len(records) == max_examples:
                break
    if not records:
        raise EvalError(f"{path.as_posix()}: no examples to evaluate")
    return records


def check_finetuned_files(kind: str) -> None:
    if kind == "merged" and not (MERGED_DIR / "config.json").is_file():
        raise EvalError(f"{MERGED_DIR.as_posix()}: no merged model (run the merge stage, or set eval.model: adapter)")
    if kind == "adapter" and not (ADAPTER_DIR / "adapter_config.json").is_file():
        raise EvalError(f"{ADAPTER_DIR.as_posix()}: no adapter_config.json (run the train stage)")


def eval_dtype(name: str, device: torch.device) -> torch.dtype:
    """eval.dtype: auto (the training choice: bf16 on GPUs, see model_sources.pick_dtype) | float32 | bfloat16.
    fp16 is refused: Gemma 3 overflows it."""
    if name == "auto":
        return model_sources.pick_dtype(device)
    if name in ("float32", "bfloat16"):
        return getattr(torch, name)
    raise EvalError(f"eval.dtype must be auto, float32 or bfloat16, got {name!r} (float16 overflows Gemma 3)")


def load_finetuned(kind: str, base_dir: Path, device: torch.device, dtype: torch.dtype):
    """models/merged as saved by the merge stage, or the base model with models/adapter applied."""
    check_finetuned_files(kind)
    if kind == "merged":
        return model_sources.load_model(MERGED_DIR, quantization="none", dtype=dtype, device=device)
    return load_with_adapter(ADAPTER_DIR, base_dir, device, dtype)


def load_with_adapter(adapter_dir: Path, base_dir: Path, device: torch.device, dtype: torch.dtype):
    """Base model (bf16, not quantised: inference needs no NF4) with the LoRA adapter on top."""
    from peft import PeftModel

    if not (adapter_dir / "adapter_config.json").is_file():
        raise EvalError(f"{adapter_dir.as_posix()}: no adapter_config.json (run the train stage)")
    check_adapter_base(adapter_dir, base_dir)
    model_sources.check_safetensors(adapter_dir, "adapter_model.safetensors")  # never peft's .bin fallback
    base = model_sources.load_model(base_dir, quantization="none", dtype=dtype, device=device)
    return PeftModel.from_pretrained(base, adapter_dir, is_trainable=False).to(device)


def adapter_base_name(adapter_dir: Path) -> str | None:
    """The base model name the adapter was trained on (training_info.json), None if not recorded."""
    info_file = adapter_dir / "training_info.json"
    if not info_file.is_file():
        return None
    info = json.loads(info_file.read_text(encoding="utf-8"))
    return (info.get("base_model") or {}).get("name")


def check_adapter_base(adapter_dir: Path, base_dir: Path) -> None:
    """Refuse an adapter trained on other base weights: its outputs would be meaningless."""
    info_file = adapter_dir / "training_info.json"
    if not info_file.is_file():
        return
    info = json.loads(info_file.read_text(encoding="utf-8"))
    expected = (info.get("base_model") or {}).get("weights_sha256")
    if expected and expected != model_sources.weights_sha256(base_dir):
        raise EvalError(f"{info_file.as_posix()}: field 'base_model.weights_sha256': the adapter was trained on "
                        f"other weights than {base_dir.as_posix()}")


def prediction_rows(records, predictions, per_example, base_predictions=None, base_per_example=None) -> list[dict]:
    rows = []
    for i, record in enumerate(records):
        row = {
            "id": record["id"],
            "prompt": record["prompt"],
            "prediction": predictions[i],
            "references": record["references"],
            "overlap": record.get("overlap"),
            "parent": per_example[i],
            "num_highlighted": len(record["highlighted_cells"]),
            "table_cells": sum(len(row) for row in record["table"]),
        }
        if base_predictions is not None:
            row["base_prediction"] = base_predictions[i]
            row["base_parent"] = base_per_example[i]
        rows.append(row)
    return rows


def gain(summary: dict, base_summary: dict | None) -> dict | None:
    """Fine-tuned minus base, BLEU and PARENT F per subset (None where a subset is empty)."""
    if base_summary is None:
        return None
    out = {}
    for subset in SUBSETS:
        out[subset] = {}
        for key in ("bleu", "parent_f"):
            tuned, base = summary[subset][key], base_summary[subset][key]
            out[subset][key] = None if tuned is None or base is None else tuned - base
    return out


def bleurt_report(summary: dict, base_summary: dict | None) -> dict:
    return {
        "finetuned": {s: summary[s]["bleurt"] for s in SUBSETS},
        "base": None if base_summary is None else {s: base_summary[s]["bleurt"] for s in SUBSETS},
    }


def write_plots(folder: Path, records, predictions, per_example, base_predictions=None, base_per_example=None):
    """CSV per breakdown: bucket, count, bleu, parent_f (+ base_bleu, base_parent_f with the base model)."""
    tables = plot_tables(predictions, records, per_example)
    base_tables = None if base_predictions is None else plot_tables(base_predictions, records, base_per_example)
    for name, file_name in PLOT_FILES.items():
        rows = [dict(row) for row in tables[name]]
        if base_tables is not None:
            base_rows = {row["bucket"]: row for row in base_tables[name]}
            for row in rows:  # same examples, so the same buckets
                row["base_bleu"] = base_rows[row["bucket"]]["bleu"]
                row["base_parent_f"] = base_rows[row["bucket"]]["parent_f"]
        columns = ["bucket", "count", "bleu", "parent_f"] + (["base_bleu", "base_parent_f"] if base_tables else [])
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
        write_atomic(folder / file_name, buffer.getvalue())


def training_info(kind: str) -> dict:
    """models/adapter/training_info.json ({} when absent): what the summary says about the training."""
    path = ADAPTER_DIR / "training_info.json"
    if not path.is_file():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


def print_summary(result: dict, runtime: dict, info: dict | None = None) -> None:
    """The end-of-run summary: scores of the fine-tuned and the base model, where the outputs are, and a
    warning when fine-tuning changed nothing that the scores could show."""
    def line(label, summary):
        o = summary["overall"]
        return f"  {label:<10} BLEU {o['bleu']:6.2f}  PARENT P/R/F {o['parent_precision']:.4f} / " \
               f"{o['parent_recall']:.4f} / {o['parent_f']:.4f}"

    gen, model = runtime["generation"], runtime["model"]
    print(f"evaluate: {result['examples']} examples on {model['device']} ({model['dtype'].removeprefix('torch.')}), "
          f"{gen['seconds']:.1f} s generation ({gen['examples_per_s']:.2f} examples/s)")
    print(line("fine-tuned", result["finetuned"]))
    if result["base"] is not None:
        print(line("base", result["base"]))
        g = result["gain"]["overall"]
        if g["bleu"] is not None and g["parent_f"] is not None:
            print(f"  {'gain':<10} BLEU {g['bleu']:+6.2f}  PARENT F {g['parent_f']:+.4f}")
    for warning in finetune_warnings(result, info or {}):
        print(f"evaluate: warning: {warning}")
    print(f"evaluate: scores -> {EVAL_FILE.as_posix()} (`dvc metrics show`), predictions -> "
          f"{PREDICTIONS_FILE.as_posix()}, per-bucket scores -> {PLOTS_DIR.as_posix()}/ (`dvc plots show`), "
          f"times -> {RUNTIME_DIR.as_posix()}/evaluate.json")


def finetune_warnings(result: dict, info: dict) -> list[str]:
    """Why the fine-tuned model may be no different from the base: every prediction equal to the base's,
    or a training whose every step ran at learning rate 0 (all warm-up)."""
    warnings = []
    same, n = result.get("same_as_base"), result["examples"]
    if same is not None and same == n:
        warnings.append(f"the fine-tuned model wrote exactly the base model's sentence for all {n} examples: "
                        "fine-tuning changed nothing measurable")
    elif same is not None and same * 2 > n:
        warnings.append(f"the fine-tuned model wrote the base model's sentence for {same} of {n} examples")
    lr_steps, steps = info.get("steps_with_nonzero_lr"), info.get("steps")
    if lr_steps is not None and steps and lr_steps < steps:
        if lr_steps == 0:
            cause = f"all {steps} optimiser steps ran at learning rate 0 (warm-up): the adapter is untrained"
        else:
            cause = f"only {lr_steps} of {steps} optimiser steps ran at a learning rate above 0 (warm-up)"
        if warnings or lr_steps == 0:
            warnings.append(f"{cause}; train longer (train.epochs, train.max_steps) or lower train.warmup_ratio")
    return warnings


def drop_bleurt(summary: dict | None, computed) -> dict | None:
    """The summary without its "bleurt": "not computed" entries when no BLEURT checkpoint is set (a string
    column in every `dvc metrics show` / `dvc exp show` otherwise)."""
    if summary is None or computed:
        return summary
    return {subset: {k: v for k, v in scores.items() if k != "bleurt"} for subset, scores in summary.items()}


def cli(argv: list[str] | None = None) -> int:
    try:
        main(argv)
    except (EvalError, FileNotFoundError, ValueError) as err:
        print(f"evaluate: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
