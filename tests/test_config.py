"""table2text.config: every setting typed and checked before anything loads; one line naming the key, exit 2.

The rejected settings are the ones of issue 15, written into a copy of the committed params.yaml the way
a user (or `dvc exp run -S`) would write them.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import write_processed
from table2text.config import (
    GROUPS,
    Config,
    ConfigError,
    TrainConfig,
    check_target_modules,
    load_config,
    math_keys,
)
from table2text.errors import UserError, run_cli
from table2text.params import load_params, validate_params
from table2text.training import loop

REPO = Path(__file__).resolve().parents[1]
PARAMS_TEXT = (REPO / "params.yaml").read_text(encoding="utf-8")


def set_line(text: str, key: str, value: str) -> str:
    """params.yaml text with the value of the (unique) key `key` replaced, its comment kept."""
    new, count = re.subn(rf"^(  {key}:)[^#\n]*", rf"\g<1> {value} ", text, flags=re.M)
    assert count == 1, f"{key} is not a unique key of params.yaml"
    return new


WARMUP_TEXT = set_line(PARAMS_TEXT, "warmup_ratio", "0.06")  # a real recipe's warm-up (the demo has none)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def rejected(tmp_path: Path, text: str) -> str:
    """The message of the ConfigError that loading `text` raises."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert message.startswith(f"{path.as_posix()}") and "\n" not in message
    return message


# ------------------------------------------------------------------------------ the settings of the issue
ISSUE_CASES = {
    # `dvc exp run -S +train.learning_rte=1e-4`: a new key, written under train:
    "learning_rte": (PARAMS_TEXT.replace("\ntrain:\n", "\ntrain:\n  learning_rte: 1e-4\n"),
                     "unknown key train.learning_rte (did you mean train.learning_rate?)"),
    "linearisation": (PARAMS_TEXT.replace("  linearization:", "  linearisation:"),
                      "unknown key data.linearisation (did you mean data.linearization?)"),
    "r 0": (set_line(PARAMS_TEXT, "r", "0"), "lora.r must be > 0, got 0"),
    "r eight": (set_line(PARAMS_TEXT, "r", "eight"), "lora.r must be an integer, got 'eight' (a str)"),
    "effective_batch 0": (set_line(PARAMS_TEXT, "effective_batch", "0"), "train.effective_batch must be > 0, got 0"),
    "lr -5e-5": (set_line(PARAMS_TEXT, "learning_rate", "-5e-5"), "train.learning_rate must be > 0, got -5e-05"),
    "max_length 1e3": (set_line(PARAMS_TEXT, "max_length", "1e3"),
                       "data.max_length must be an integer, got 1000.0 (a float)"),
    "max_length abc": (set_line(PARAMS_TEXT, "max_length", "abc"),
                       "data.max_length must be an integer, got 'abc' (a str)"),
    "group dta": (PARAMS_TEXT.replace("\ndata:\n", "\ndta:\n"), "unknown group dta (did you mean data?)"),
    "constant with warm-up": (set_line(WARMUP_TEXT, "lr_scheduler", "constant"),
                              "train.lr_scheduler: constant has no warm-up, but train.warmup_ratio is 0.06"),
}


@pytest.mark.parametrize("case", ISSUE_CASES)
def test_each_bad_setting_of_the_issue_is_one_line_naming_the_key(tmp_path, case):
    text, expected = ISSUE_CASES[case]
    assert expected in rejected(tmp_path, text)


def test_a_tab_in_params_yaml_names_file_and_line(tmp_path):
    text = PARAMS_TEXT.replace("\n  seed: 42                     # seed of the subsampling", "\n\tseed: 42")
    line = text[:text.index("\tseed")].count("\n") + 1
    message = rejected(tmp_path, text)
    assert message.startswith(f"{(tmp_path / 'params.yaml').as_posix()}:{line}:1: YAML syntax error: found character '\\t'")
    assert "a tab" in message


def test_full_fine_tuning_refuses_nf4_in_one_line_naming_train_quantization(tmp_path):
    # params.yaml's recipe is QLoRA (nf4): `dvc exp run -S train.method=full` alone must say what to change
    message = rejected(tmp_path, set_line(PARAMS_TEXT, "method", "full"))
    assert message.endswith("train.quantization must be none with train.method full (every weight is trained, "
                            "in fp32 master weights: frozen NF4 weights cannot be), got 'nf4'")
    full = set_line(set_line(PARAMS_TEXT, "method", "full"), "quantization", "none")
    cfg = load_config(write(tmp_path, full))
    assert cfg.train.method == "full" and cfg.train.quantization == "none"
    assert load_config(REPO / "params.yaml").train.method == "lora"  # the committed recipe is unchanged


def test_constant_with_warmup_is_offered_and_constant_without_warmup_is_fine(tmp_path):
    message = rejected(tmp_path, set_line(WARMUP_TEXT, "lr_scheduler", "constant"))
    assert "set train.warmup_ratio: 0, or train.lr_scheduler: constant_with_warmup" in message
    assert load_config(write(tmp_path, set_line(WARMUP_TEXT, "lr_scheduler", "constant_with_warmup"))).train.warmup_ratio == 0.06
    no_warmup = set_line(set_line(PARAMS_TEXT, "lr_scheduler", "constant"), "warmup_ratio", "0")
    assert load_config(write(tmp_path, no_warmup)).train.lr_scheduler == "constant"


def test_constant_with_warmup_warms_up_then_holds_in_the_train_schedule():
    import torch
    from transformers import get_scheduler  # what stages.train builds its schedule with

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=2, num_training_steps=6)
    rates = []
    for _ in range(5):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates == [0.0, 0.5, 1.0, 1.0, 1.0]


def test_target_modules_that_match_no_module_are_named_with_the_valid_ones(packaged_model_dir):
    start = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        check_target_modules(["q_proj", "o_prj", "down_projj"], packaged_model_dir, "packaged")
    assert time.perf_counter() - start < 20
    message = str(err.value)
    assert message.startswith("lora.target_modules: o_prj, down_projj: no such module in model packaged")
    assert "o_proj" in message and "down_proj," in message
    check_target_modules(load_params(REPO / "params.yaml")["lora"]["target_modules"], packaged_model_dir)
    check_target_modules(["self_attn.q_proj"], packaged_model_dir)  # peft also matches a dotted end


def test_target_modules_are_checked_before_the_weights_load(tiny_model_dir, monkeypatch):
    from table2text.model import sources as model_sources

    def no_loading(*args, **kwargs):
        raise AssertionError("weights loaded before lora.target_modules was checked")

    monkeypatch.setattr(model_sources, "load_model", no_loading)
    monkeypatch.setattr(model_sources, "weights_sha256", no_loading)
    params = load_params(REPO / "params.yaml")
    params["lora"]["target_modules"] = ["q_proj", "o_prj"]
    params["train"]["device"] = "cpu"
    with pytest.raises(ConfigError, match="o_prj: no such module"):
        loop.train(params, [{"prompt": "a", "completion": "b"}], None, checkpoint_dir=None, metrics_dir=None,
                          model_dir=tiny_model_dir, progress=False)


# ------------------------------------------------------------------------------ each kind of check
KIND_CASES = [
    # unknown names
    ({"train": {"dtype": "bfloat16"}}, "unknown key train.dtype (did you mean merge.dtype or eval.dtype?)"),
    ({"trian": {}}, "unknown group trian (did you mean train?)"),
    ({"data": ["source"]}, "data must be a mapping of settings"),
    # no coercion from strings, floats or bools
    ({"data": {"include_question": "true"}}, "data.include_question must be true or false, got 'true' (a str)"),
    ({"data": {"include_question": 1}}, "data.include_question must be true or false, got 1 (a int)"),
    ({"train": {"seed": True}}, "train.seed must be an integer, got True (a bool)"),
    ({"train": {"learning_rate": "1e-4"}}, "train.learning_rate must be a finite number, got '1e-4' (a str)"),
    ({"train": {"learning_rate": float("nan")}}, "train.learning_rate must be a finite number"),
    ({"lora": {"target_modules": "q_proj"}}, "lora.target_modules must be a list of names"),
    # ranges
    ({"lora": {"dropout": 1.0}}, "lora.dropout must be 0 <= value < 1, got 1.0"),
    ({"lora": {"dropout": -0.1}}, "lora.dropout must be 0 <= value < 1"),
    ({"lora": {"alpha": 0}}, "lora.alpha must be > 0"),
    ({"lora": {"target_modules": []}}, "lora.target_modules must name at least one module"),
    ({"lora": {"target_modules": ["q_proj", "q_proj"]}}, "lora.target_modules lists q_proj more than once"),
    ({"train": {"max_steps": -1}}, "train.max_steps must be >= 0, got -1"),
    ({"train": {"micro_batch_tokens": 0}}, "train.micro_batch_tokens must be > 0"),
    ({"train": {"warmup_ratio": 1.5}}, "train.warmup_ratio must be 0 <= value < 1"),
    ({"train": {"label_smoothing": 1.0}}, "train.label_smoothing must be 0 <= value < 1, got 1.0"),
    ({"train": {"num_gpus": 0}}, "train.num_gpus must be > 0"),
    ({"train": {"max_memory_gb": -1}}, "train.max_memory_gb must be >= 0"),
    ({"train": {"max_memory_gb": "lots"}}, "train.max_memory_gb must be a number >= 0 or auto, got 'lots'"),
    ({"eval": {"batch_size": 0}}, "eval.batch_size must be > 0"),
    ({"eval": {"num_beams": 0}}, "eval.num_beams must be > 0, got 0"),
    ({"eval": {"num_beams": 2.0}}, "eval.num_beams must be an integer"),
    ({"eval": {"length_penalty": 0.6}}, "eval.length_penalty 0.6 applies to beam search only"),
    ({"eval": {"num_beams": 4, "length_penalty": 50}}, "eval.length_penalty must be between -10 and 10"),
    ({"merge": {"max_error_ratio": 1.0}}, "merge.max_error_ratio must be 0 < value < 1"),
    ({"merge": {"verify_prompts": 0}}, "merge.verify_prompts must be > 0"),
    # enums
    ({"data": {"source": "csv"}}, "data.source='csv': expected demo, totto, fetaqa or hf:<dataset id>"),
    ({"data": {"source": "hf:"}}, "data.source='hf:'"),
    ({"data": {"on_bad_record": "ignore"}}, "data.on_bad_record must be one of ['error', 'skip'], got 'ignore'"),
    ({"train": {"quantization": "nf8"}}, "train.quantization must be one of ['nf4', 'none'], got 'nf8'"),
    ({"train": {"method": "qlora"}}, "train.method must be one of ['full', 'lora'], got 'qlora'"),
    ({"train": {"method": "full", "quantization": "none", "num_gpus": 2}},
     "train.num_gpus must be 1 with train.method full (full fine-tuning runs in one process), got 2"),
    ({"train": {"method": "full", "quantization": "none"}, "merge": {"base": "original"}},
     "merge.base must be trained with train.method full"),
    ({"train": {"lr_scheduler": "cosine_with_restarts"}}, "train.lr_scheduler must be one of"),
    ({"train": {"device": "gpu"}}, "train.device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    ({"train": {"lora_compute_dtype": "float16"}}, "train.lora_compute_dtype must be auto, float32 or bfloat16, got 'float16' (Gemma 3 overflows"),
    ({"train": {"lora_compute_dtype": "fp8"}}, "train.lora_compute_dtype must be one of ['auto', 'bfloat16', 'float32'], got 'fp8'"),
    ({"train": {"fuse_lora": "yes"}}, "train.fuse_lora must be true or false, got 'yes' (a str)"),
    ({"eval": {"device": "cuda:x"}}, "eval.device must be auto, cpu, cuda or cuda:N, got 'cuda:x'"),
    ({"merge": {"base": "nf4"}}, "merge.base must be one of ['original', 'trained'], got 'nf4'"),
    ({"merge": {"dtype": "int8"}}, "merge.dtype must be one of"),
    ({"export": {"types": ["q8"]}}, "export.types: 'q8' is not one of"),
    ({"export": {"types": ["bf16", "bf16"]}}, "export.types lists a type twice"),
    ({"export": {"types": ["q4_0"]}}, "export.bounds.q4_0: missing"),
    ({"export": {"name": "my model"}}, "export.name must be a plain file name stem"),
    ({"export": {"bounds": {"bf16": {"max_mean_kl": -1, "min_top1_agreement": 0.9}}, "types": ["bf16"]}},
     "export.bounds.bf16.max_mean_kl must be >= 0"),
    ({"eval": {"model": "quantised"}}, "eval.model must be one of ['adapter', 'merged'], got 'quantised'"),
    ({"eval": {"cache": "paged"}}, "eval.cache must be one of ['dynamic', 'static'], got 'paged'"),
    ({"eval": {"dtype": "float16"}}, "eval.dtype must be auto, float32 or bfloat16, got 'float16' (Gemma 3 overflows"),
    ({"eval": {"fp32_matmul": "fast"}}, "eval.fp32_matmul must be one of ['ieee', 'tf32'], got 'fast'"),
    ({"eval": {"decoder": "vllm"}}, "eval.decoder must be one of ['auto', 'generate', 'graph'], got 'vllm'"),
    ({"eval": {"decoder": "graph", "cache": "dynamic"}}, "eval.decoder 'graph' needs eval.cache 'static', got 'dynamic'"),
    ({"eval": {"decoder": "graph", "num_beams": 4}}, "eval.decoder 'graph' decodes greedily: it needs eval.num_beams 1"),
    ({"model": {"name": " "}}, "model.name must not be empty"),
]


@pytest.mark.parametrize("raw, expected", KIND_CASES, ids=[m.split(" must")[0] for _, m in KIND_CASES])
def test_each_kind_of_check_names_the_key(raw, expected):
    with pytest.raises(ConfigError) as err:
        Config.from_dict(raw)
    assert str(err.value).startswith(expected)


def test_good_values_of_each_kind_are_accepted():
    cfg = Config.from_dict({
        "data": {"source": "hf:GEM/totto", "include_question": True},
        "train": {"max_memory_gb": "auto", "device": "cuda:1", "lr_scheduler": "linear", "learning_rate": 1},
        "merge": {"dtype": "float32", "base": "original", "device": "cpu"},
        "eval": {"dtype": "auto", "model": "adapter", "device": "cuda", "num_beams": 4, "length_penalty": 0.6},
    })
    assert cfg.eval.num_beams == 4 and cfg.eval.length_penalty == 0.6
    assert cfg.train.max_memory_gb == "auto" and cfg.train.learning_rate == 1 and cfg.data.source == "hf:GEM/totto"
    assert Config.from_dict({"train": {"max_memory_gb": 4.5}}).train.max_memory_gb == 4.5


def test_yaml_12_floats_are_numbers_and_quoted_ones_stay_strings(tmp_path):
    assert load_config(write(tmp_path, "train:\n  learning_rate: 1e-4\n")).train.learning_rate == 1e-4
    assert "got '1e-4' (a str)" in rejected(tmp_path, "train:\n  learning_rate: '1e-4'\n")


@pytest.mark.parametrize("text, expected", [
    ("train:\n  seed: 1\n  seed: 2\n", ":3:3: YAML syntax error: duplicate key 'seed' (first on line 2)"),
    ("data: [1\n", ":2:1: YAML syntax error: expected ',' or ']'"),
    ("", ": the file is empty"),
    ("- data\n", ": expected a mapping of groups (data, model, lora, train, merge, eval, export), got a list"),
], ids=["duplicate key", "unclosed list", "empty file", "not a mapping"])
def test_yaml_problems_name_the_file_and_line(tmp_path, text, expected):
    assert rejected(tmp_path, text).startswith(f"{(tmp_path / 'params.yaml').as_posix()}{expected}")


def test_a_missing_params_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nowhere.yaml: no such params file"):
        load_config(tmp_path / "nowhere.yaml")


# ------------------------------------------------------------------------------ defaults in one place
def test_the_committed_params_are_valid_and_list_every_key():
    cfg = load_config(REPO / "params.yaml")
    listed = yaml.safe_load(PARAMS_TEXT)
    pending = set()  # settings that take their default without a line in params.yaml: none
    for group, cls in GROUPS.items():
        unlisted = {f"{group}.{f.name}" for f in dataclasses.fields(cls)} - {f"{group}.{k}" for k in listed[group]}
        assert unlisted <= pending, f"params.yaml does not list {sorted(unlisted - pending)}"
    assert cfg.train.learning_rate == 2.0e-4 and cfg.lora.target_modules[-1] == "down_proj"
    assert cfg.train.warmup_ratio == 0.0  # the demo's 2 steps: a warm-up step would run at learning rate 0


def test_missing_keys_and_groups_take_the_dataclass_defaults(tmp_path):
    params = load_params(write(tmp_path, "model:\n  name: packaged\ntrain:\n  seed: 7\n"))
    assert params["train"]["seed"] == 7
    assert params["train"]["effective_batch"] == TrainConfig().effective_batch
    assert set(params) == set(GROUPS) and params["eval"] == dataclasses.asdict(GROUPS["eval"]())


def test_every_field_has_a_help_text():
    for group, cls in GROUPS.items():
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{group}.{f.name} has no help"


def test_settings_built_in_code_are_checked_too():
    params = load_params(REPO / "params.yaml")
    params["train"]["learning_rte"] = 1e-4
    with pytest.raises(ConfigError, match="unknown key train.learning_rte"):
        validate_params(params)


# ------------------------------------------------------------------------------ the checkpoint run key
def test_the_run_key_follows_the_math_fields_and_nothing_else():
    from table2text.training.checkpoints import run_key

    params = load_params(REPO / "params.yaml")
    key = run_key(params, "base", "data")
    speed = {"logging_steps": 5, "save_steps": 3, "device": "cpu", "num_threads": 2, "micro_batch_tokens": 512,
             "cpu_micro_batch_tokens": 256, "max_memory_gb": 4, "peak_flops": 1e12, "num_gpus": 2,
             "cuda_graphs": False, "nf4_dequantize_once": False}
    assert set(speed) == {f.name for f in dataclasses.fields(TrainConfig)} - set(math_keys("train"))
    for name, value in speed.items():
        changed = load_params(REPO / "params.yaml")
        changed["train"][name] = value
        assert run_key(changed, "base", "data") == key, name
    math_changes = {"method": "full", "quantization": "none", "effective_batch": 8, "learning_rate": 1e-4, "warmup_ratio": 0.1,
                    "lr_scheduler": "linear", "weight_decay": 0.1, "max_grad_norm": 0.5, "epochs": 2, "max_steps": 5,
                    "seed": 1, "nf4_fp32_upcast": True, "compile_layers": True, "label_smoothing": 0.1,
                    "lora_compute_dtype": "bfloat16", "fuse_lora": False}
    assert set(math_changes) == set(math_keys("train"))
    for name, value in math_changes.items():
        changed = load_params(REPO / "params.yaml")
        changed["train"][name] = value
        assert run_key(changed, "base", "data") != key, name
    for group, name, value in [("lora", "r", 4), ("lora", "dropout", 0.0)]:
        changed = load_params(REPO / "params.yaml")
        changed[group][name] = value
        assert run_key(changed, "base", "data") != key, name
    assert run_key(params, "other base", "data") != key and run_key(params, "base", "other data") != key


# ------------------------------------------------------------------------------ the CLI contract
def test_run_cli_turns_a_user_error_into_one_line_and_status_2(capsys):
    def bad(argv):
        raise UserError("params.yaml: train.seed must be an integer,\n  got 'x'")

    assert run_cli(bad, "train", []) == 2
    assert capsys.readouterr().err == "train: error: params.yaml: train.seed must be an integer, got 'x'\n"
    assert run_cli(lambda argv: 3, "score", []) == 3 and run_cli(lambda argv: {"a": 1}, "x", []) == 0

    def bug(argv):
        raise KeyError("a bug keeps its traceback")

    with pytest.raises(KeyError):
        run_cli(bug, "train", [])


def test_the_existing_error_classes_are_user_errors():
    from table2text.evaluation import EvalError
    from table2text.data.user_tables import InputError as InferInputError
    from table2text.model.merging import MergeError
    from table2text.model.sources import WeightsError
    from stages.score import InputError as ScoreInputError
    from stages.error_analysis import InputError as AnalysisInputError
    from table2text.data.sources import BadRecordError, FieldError

    for cls in (ConfigError, EvalError, InferInputError, MergeError, WeightsError, ScoreInputError,
                AnalysisInputError, BadRecordError, FieldError):
        assert issubclass(cls, UserError), cls


STAGE_ARGS = {
    "preprocess": [], "train": [], "merge": [], "evaluate": [], "infer": ["--model", "models/merged"],
}
BAD = {  # a different rejected setting for each command, so that each run checks something new
    "preprocess": (ISSUE_CASES["linearisation"][0], "unknown key data.linearisation (did you mean data.linearization?)"),
    "train": (ISSUE_CASES["learning_rte"][0], "unknown key train.learning_rte (did you mean train.learning_rate?)"),
    "merge": (set_line(PARAMS_TEXT, "max_error_ratio", "small"), "merge.max_error_ratio must be a finite number, got 'small'"),
    "evaluate": (set_line(PARAMS_TEXT, "cache", "paged"), "eval.cache must be one of ['dynamic', 'static'], got 'paged'"),
    "infer": (ISSUE_CASES["max_length 1e3"][0], "data.max_length must be an integer, got 1000.0"),
}


def run_stage(stage: str, cwd: Path, args: list[str], env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    environ = {k: v for k, v in os.environ.items() if k != "TOTTO_PARAMS"}
    environ.update(PYTHONPATH=str(REPO), **(env or {}))
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", f"stages.{stage}", *args], cwd=cwd, env=environ,
                            capture_output=True, text=True, encoding="utf-8", timeout=120)
    return result, time.perf_counter() - start


def assert_one_line(result, seconds: float, stage: str, path: Path, expected: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{stage}: error: {path.as_posix()}: {expected}"), result.stderr
    assert seconds < 20, f"{stage} took {seconds:.1f} s to refuse a setting"


@pytest.mark.parametrize("stage", STAGE_ARGS)
def test_every_stage_refuses_a_bad_params_file_given_with_params(tmp_path, stage):
    text, expected = BAD[stage]
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    result, seconds = run_stage(stage, tmp_path, [*STAGE_ARGS[stage], "--params", str(path)])
    assert_one_line(result, seconds, stage, path, expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]  # nothing written, nothing loaded


@pytest.mark.parametrize("stage", STAGE_ARGS)
def test_every_stage_reads_totto_params(tmp_path, stage):
    path = tmp_path / "env.yaml"
    path.write_text(ISSUE_CASES["group dta"][0], encoding="utf-8")
    result, seconds = run_stage(stage, tmp_path, STAGE_ARGS[stage], env={"TOTTO_PARAMS": str(path)})
    assert_one_line(result, seconds, stage, path, "unknown group dta (did you mean data?)")


def test_the_train_stage_refuses_bad_target_modules_before_loading_the_model(tmp_path, packaged_model_dir):
    write_processed(tmp_path / "data" / "processed")  # train reads data/processed/train.jsonl first
    params = yaml.safe_load(PARAMS_TEXT)
    params["lora"]["target_modules"] = ["q_proj", "o_prj", "down_projj"]
    params["train"]["device"] = "cpu"  # no "no GPU" note on stderr: the error is its only line
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(params), encoding="utf-8")
    result, seconds = run_stage("train", tmp_path, ["--params", str(path)])
    assert result.returncode == 2, result.stderr
    # one line: nothing that prints on import (bitsandbytes does, without its CPU kernels) is imported before
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("train: error: lora.target_modules: o_prj, down_projj: no such module in model "
                                    "packaged (its adaptable modules: down_proj, ")
    assert seconds < 20 and not (tmp_path / "models").exists() and not (tmp_path / "checkpoints").exists()


def test_the_enums_agree_with_the_modules_that_implement_them():
    from table2text import config
    from table2text.model import finetuned
    from table2text import generation
    from table2text.model import gguf as gguf_export
    from table2text.data import linearize, sources
    from table2text.model import merging

    assert set(config.LINEARIZATIONS) == set(linearize.MODES)
    assert set(config.ON_BAD_RECORD) == set(sources.ON_BAD_RECORD)
    assert set(config.EVAL_CACHES) == set(generation.CACHES)
    assert set(config.FP32_MATMULS) == set(generation.FP32_MATMUL)
    # merge.dtype auto: the fidelity check picks bf16 or float32; the others are stored dtypes
    assert set(config.MERGE_DTYPES) - {"auto"} == set(merging.DTYPES)
    assert set(config.MERGE_BASES) == set(finetuned.BASES)
    assert set(config.EXPORT_TYPES) == set(gguf_export.TYPES)


def test_device_auto_announces_a_cpu_fallback(monkeypatch, capsys):
    import torch

    from table2text.model import sources as model_sources

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(model_sources, "_SAID_DEVICE", set())
    assert model_sources.pick_device("auto", find_driver=lambda: None) == torch.device("cpu")
    assert "device: cpu (device auto: no NVIDIA GPU on this machine)" in capsys.readouterr().err
    model_sources.pick_device("cpu")  # the device is said once a process
    assert capsys.readouterr().err == ""
