"""The base model's predictions in evaluate, kept by content hash (as DVC keeps outputs), so a re-run
with the same base model, prompts and decoding settings does not generate them again.

    .cache/eval-base/<sha256>.json    {"key": <sha256>, "inputs": {...what was hashed}, "predictions": [...]}

The key covers everything the predictions depend on: the base model's files (weights by content, config
and tokenizer files too), the prompts, every decoding setting (eval.max_new_tokens, batch_size, cache,
batch_tokens, fp32_matmul and the compute dtype), the device kind (and GPU name: kernels differ), the
torch and transformers versions and the source of the code that generates (table2text/generation.py,
graph_decode.py, model/sources.py, this file). Any change misses the cache and generates afresh. The folder is
git-ignored, no DVC output and not a metric: deleting it only costs the next run the base generation.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

from table2text.model import sources as model_sources
from table2text.io.atomic import write_json

CACHE_DIR = Path(".cache/eval-base")
# the code whose changes can change the base model's outputs
# the code that turns a base model and prompts into predictions (relative to the table2text package)
CODE_FILES = ("generation.py", "graph_decode.py", "model/sources.py", "eval_cache.py")
FORMAT = 1


def model_files_sha256(model_dir: Path) -> dict:
    """{file name: sha256} of the model folder: the weights (model_sources.weights_sha256) and each other
    file (config.json, generation_config.json, tokenizer files)."""
    model_dir = Path(model_dir)
    digests = {"weights": model_sources.weights_sha256(model_dir)}
    for file in sorted(model_dir.iterdir()):
        if file.is_file() and file.suffix != ".safetensors":
            digests[file.name] = hashlib.sha256(file.read_bytes()).hexdigest()
    return digests


def code_sha256() -> dict:
    here = Path(__file__).resolve().parent
    return {name: hashlib.sha256((here / name).read_bytes()).hexdigest() for name in CODE_FILES}


def base_inputs(model_dir: Path, prompts: list[str], settings: dict, dtype: torch.dtype,
                device: torch.device) -> dict:
    """Everything the base model's predictions depend on, as hashed by base_key."""
    import transformers

    return {
        "format": FORMAT,
        "model": model_files_sha256(model_dir),
        "prompts_sha256": hashlib.sha256(json.dumps(prompts, ensure_ascii=False).encode("utf-8")).hexdigest(),
        "prompts": len(prompts),
        "settings": {k: settings[k] for k in sorted(settings)},
        "dtype": str(dtype).removeprefix("torch."),
        "device": device.type,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "code": code_sha256(),
    }


def base_key(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode("utf-8")).hexdigest()


def cache_file(key: str, folder: Path | None = None) -> Path:
    return Path(folder if folder is not None else CACHE_DIR) / f"{key}.json"


def load(key: str, n_prompts: int, folder: Path | None = None) -> list[str] | None:
    """The cached predictions under `key`, None when there are none. An entry that does not hold `key`'s
    predictions (a truncated or edited file) is reported on stderr and ignored: the caller generates and
    overwrites it."""
    path = cache_file(key, folder)
    if not path.is_file():
        return None
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
        predictions = entry["predictions"]
        if entry["key"] != key or len(predictions) != n_prompts or not all(isinstance(p, str) for p in predictions):
            raise ValueError("key or predictions do not match")
    except (ValueError, KeyError, TypeError) as err:
        print(f"evaluate: ignoring the unusable base cache entry {path.as_posix()} ({err}); generating again",
              file=sys.stderr)
        return None
    return predictions


def store(key: str, inputs: dict, predictions: list[str], folder: Path | None = None) -> Path:
    path = cache_file(key, folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"key": key, "inputs": inputs, "predictions": predictions})
    return path
