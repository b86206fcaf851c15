"""Which model does the pipeline ship? Scores of the trained model and of every merge of its adapter.

    python -m bench.merge_fidelity --name NAME --fetaqa DIR --totto DIR [--set group.key=value ...] --out DIR

Trains one recipe on FeTaQA train (the preprocess and train stages, as dvc runs them), then scores on
FeTaQA validation and ToTTo dev (same prompts, decoding and scorer for all):
  trained          the model training optimised: the adapter on the base as training saw it (eval.model adapter)
  original-adapter the adapter on the original base, unmerged
  trained-bf16 / trained-fp32     merged into the trained base (merge.base trained), stored in bf16 / fp32
  original-bf16 / original-fp32   merged into the original base (PEFT's merge_and_unload), bf16 / fp32
For each merge the fidelity check's numbers (adapter effect, merge error, their ratio) are recorded and the
merge is kept even where the stage would refuse it (merge.max_error_ratio 0.99 here), so that its score is
measured too; `passes_default` says what the stage decides at the params.yaml bound. Paired bootstrap of
per-example PARENT F against the trained model, and the share of predictions equal to its predictions.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from bench import common
from bench.results_table import paired_bootstrap
from bench.run_recipe import apply_override
from table2text.model import finetuned
from table2text.model import sources as model_sources
from table2text.evaluation import read_processed
from table2text.generation import generate
from table2text.params import load_params
from table2text.metrics.totto import compute_metrics
from table2text.model import merging

VARIANTS = ("trained", "original-adapter", "trained-bf16", "trained-fp32", "original-bf16", "original-fp32")
COMMON = ["eval.batch_size=500", "eval.batch_tokens=131072", "eval.compare_base=false", "merge.device=cuda",
          "train.save_steps=100000"]


def stage(name: str, params_file: Path) -> float:
    cmd = [sys.executable, "-m", f"stages.{name}", "--params", str(params_file)]
    if name == "train":
        cmd.append("--no-dvclive")
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - start


def write_params(params: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    return path


def load_variant(variant: str, params: dict, base_dir: Path, prompts: list[str], work: Path, device):
    """(model, merge check or None) for one variant."""
    adapter = finetuned.ADAPTER_DIR
    if variant in ("trained", "original-adapter"):
        base = "trained" if variant == "trained" else "original"
        return finetuned.load_adapter_model(adapter, base_dir, device, torch.float32, base=base), None
    base, dtype = variant.split("-")
    merge_params = copy.deepcopy(params)
    merge_params["merge"].update(base=base, dtype={"bf16": "bfloat16", "fp32": "float32"}[dtype],
                                 max_error_ratio=0.99)
    folder = work / f"merged-{variant}"
    check = merging.merge(merge_params, adapter, folder, prompts, metrics_file=None)
    check["passes_default"] = check["error_ratio"] <= float(params["merge"]["max_error_ratio"])
    model = model_sources.load_model(folder, quantization="none", dtype=torch.float32, device=device)
    return model, check


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--fetaqa", type=Path, required=True)
    parser.add_argument("--totto", type=Path, required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path("bench-work")
    work.mkdir(exist_ok=True)

    params = load_params()
    for assignment in [*COMMON, *args.set]:
        apply_override(params, assignment)
    timings = {}
    # ToTTo dev prompts first (preprocess writes data/processed/), then the FeTaQA run the model trains on.
    totto = copy.deepcopy(params)
    totto["data"].update(source="totto", path=str(args.totto))
    timings["preprocess_totto"] = stage("preprocess", write_params(totto, work / "params-totto.yaml"))
    shutil.copy2("data/processed/validation.jsonl", work / "totto-validation.jsonl")
    params["data"].update(source="fetaqa", path=str(args.fetaqa))
    params_file = write_params(params, args.out / f"params-merge-fidelity-{args.name}.yaml")
    timings["preprocess"] = stage("preprocess", params_file)
    timings["train"] = stage("train", params_file)

    sets = {"fetaqa": read_processed(Path("data/processed/validation.jsonl")),
            "totto": read_processed(work / "totto-validation.jsonl")}
    device = model_sources.pick_device(args.device)
    base_dir = model_sources.resolve_model(params["model"]["name"])
    tokenizer = model_sources.load_tokenizer(base_dir)
    ev = params["eval"]
    gen_args = dict(max_new_tokens=int(ev["max_new_tokens"]), batch_size=int(ev["batch_size"]), device=device,
                    cache=ev["cache"], batch_tokens=int(ev["batch_tokens"]), fp32_matmul=ev["fp32_matmul"],
                    progress=False)
    results, predictions = {}, {}
    for variant in args.variants:
        start = time.perf_counter()
        model, check = load_variant(variant, params, base_dir, [r["prompt"] for r in sets["fetaqa"]], work, device)
        entry = {"merge_check": check, "scores": {}}
        for name, records in sets.items():
            preds = generate(model, tokenizer, [r["prompt"] for r in records], **gen_args)
            summary, per_example = compute_metrics(preds, records)
            entry["scores"][name] = summary
            predictions[(variant, name)] = {r["id"]: (p, e["parent_f"]) for r, p, e in zip(records, preds, per_example)}
        del model
        torch.cuda.empty_cache()
        entry["seconds"] = time.perf_counter() - start
        results[variant] = entry
        o = entry["scores"]["fetaqa"]["overall"]
        print(f"{variant}: FeTaQA BLEU {o['bleu']:.2f} PARENT F {o['parent_f']:.4f}", flush=True)

    reference = args.variants[0]
    for variant in args.variants:
        for name in sets:
            ref, got = predictions[(reference, name)], predictions[(variant, name)]
            results[variant].setdefault("vs_" + reference, {})[name] = {
                "identical_predictions": sum(got[i][0] == ref[i][0] for i in ref) / len(ref),
                "parent_f_bootstrap": paired_bootstrap({i: v[1] for i, v in got.items()},
                                                       {i: v[1] for i, v in ref.items()}),
            }
    row = {"name": args.name, "overrides": args.set, "timings": timings, "variants": results}
    common.write_results(args.out, f"merge-fidelity-{args.name}", [row],
                         {"command": "python -m bench.merge_fidelity " + " ".join(sys.argv[1:] if argv is None else argv)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
