"""What the evaluate stage (stages/evaluate.py) does between reading the settings and printing its summary:
the fine-tuned model loaded as eval.model says, its predictions and the base model's (from the cache of
table2text.eval_cache when known), the scores and gains, and the files they are written to:
metrics/predictions.jsonl, metrics/eval.json (DVC-tracked: nothing that varies run to run), the per-bucket
plots under metrics/plots/, and the runtime record (how the run went: metrics/runtime/evaluate.json)."""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path

import torch

from table2text import eval_cache, phases
from table2text.errors import UserError
from table2text.generation import generate, resolve_decoder
from table2text.io import readers
from table2text.io.atomic import StagedOutputs, write_atomic
from table2text.metrics.totto import SUBSETS, plot_tables
from table2text.model import finetuned
from table2text.model import sources as model_sources
from table2text.paths import ADAPTER_DIR, MERGED_DIR, METRICS_DIR


PREDICTIONS_FILE = METRICS_DIR / "predictions.jsonl"
EVAL_FILE = METRICS_DIR / "eval.json"
PLOTS_DIR = METRICS_DIR / "plots"
PLOT_FILES = {"by_highlighted_cells": "by_highlighted.csv", "by_table_size": "by_table_size.csv"}


class EvalError(UserError):
    """Bad input or settings, reported as one line without a traceback."""


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
        info = finetuned.read_training_info(ADAPTER_DIR, required=False)
        if finetuned.training_method(info) != "full" or not (ADAPTER_DIR / "config.json").is_file():
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
    base exactly as training saw it (table2text.model.finetuned: the NF4-dequantised base under QLoRA), or
    under train.method full the trained weights that models/adapter holds."""
    check_finetuned_files(kind)
    if kind == "merged":
        return model_sources.load_model(MERGED_DIR, quantization="none", dtype=dtype, device=device)
    return finetuned.load_trained_model(ADAPTER_DIR, base_dir, device, dtype)


def generation_settings(cfg: dict, device: torch.device) -> dict:
    """generate()'s keyword arguments from the eval settings: the same for the fine-tuned and the base model.
    eval.decoder auto is resolved for `device` here (generation.resolve_decoder), so the runtime record and
    the base cache's key name the decoder that ran."""
    decoder = resolve_decoder(cfg["decoder"], device, cfg["cache"], cfg["num_beams"])
    return dict(max_new_tokens=cfg["max_new_tokens"], batch_size=cfg["batch_size"], device=device,
                cache=cfg["cache"], batch_tokens=cfg["batch_tokens"], fp32_matmul=cfg["fp32_matmul"],
                decoder=decoder, num_beams=cfg["num_beams"], length_penalty=cfg["length_penalty"])


def timed_generate(model, tokenizer, prompts: list[str], gen_args: dict) -> tuple[list[str], float]:
    """The model's predictions for `prompts` (table2text.generation.generate) and the seconds they took."""
    start = time.perf_counter()
    predictions = generate(model, tokenizer, prompts, **gen_args)
    return predictions, time.perf_counter() - start


def base_answers(base_dir: Path, tokenizer, prompts: list[str], gen_args: dict, dtype: torch.dtype,
                 device: torch.device) -> tuple[list[str], float | None, str]:
    """The untuned base model's predictions, seconds and cache outcome: "hit" when an earlier run of the same
    base, prompts and settings left them (table2text.eval_cache; seconds None), else "miss": generated now
    and stored."""
    cache_inputs = eval_cache.base_inputs(base_dir, prompts, {**gen_args, "device": None}, dtype, device)
    cache_key = eval_cache.base_key(cache_inputs)
    predictions = eval_cache.load(cache_key, len(prompts))
    if predictions is not None:
        return predictions, None, "hit"
    phases.enter("load", "base model")
    base = model_sources.load_model(base_dir, quantization="none", dtype=dtype, device=device)
    phases.enter("work", "base generation")
    predictions, seconds = timed_generate(base, tokenizer, prompts, gen_args)
    del base
    eval_cache.store(cache_key, cache_inputs, predictions)
    return predictions, seconds, "miss"


def eval_result(summary: dict, base_summary: dict | None, predictions: list[str], base_predictions: list[str] | None,
                examples: int, bleurt) -> dict:
    """metrics/eval.json (DVC-tracked, what `dvc metrics diff` compares): the scores only. How the run went
    (device, dtype, speed) varies from host to host and run to run: runtime_record."""
    overall_gain = (gain(summary, base_summary) or {}).get("overall", {})
    result = {
        # the headline, flat and short so that `dvc exp show` (README's command) fits them in 120 columns
        "bleu": summary["overall"]["bleu"],
        "parent_f": summary["overall"]["parent_f"],
        "parent_f_gain": overall_gain.get("parent_f"),
        "finetuned": drop_bleurt(summary, bleurt),
        "base": drop_bleurt(base_summary, bleurt),
        "gain": gain(summary, base_summary),
        "examples": examples,
    }
    if bleurt:
        result["bleurt"] = bleurt_report(summary, base_summary)
    if base_predictions is not None:
        result["same_as_base"] = sum(p == b for p, b in zip(predictions, base_predictions))
    return result


def runtime_record(cfg: dict, base_name: str, device: torch.device, dtype: torch.dtype, examples: int,
                   gen_args: dict, seconds: float, base_seconds: float | None, base_cache: str | None) -> dict:
    """metrics/runtime/evaluate.json (git-ignored, table2text.runtime): the model, device and dtype, and the
    generation's settings and speed."""
    return {
        "model": {"kind": cfg["model"], "base": base_name, "device": str(device), "dtype": str(dtype)},
        "generation": {
            "examples_per_s": examples / seconds if seconds > 0 else None,
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
