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
  metrics/runtime/evaluate.json device, dtype, generation speed (git-ignored, see table2text.runtime);
  metrics/plots/by_highlighted.csv, metrics/plots/by_table_size.csv   BLEU and PARENT F per bucket.
Bad input or settings end with one clear line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
import time
from pathlib import Path

import torch

from table2text import eval_cache, phases
from table2text.model import finetuned
from table2text.model import sources as model_sources
from table2text.io import readers
from table2text.io.atomic import StagedOutputs, check_writable, staged_outputs, write_atomic
from table2text.errors import UserError, run_cli
from table2text.generation import generate
from table2text.params import default_params_file, load_params
from table2text.runtime import RUNTIME_DIR, write_runtime
from table2text.metrics.totto import SUBSETS, compute_metrics, plot_tables

VALIDATION_FILE = Path("data/processed/validation.jsonl")
MERGED_DIR = Path("models/merged")
ADAPTER_DIR = Path("models/adapter")
PREDICTIONS_FILE = Path("metrics/predictions.jsonl")
EVAL_FILE = Path("metrics/eval.json")
PLOTS_DIR = Path("metrics/plots")
PLOT_FILES = {"by_highlighted_cells": "by_highlighted.csv", "by_table_size": "by_table_size.csv"}


class EvalError(UserError):
    """Bad input or settings, reported as one line without a traceback."""


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    params = load_params(args.params)  # eval.model, eval.fp32_matmul, ... checked there (table2text.config)
    cfg = params["eval"]
    if cfg["num_threads"] > 0:
        torch.set_num_threads(cfg["num_threads"])
    records = read_processed(VALIDATION_FILE, int(cfg["max_examples"]))
    prompts = [r["prompt"] for r in records]
    check_finetuned_files(cfg["model"])  # fail before the slow loading starts
    for folder in {PREDICTIONS_FILE.parent, EVAL_FILE.parent, PLOTS_DIR}:
        check_writable(folder)

    device = model_sources.pick_device(cfg["device"])
    dtype = eval_dtype(cfg["dtype"], device)
    base_dir = model_sources.resolve_model(params["model"]["name"])
    phases.enter("load")
    model = load_finetuned(cfg["model"], base_dir, device, dtype)
    tokenizer = model_sources.load_tokenizer(base_dir)  # the one preprocess built the prompts with
    bleurt = cfg["bleurt_checkpoint"] or None
    gen_args = dict(max_new_tokens=cfg["max_new_tokens"], batch_size=cfg["batch_size"], device=device,
                    cache=cfg["cache"], batch_tokens=cfg["batch_tokens"], fp32_matmul=cfg["fp32_matmul"],
                    decoder=cfg["decoder"], num_beams=cfg["num_beams"], length_penalty=cfg["length_penalty"])

    phases.enter("work")  # generation and the metrics
    start = time.perf_counter()
    predictions = generate(model, tokenizer, prompts, **gen_args)
    seconds = time.perf_counter() - start
    del model
    summary, per_example = compute_metrics(predictions, records, bleurt_checkpoint=bleurt)

    base_predictions = base_summary = base_per_example = base_seconds = base_cache = None
    if cfg["compare_base"]:
        # known from an earlier run of the same base, prompts and settings (table2text.eval_cache)?
        cache_inputs = eval_cache.base_inputs(base_dir, prompts, {**gen_args, "device": None}, dtype, device)
        cache_key = eval_cache.base_key(cache_inputs)
        base_predictions = eval_cache.load(cache_key, len(prompts))
        base_cache = "hit" if base_predictions is not None else "miss"
    if base_cache == "miss":
        phases.enter("load")
        base = model_sources.load_model(base_dir, quantization="none", dtype=dtype, device=device)
        phases.enter("work")
        start = time.perf_counter()
        base_predictions = generate(base, tokenizer, prompts, **gen_args)
        base_seconds = time.perf_counter() - start
        del base
        eval_cache.store(cache_key, cache_inputs, base_predictions)
    if base_predictions is not None:
        base_summary, base_per_example = compute_metrics(base_predictions, records, bleurt_checkpoint=bleurt)

    rows = prediction_rows(records, predictions, per_example, base_predictions, base_per_example)
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
            "base_seconds": base_seconds,  # None when compare_base is off or the cache held them
            "base_cache": base_cache,  # hit | miss (generated and stored) | None (compare_base off)
            "batch_size": gen_args["batch_size"],
            "max_new_tokens": gen_args["max_new_tokens"],
            "cache": gen_args["cache"],
            "batch_tokens": gen_args["batch_tokens"],
            "fp32_matmul": gen_args["fp32_matmul"],
            "decoder": gen_args["decoder"],
            "num_beams": gen_args["num_beams"],
            "length_penalty": gen_args["length_penalty"],
        },
    }
    phases.enter("save")
    with staged_outputs() as stage:  # predictions, summary and plots change together or not at all
        stage.write_jsonl(PREDICTIONS_FILE, rows)
        stage.write_json(EVAL_FILE, result)
        write_plots(PLOTS_DIR, records, predictions, per_example, base_predictions, base_per_example, stage)
    write_runtime("evaluate", runtime)
    print_summary(result, runtime, training_info(cfg["model"]))
    return {**result, **runtime}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m stages.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=default_params_file(),
                        help="params file (default: $TOTTO_PARAMS or params.yaml)")
    return parser.parse_args(argv)


def read_processed(path: Path, max_examples: int = 0) -> list[dict]:
    """Processed records of `path` (the first `max_examples`, all when 0), read and checked as every
    model stage reads them (table2text.io.readers); a bad line names file, line and field."""
    try:
        return readers.read_processed(path, max_examples)
    except readers.InputFileError as err:
        raise EvalError(str(err)) from None


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
    """models/merged as saved by the merge stage, or the model that was trained: models/adapter on the
    base exactly as training saw it (table2text.model.finetuned: the NF4-dequantised base under QLoRA)."""
    check_finetuned_files(kind)
    if kind == "merged":
        return model_sources.load_model(MERGED_DIR, quantization="none", dtype=dtype, device=device)
    return finetuned.load_adapter_model(ADAPTER_DIR, base_dir, device, dtype, base="trained")


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


def write_plots(folder: Path, records, predictions, per_example, base_predictions=None, base_per_example=None,
                stage: StagedOutputs | None = None):
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
        (stage.write if stage else write_atomic)(folder / file_name, buffer.getvalue())


def training_info(kind: str) -> dict:
    """models/adapter/training_info.json ({} when absent): what the summary says about the training."""
    return finetuned.read_training_info(ADAPTER_DIR, required=False) or {}


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
    """Run main(); bad input or settings end with one clear line on stderr and exit status 2 (besides
    UserErrors: a missing file, and ValueErrors of the metrics, e.g. an unusable BLEURT checkpoint)."""
    return run_cli(main, "evaluate", argv, user_errors=(FileNotFoundError, ValueError))


if __name__ == "__main__":
    sys.exit(phases.timed("evaluate", cli))
