"""Export stage: the merged model as GGUF files for llama.cpp, Ollama and LM Studio, each one verified.

    python -m stages.export [--params params.yaml]

For every type in export.types (bf16, q8_0, ...: table2text.model.gguf.TYPES) it writes
models/gguf/<export.name>-<type>.gguf from models/merged, then reads the file back: its metadata with the
gguf package's reader (architecture, shapes, vocabulary, special tokens, chat template, tensor names),
its tokenizer and weights with transformers' GGUF loader. On export.verify_prompts validation prompts the
read-back model's logits are compared with the merged model's (both computed in fp32) and must stay
within export.bounds.<type> (mean KL divergence, top-1 agreement); its greedy outputs are reported as the
share identical to the merged model's. The stage fails with one line when any check fails, and the
folder is replaced only when every file passed. The pipeline is table2text.model.export.

Outputs: models/gguf/ (one .gguf a type), metrics/export.json (no timings: it is DVC-tracked).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from table2text import phases
from table2text.errors import run_cli
from table2text.io import readers
from table2text.model.export import export
from table2text.params import default_params_file, load_params
from table2text.paths import GGUF_DIR, MERGED_DIR, VALIDATION_FILE


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
    phases.exit_process(phases.timed("export", lambda: run_cli(main, "export", user_errors=(FileNotFoundError,))))
