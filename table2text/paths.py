"""Where the pipeline's files live, relative to the project root (the one home of these names; dvc.yaml
declares the same paths as the stages' deps and outs)."""

import os
from pathlib import Path

PROCESSED_DIR = Path("data/processed")
TRAIN_FILE = PROCESSED_DIR / "train.jsonl"
VALIDATION_FILE = PROCESSED_DIR / "validation.jsonl"
ADAPTER_DIR = Path("models/adapter")
MERGED_DIR = Path("models/merged")
GGUF_DIR = Path("models/gguf")
CHECKPOINT_DIR = Path("checkpoints")  # resume points: not a DVC output (see stages/train.py)
METRICS_DIR = Path("metrics")
RUNTIME_DIR = METRICS_DIR / "runtime"  # how stages ran: git-ignored (table2text.runtime)


def cache_root() -> Path:
    """Per-user cache of what is derived from the base model (the converted packaged model, built
    tokenizers), outside any project folder; TOTTO_GEMMA_CACHE overrides the default."""
    env = os.environ.get("TOTTO_GEMMA_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "totto-gemma"
