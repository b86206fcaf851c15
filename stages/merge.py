"""Merge stage: fold the LoRA adapter into a base model and save a plain model that equals it.

    python -m stages.merge [--params params.yaml]

merge.base picks the model the merged checkpoint must reproduce: `trained` (the adapter on the base exactly
as training held it) or `original` (PEFT's merge_and_unload on the unquantised base); merge.dtype `auto`
saves bf16 when the fidelity check proves it faithful and fp32 otherwise. The merge and its check are
table2text.model.merging. After train.method full there is no adapter to fold: the merged model is the
trained weights of models/adapter, stored in merge.dtype by the same rule and check (adapter_effect: the base
against the trained model; merge_error: the stored model against it); merge.base must be trained.

Outputs: models/merged/ (safetensors, tokenizer, generation_config.json, merge_info.json), metrics/merge.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from table2text.io import readers
from table2text import phases
from table2text.errors import run_cli
from table2text.params import default_params_file, load_params
from table2text.model.merging import merge
from table2text.paths import ADAPTER_DIR, MERGED_DIR, VALIDATION_FILE



def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=default_params_file(),
                        help="params file (default: $TOTTO_PARAMS or params.yaml)")
    args = parser.parse_args(argv)

    params = load_params(args.params)  # every setting checked here, before anything is loaded
    prompts = [r["prompt"] for r in readers.read_processed(VALIDATION_FILE)]
    metrics = merge(params, ADAPTER_DIR, MERGED_DIR, prompts)
    effect, error = metrics["adapter_effect"], metrics["merge_error"]
    print(f"merge: {MERGED_DIR.as_posix()} ({metrics['stored_dtype']}, the {metrics['base']} base), "
          f"on {metrics['prompts']} prompts: adapter effect mean KL {effect['mean_kl']:.3e} "
          f"(top-1 agreement with the base {effect['top1_agreement']:.4f}), merge error mean KL "
          f"{error['mean_kl']:.3e} (ratio {metrics['error_ratio']:.2e}, top-1 {error['top1_agreement']:.4f})")
    if metrics["stored_dtype"] != "bfloat16" and metrics["dtype"] == "auto":
        print(f"merge: stored in {metrics['stored_dtype']}: {metrics['reason']}")


if __name__ == "__main__":
    # FileNotFoundError: model.name's folder missing
    phases.exit_process(phases.timed("merge", lambda: run_cli(main, "merge", user_errors=(FileNotFoundError,))))
