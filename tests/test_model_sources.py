"""table2text.model.sources' checks of model and adapter folders before anything loads them: a truncated or
non-JSON config, a config or adapter_config that disagrees with its weights, each one line naming the
file (infer exits 2 with it) instead of a JSONDecodeError or peft's size-mismatch traceback."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from stages import infer
from table2text.model import sources as model_sources
from table2text.model.sources import WeightsError, check_adapter_files, check_model_files


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model_dir) -> Path:
    """A rank-4 LoRA adapter of the tiny model, as the train stage saves it."""
    from peft import LoraConfig, get_peft_model

    folder = tmp_path_factory.mktemp("adapter") / "adapter"
    base = model_sources.load_model(tiny_model_dir, dtype=torch.float32, device=torch.device("cpu"))
    get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])).save_pretrained(folder)
    info = {"base_model": {"name": str(tiny_model_dir), "weights_sha256": model_sources.weights_sha256(tiny_model_dir)}}
    (folder / "training_info.json").write_text(json.dumps(info), encoding="utf-8")
    return folder


def copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / folder.name))


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text(encoding="utf-8")), **changes}), encoding="utf-8")


def test_sound_folders_pass(tiny_model_dir, adapter):
    assert check_model_files(tiny_model_dir)["hidden_size"] == 64
    assert check_adapter_files(adapter)["r"] == 4


@pytest.mark.parametrize("name", ["config.json", "tokenizer_config.json"])
def test_a_truncated_config_is_named(tiny_model_dir, tmp_path, name):
    folder = copy(tiny_model_dir, tmp_path)
    text = (folder / name).read_text(encoding="utf-8")
    (folder / name).write_text(text[: len(text) // 2], encoding="utf-8")
    loader = model_sources.load_tokenizer if name.startswith("tokenizer") else model_sources.load_model
    with pytest.raises(WeightsError) as err:
        loader(folder)
    message = str(err.value)
    assert message.startswith(f"{(folder / name).as_posix()}:") and "invalid JSON" in message
    assert message.endswith("fetch the model again, or rerun the stage that wrote the folder)") and "\n" not in message


def test_a_config_of_another_model_is_named(tiny_model_dir, tmp_path):
    folder = copy(tiny_model_dir, tmp_path)
    edit_json(folder / "config.json", hidden_size=640)
    with pytest.raises(WeightsError, match=r"config.json: fields 'vocab_size', 'hidden_size' \(262144 x 640\) disagree "
                                           r"with the weights' embedding 262144 x 64"):
        model_sources.load_model(folder, device=torch.device("cpu"))
    edit_json(folder / "config.json", hidden_size=64, num_hidden_layers=18)
    with pytest.raises(WeightsError, match=r"field 'num_hidden_layers' \(18\) disagrees with the weights' 2 layers"):
        check_model_files(folder)


def test_an_adapter_config_whose_rank_disagrees_with_the_weights_is_named(adapter, tmp_path):
    folder = copy(adapter, tmp_path)
    edit_json(folder / "adapter_config.json", r=8)
    with pytest.raises(WeightsError) as err:
        check_adapter_files(folder)
    assert str(err.value).startswith(f"{(folder / 'adapter_config.json').as_posix()}: field 'r': rank 8 disagrees "
                                     f"with {(folder / 'adapter_model.safetensors').as_posix()}, whose ")
    assert "(rank 4): the two files come from different runs; rerun the train stage" in str(err.value)
    edit_json(folder / "adapter_config.json", r=4, rank_pattern={"v_proj": 2})
    with pytest.raises(WeightsError, match=r"field 'rank_pattern': rank 2 disagrees .*v_proj.lora_A.weight"):
        check_adapter_files(folder)
    (folder / "adapter_config.json").write_text('{"r": 4, "lora_al', encoding="utf-8")
    with pytest.raises(WeightsError, match=r"adapter_config.json:1: invalid JSON .*\(the adapter's adapter_config.json: "
                                           r"rerun the train stage"):
        check_adapter_files(folder)


@pytest.fixture(autouse=True)
def fresh_process_device_line(monkeypatch):
    """pick_device says the device once a process (model_sources._SAID_DEVICE): each test starts as a fresh
    `python -m stages.infer` would, whatever earlier tests in this process picked."""
    monkeypatch.setattr(model_sources, "_SAID_DEVICE", set())


def run_infer(capsys, tmp_path, *argv) -> tuple[int, str]:
    table = tmp_path / "table.json"
    table.write_text(json.dumps({"rows": [["France", 3]], "highlight": [[0, 0]]}), encoding="utf-8")
    code = infer.cli([str(table), *map(str, argv), "--device", "cpu"])
    return code, capsys.readouterr().err


def test_infer_names_a_bad_adapter_in_one_line(adapter, tiny_model_dir, tmp_path, capsys):
    folder = copy(adapter, tmp_path)
    edit_json(folder / "adapter_config.json", r=16)
    code, err = run_infer(capsys, tmp_path, "--adapter", folder, "--base", tiny_model_dir)
    assert code == 2 and err.startswith("infer: error: ") and "field 'r': rank 16 disagrees" in err
    assert err.count("\n") == 1 and "Traceback" not in err

    edit_json(folder / "adapter_config.json", r=4)
    (folder / "training_info.json").write_text('{"base_model": {"na', encoding="utf-8")
    code, err = run_infer(capsys, tmp_path, "--adapter", folder)
    assert code == 2 and f"{(folder / 'training_info.json').as_posix()}:1: invalid JSON" in err
    assert err.rstrip().endswith("(the adapter's training_info.json: rerun the train stage)") and err.count("\n") == 1


def test_infer_names_a_model_folder_with_a_truncated_config(tiny_model_dir, tmp_path, capsys):
    folder = copy(tiny_model_dir, tmp_path)
    (folder / "config.json").write_text('{"architectures": ["Gemma3ForCausalLM"], "hidden_', encoding="utf-8")
    code, err = run_infer(capsys, tmp_path, "--model", folder)
    assert code == 2 and err.startswith(f"infer: error: {(folder / 'config.json').as_posix()}:1: invalid JSON")
    assert err.count("\n") == 1


def weights_folder(tmp_path: Path, data: bytes, age_s: float = 60.0) -> Path:
    """A model folder holding one valid safetensors file of `data` (a uint8 tensor), its mtime age_s ago."""
    from safetensors.torch import save_file

    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    file = folder / "model.safetensors"
    save_file({"w": torch.frombuffer(bytearray(data), dtype=torch.uint8)}, str(file))
    old = file.stat().st_mtime - age_s
    os.utime(file, (old, old))
    return folder


def plain_sha256(folder: Path) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def test_the_weights_hash_is_cached_by_stat_and_hashed_again_when_a_file_changes(tmp_path):
    cache = tmp_path / "cache"
    folder = weights_folder(tmp_path, b"a" * 64)
    first = model_sources.weights_sha256(folder, cache)
    assert first == plain_sha256(folder) == model_sources.weights_sha256(folder, None)
    (entry,) = cache.iterdir()
    # a hit reads the entry, not the file: a doctored digest comes back as it is
    saved = json.loads(entry.read_text(encoding="utf-8"))
    entry.write_text(json.dumps({**saved, "sha256": "f" * 64}), encoding="utf-8")
    assert model_sources.weights_sha256(folder, cache) == "f" * 64
    # the same size rewritten in place (same inode), with another (old) mtime: a miss, hashed afresh
    weights_folder(tmp_path, b"b" * 64, age_s=120.0)
    assert model_sources.weights_sha256(folder, cache) == plain_sha256(folder) != first
    entry.write_text("{not json", encoding="utf-8")  # a damaged entry only costs the hash
    assert model_sources.weights_sha256(folder, cache) == plain_sha256(folder)


def test_a_weights_file_written_just_now_is_hashed_but_not_cached(tmp_path):
    # file times are coarse: a same-size rewrite within the same tick could keep its stat (git's "racy" case)
    cache = tmp_path / "cache"
    folder = weights_folder(tmp_path, b"a" * 64, age_s=0.0)
    assert model_sources.weights_sha256(folder, cache) == plain_sha256(folder)
    assert not cache.exists() or not list(cache.iterdir())
