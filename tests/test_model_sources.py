"""table2text.model.sources' checks of model and adapter folders before anything loads them: a truncated or
non-JSON config, a config or adapter_config that disagrees with its weights, each one line naming the
file (infer exits 2 with it) instead of a JSONDecodeError or peft's size-mismatch traceback."""

from __future__ import annotations

import json
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
