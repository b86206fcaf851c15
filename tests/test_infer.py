"""The inference CLI: both input forms, stdin, batch, adapter, and clear errors (exit 2) on bad input."""

import io
import json
import re
from pathlib import Path

import pytest
import torch

from stages import infer
from table2text.generation import generate
from table2text.data.linearize import linearize
from table2text.model.sources import load_model, load_tokenizer
from table2text.params import load_params
from table2text.data.records import build_record
from table2text.data.prompts import completion_end
from table2text.data.sources import read_totto_jsonl
from table2text.data import user_tables

REPO = Path(__file__).resolve().parents[1]
DEMO_DEV = REPO / "data" / "demo" / "dev.jsonl"
PARAMS = REPO / "params.yaml"  # data.linearization, data.max_length of the project

SIMPLE = {"title": "1998 FIFA World Cup", "section": "Final", "header": ["Team", "Goals"],
          "rows": [["France", 3], ["Brazil", 0]], "highlight": [[0, 0], [0, 1]]}


@pytest.fixture(scope="module")
def totto_line():
    return DEMO_DEV.read_text(encoding="utf-8").splitlines()[0]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module", autouse=True)
def two_threads():
    torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def tokenizer_loaded_once(monkeypatch, tiny_model_dir, tokenizer):
    """The 262k-entry tokenizer takes seconds to load: every CLI run here reuses the module's copy."""
    real = infer.model_sources.load_tokenizer

    def load(folder):
        return tokenizer if Path(folder) == Path(tiny_model_dir) else real(folder)

    monkeypatch.setattr(infer.model_sources, "load_tokenizer", load)


def run(capsys, *argv):
    status = infer.cli([*map(str, argv), "--params", str(PARAMS), "--device", "cpu", "--max-new-tokens", "8"])
    out, err = capsys.readouterr()
    return status, out.splitlines(), err


def expected(model_dir, tokenizer, examples):
    """What the CLI must print: greedy sentences for the prompts preprocess would build."""
    model = load_model(model_dir, dtype=torch.bfloat16, device=torch.device("cpu"))
    data = load_params(PARAMS)["data"]
    prompts = [user_tables.make_prompt(tokenizer, ex, "test", data["linearization"], False, data["max_length"] - 8)
               for ex in examples]
    return generate(model, tokenizer, prompts, 8, 4, "cpu", progress=False)


def test_simple_table_rows_are_counted_without_the_header():
    example = user_tables.to_example(SIMPLE, "t.json", "t.json", 1)
    assert [c["value"] for c in example["table"][0]] == ["Team", "Goals"]
    assert all(c["is_header"] for c in example["table"][0])
    assert example["highlighted_cells"] == [[1, 0], [1, 1]]  # row 0 of `rows` is table row 1
    assert example["table"][1][1]["value"] == "3"
    assert linearize(example).startswith("<page_title> 1998 FIFA World Cup </page_title> <section_title> Final")
    assert "<cell> France <col_header> Team </col_header>" in linearize(example)
    headless = user_tables.to_example({"rows": [["a", "b"]], "highlight": [[0, 1]]}, "t.json", "t.json", 1)
    assert headless["highlighted_cells"] == [[0, 1]] and headless["page_title"] == ""


def test_prompt_is_the_one_preprocess_builds(tokenizer, totto_line, tmp_path):
    path = tmp_path / "dev.jsonl"
    path.write_text(totto_line + "\n", encoding="utf-8")
    via_sources = read_totto_jsonl(path)[0]
    example = user_tables.to_example(json.loads(totto_line), "x", "x", 1)
    for mode in ("subtable", "full_table"):
        record = build_record(tokenizer, via_sources, linearize(via_sources, mode), None,
                              completion_end(tokenizer), 1024)
        budget = 1024 - record["completion_tokens"]  # preprocess leaves room for the target
        assert user_tables.make_prompt(tokenizer, example, "x", mode, False, budget) == record["prompt"]


def test_long_table_is_cut_to_the_budget_with_a_warning(tokenizer, totto_line, capsys):
    example = user_tables.to_example(json.loads(totto_line), "x", "x", 1)
    prompt = user_tables.make_prompt(tokenizer, example, "x", "subtable", False, 48)
    assert len(tokenizer(prompt, add_special_tokens=True)["input_ids"]) <= 48
    assert re.fullmatch(r"infer: warning: x: table text cut to fit 48 tokens, keeping [12] of the 3 highlighted "
                        r"cells\n", capsys.readouterr().err)


def test_a_cut_that_keeps_no_highlighted_cell_is_refused_or_said(tokenizer, totto_line, capsys):
    """As preprocess refuses such a prompt (or, under data.on_bad_record: skip, counts it), infer refuses it
    in one line; under skip it says so and answers anyway, one sentence per input."""
    example = user_tables.to_example(json.loads(totto_line), "x", "x", 1)
    with pytest.raises(user_tables.InputError, match=r"^x: field 'highlighted_cells': the table text cut to fit 40 tokens "
                                               r"keeps none of the 3 highlighted cells \(--linearization full_table\)"):
        user_tables.make_prompt(tokenizer, example, "x", "full_table", False, 40)
    prompt = user_tables.make_prompt(tokenizer, example, "x", "full_table", False, 40, on_bad_record="skip")
    assert len(tokenizer(prompt, add_special_tokens=True)["input_ids"]) <= 40
    assert "keeps none of the 3 highlighted cells" in capsys.readouterr().err


def test_file_stdin_and_batch_print_one_sentence_per_table(tiny_model_dir, tokenizer, totto_line, tmp_path,
                                                           capsys, monkeypatch):
    simple_file = tmp_path / "table.json"
    simple_file.write_text(json.dumps(SIMPLE, indent=2), encoding="utf-8")  # one object over several lines
    batch = tmp_path / "tables.jsonl"
    batch.write_text(json.dumps(SIMPLE) + "\n\n" + totto_line + "\n", encoding="utf-8")
    want = expected(tiny_model_dir, tokenizer, [user_tables.to_example(SIMPLE, "", "", 1),
                                                user_tables.to_example(json.loads(totto_line), "", "", 1)])

    status, out, err = run(capsys, simple_file, "--model", tiny_model_dir)
    assert (status, out) == (0, [want[0]]), err

    monkeypatch.setattr("sys.stdin", io.StringIO(totto_line))
    status, out, err = run(capsys, "-", "--model", tiny_model_dir)
    assert (status, out) == (0, [want[1]]), err

    status, out, err = run(capsys, "--batch", batch, "--model", tiny_model_dir, "--batch-size", "2")
    assert (status, out) == (0, want), err


def test_adapter_takes_its_base_from_training_info(tiny_model_dir, tokenizer, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = load_model(tiny_model_dir, dtype=torch.bfloat16, device=torch.device("cpu"))
    adapter = tmp_path / "adapter"
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(adapter)
    table = tmp_path / "table.json"
    table.write_text(json.dumps(SIMPLE), encoding="utf-8")

    status, _, err = run(capsys, table, "--adapter", adapter)
    assert status == 2 and "give it with --base" in err

    (adapter / "training_info.json").write_text(json.dumps({"base_model": {"name": str(tiny_model_dir)}}), encoding="utf-8")
    status, out, err = run(capsys, table, "--adapter", adapter)
    # A fresh LoRA adapter (B = 0) changes nothing: the base model's sentence.
    assert (status, out) == (0, expected(tiny_model_dir, tokenizer, [user_tables.to_example(SIMPLE, "", "", 1)])), err


@pytest.mark.parametrize("content, message", [
    ('{"rows": [["a"]], "highlight": [[3, 0]]}', "field 'highlight[0]': row 3 outside rows 0..0"),
    ('{"rows": [["a"]], "highlight": [[0, 1]]}', "field 'highlight[0]': column 1 outside"),
    ('{"rows": [["a"]], "highlight": [["0", 0]]}', "field 'highlight[0]': expected [row, column] integers"),
    ('{"rows": [["a", null]], "highlight": [[0, 0]]}', "field 'rows[0][1]': expected a string or number"),
    ('{"rows": [], "highlight": [[0, 0]]}', "field 'rows'"),
    ('{"rows": [["a"]], "highlight": [[0, 0]], "colour": 1}', "field 'colour': unknown field"),
    ('{"title": "x"}', "expected a ToTTo example"),
    ('{"table": [], "highlighted_cells": []}', "field 'example_id'"),
    ('[1, 2]', "expected a JSON object"),
    ('{"rows": [["a"]],\n "highlight": [[0, 0]', "table.json:2: invalid JSON"),
    ('', "empty input"),
])
def test_bad_single_input_is_exit_2_with_file_and_field(tmp_path, capsys, content, message):
    table = tmp_path / "table.json"
    table.write_text(content, encoding="utf-8")
    status, out, err = run(capsys, table, "--model", tmp_path)  # input is checked before any model loads
    assert status == 2 and out == []
    assert "table.json" in err and message in err, err
    assert "Traceback" not in err


def test_bad_batch_line_names_its_line(tmp_path, capsys):
    batch = tmp_path / "tables.jsonl"
    batch.write_text(json.dumps(SIMPLE) + "\n" + '{"rows": [["a"]], "highlight": [[0, 5]]}' + "\n", encoding="utf-8")
    status, _, err = run(capsys, "--batch", batch, "--model", tmp_path)
    assert status == 2 and "tables.jsonl:2: field 'highlight[0]'" in err

    batch.write_text(json.dumps(SIMPLE) + "\n{not json\n", encoding="utf-8")
    status, _, err = run(capsys, "--batch", batch, "--model", tmp_path)
    assert status == 2 and "tables.jsonl:2: invalid JSON" in err


def test_missing_files_and_models_are_exit_2(tmp_path, capsys):
    status, _, err = run(capsys, tmp_path / "nope.json", "--model", tmp_path)
    assert status == 2 and "nope.json: no such file" in err
    table = tmp_path / "table.json"
    table.write_text(json.dumps(SIMPLE), encoding="utf-8")
    status, _, err = run(capsys, table, "--model", tmp_path / "no-model")
    assert status == 2 and "no config.json" in err
    status, _, err = run(capsys, table, "--adapter", tmp_path)
    assert status == 2 and "no adapter_config.json" in err
    (tmp_path / "training_info.json").write_text(json.dumps({"method": "full"}), encoding="utf-8")
    status, _, err = run(capsys, table, "--adapter", tmp_path)  # a full run's folder: named, --model offered
    assert status == 2 and f"not an adapter: give it as --model {tmp_path.as_posix()}" in err


def test_decoding_comes_from_params_unless_given(capsys):
    args = infer.parse_args(["x.json", "--model", "m"])
    assert infer.decoding(args, {"num_beams": 1, "length_penalty": 1.0}) == (1, 1.0)
    assert infer.decoding(args, {"num_beams": 4, "length_penalty": 0.6}) == (4, 0.6)
    args = infer.parse_args(["x.json", "--model", "m", "--num-beams", "1"])
    assert infer.decoding(args, {"num_beams": 4, "length_penalty": 0.6}) == (1, 1.0)  # greedy: no penalty
    args = infer.parse_args(["x.json", "--model", "m", "--num-beams", "3", "--length-penalty", "2"])
    assert infer.decoding(args, {"num_beams": 1, "length_penalty": 1.0}) == (3, 2.0)
    args = infer.parse_args(["x.json", "--model", "m", "--length-penalty", "2"])
    with pytest.raises(infer.InputError, match="--length-penalty 2.0 applies to beam search only"):
        infer.decoding(args, {"num_beams": 1, "length_penalty": 1.0})


def test_beam_search_prints_one_sentence_per_table(tiny_model_dir, tokenizer, totto_line, tmp_path, capsys):
    batch = tmp_path / "tables.jsonl"
    batch.write_text(json.dumps(SIMPLE) + "\n" + totto_line + "\n", encoding="utf-8")
    status, out, err = run(capsys, "--batch", batch, "--model", tiny_model_dir, "--num-beams", "2")
    assert status == 0 and len(out) == 2, err
    with pytest.raises(SystemExit) as exit_status:  # argparse's own error, before anything loads
        run(capsys, "--batch", batch, "--model", tiny_model_dir, "--num-beams", "0")
    assert exit_status.value.code == 2 and "--num-beams must be at least 1" in capsys.readouterr().err
