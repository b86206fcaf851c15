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
Bad input or settings end with one clear line on stderr and exit status 2. The work is table2text.evaluation.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from table2text import phases
from table2text.errors import run_cli
from table2text.evaluation import (EVAL_FILE, PLOTS_DIR, PREDICTIONS_FILE, base_answers, check_finetuned_files,
                                   eval_dtype, eval_result, finetune_warnings, generation_settings, load_finetuned,
                                   prediction_rows, read_processed, runtime_record, timed_generate, training_info,
                                   write_plots)
from table2text.io.atomic import check_writable, staged_outputs
from table2text.metrics.totto import compute_metrics, prepare_examples
from table2text.model import sources as model_sources
from table2text.params import default_params_file, load_params
from table2text.paths import RUNTIME_DIR, VALIDATION_FILE
from table2text.runtime import write_runtime


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
    phases.enter("load", "fine-tuned model")
    model = load_finetuned(cfg["model"], base_dir, device, dtype)
    phases.detail("tokenizer")
    tokenizer = model_sources.load_tokenizer(base_dir)  # the one preprocess built the prompts with
    bleurt = cfg["bleurt_checkpoint"] or None
    gen_args = generation_settings(cfg, device)

    phases.enter("work", "generation")
    predictions, seconds = timed_generate(model, tokenizer, prompts, gen_args)
    del model
    phases.detail("metrics")
    scoring = prepare_examples(records)  # the tables' side of PARENT, once for both models
    summary, per_example = compute_metrics(predictions, records, bleurt_checkpoint=bleurt, prepared=scoring)
    base_predictions = base_seconds = base_cache = base_summary = base_per_example = None
    if cfg["compare_base"]:  # the untuned base on the same prompts: every run shows its gain
        base_predictions, base_seconds, base_cache = base_answers(base_dir, tokenizer, prompts, gen_args, dtype, device)
        phases.detail("metrics")
        base_summary, base_per_example = compute_metrics(base_predictions, records, bleurt_checkpoint=bleurt,
                                                         prepared=scoring)

    rows = prediction_rows(records, predictions, per_example, base_predictions, base_per_example)
    result = eval_result(summary, base_summary, predictions, base_predictions, len(records), bleurt)
    runtime = runtime_record(cfg, params["model"]["name"], device, dtype, len(records), gen_args, seconds,
                             base_seconds, base_cache)
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


def cli(argv: list[str] | None = None) -> int:
    """Run main(); bad input or settings end with one clear line on stderr and exit status 2 (besides
    UserErrors: a missing file, and ValueErrors of the metrics, e.g. an unusable BLEURT checkpoint)."""
    return run_cli(main, "evaluate", argv, user_errors=(FileNotFoundError, ValueError))


if __name__ == "__main__":
    phases.exit_process(phases.timed("evaluate", cli))
