"""What the bf16 rounding of an fp32 merged model costs in the exported GGUF (export.bounds.bf16).

    python bench/export_fp32_bf16.py [TYPE ...] [--out DIR]

Merges models/adapter into the base of params model.name in fp32 (what merge.dtype: float32 saves), then
runs the export pipeline (table2text.model.export.export) on that folder for the given types (default
bf16) with the committed params, on the CPU, and prints metrics/export.json's content for it. Run from the
repository root after `dvc repro merge`. Nothing here is a DVC output.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    import torch
    from peft import PeftModel

    from table2text.model import export as model_export
    from table2text.model import sources as model_sources
    from table2text.params import load_params
    from table2text.io.readers import read_processed

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("types", nargs="*", default=["bf16"])
    parser.add_argument("--out", type=Path, default=None, help="working folder (default: a temp folder)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="export-fp32-"))
    params = load_params(REPO / "params.yaml")
    base = model_sources.resolve_model(params["model"]["name"])
    merged = out / "merged-fp32"
    if not (merged / "model.safetensors").is_file():
        model = model_sources.load_model(base, dtype=torch.float32, device=torch.device("cpu"))
        model = PeftModel.from_pretrained(model, REPO / "models" / "adapter").merge_and_unload()
        model.save_pretrained(merged, safe_serialization=True)
        model_sources.load_tokenizer(base).save_pretrained(merged)
    params["export"].update(types=args.types, device="cpu")
    prompts = [r["prompt"] for r in read_processed(REPO / "data" / "processed" / "validation.jsonl")]
    metrics = model_export.export(params, merged, out / "gguf", prompts, metrics_file=out / "export.json")
    print(json.dumps(metrics, indent=1))


if __name__ == "__main__":
    main()
