"""The evaluate stage end to end on a tiny model: every output file, with the keys the contract names."""

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from stages import evaluate
from table2text import evaluation
from table2text.model import sources as model_sources
from table2text.model.finetuned import AdapterError
from table2text.model.sources import load_model, load_tokenizer
from table2text.metrics.totto import SUBSETS


def cell(value, header=False):
    return {"value": value, "is_header": header, "column_span": 1, "row_span": 1}


def record(i: int, overlap, highlighted: int, rows: int) -> dict:
    """A processed validation record (the data contract) with a table of `rows` x 2 cells."""
    table = [[cell("Year", True), cell("Team", True)]] + [[cell(str(1990 + r)), cell(f"Club {r}")] for r in range(rows)]
    cells = [[1 + r // 2, r % 2] for r in range(highlighted)]
    prompt = f"Write one sentence describing the highlighted cells of this table.\n\n<cell> {i} </cell>\n\nSentence:\n"
    return {
        "id": str(100 + i), "table": table, "highlighted_cells": cells,
        "page_title": f"Season {i}", "section_title": "Results", "section_text": "",
        "references": [f"In {1990 + i}, Club {i} won the season.", f"Club {i} won in {1990 + i}."],
        "overlap": overlap, "question": None, "source_file": "validation.jsonl", "line": i + 1,
        "prompt": prompt, "completion": f"In {1990 + i}, Club {i} won the season.<eos>",
        "target": f"In {1990 + i}, Club {i} won the season.", "prompt_tokens": 30, "completion_tokens": 14,
        "truncated": False, "num_highlighted": highlighted, "table_cells": 2 * rows + 2,
    }


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


@pytest.fixture(autouse=True)
def tokenizer_loaded_once(monkeypatch, tiny_model_dir, tokenizer):
    """The 262k-entry tokenizer takes seconds to load: every stage run here reuses the module's copy."""
    real = model_sources.load_tokenizer
    monkeypatch.setattr(model_sources, "load_tokenizer",
                        lambda folder: tokenizer if Path(folder) == Path(tiny_model_dir) else real(folder))


@pytest.fixture
def project(tmp_path, monkeypatch, tiny_model_dir):
    """A project folder holding params.yaml, a processed validation file and a 'merged' model."""
    records = [record(0, True, 1, 2), record(1, False, 2, 3), record(2, True, 3, 30), record(3, None, 6, 60),
               record(4, False, 1, 5)]
    (tmp_path / "data" / "processed").mkdir(parents=True)
    (tmp_path / "data" / "processed" / "validation.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    shutil.copytree(tiny_model_dir, tmp_path / "models" / "merged")
    params = {
        "model": {"name": str(tiny_model_dir)},
        "eval": {"model": "merged", "compare_base": True, "batch_size": 2, "max_new_tokens": 6, "max_examples": 0,
                 "bleurt_checkpoint": "", "device": "cpu", "num_threads": 2},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    return tmp_path, params, records


def set_params(folder, params):
    (folder / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")


def test_merged_with_base_writes_predictions_metrics_and_plots(project, tiny_model_dir, tokenizer, capsys):
    folder, params, records = project
    result = evaluate.main([])

    rows = [json.loads(line) for line in (folder / "metrics" / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == [r["id"] for r in records]
    for row, rec in zip(rows, records):
        assert {"id", "prompt", "prediction", "base_prediction", "references", "overlap", "parent",
                "base_parent"} <= set(row)
        assert row["prompt"] == rec["prompt"] and row["references"] == rec["references"]
        assert row["overlap"] == rec["overlap"]
        assert set(row["parent"]) == {"parent_precision", "parent_recall", "parent_f"}
        assert isinstance(row["prediction"], str)
    # The 'merged' model is the base model itself here, so both must answer identically.
    assert [r["prediction"] for r in rows] == [r["base_prediction"] for r in rows]

    # eval.json holds the scores and nothing that varies from run to run; the times go to the runtime file
    saved = json.loads((folder / "metrics" / "eval.json").read_text(encoding="utf-8"))
    assert set(saved) == {"bleu", "parent_f", "parent_f_gain", "finetuned", "base", "gain", "examples", "same_as_base"}
    assert saved["bleu"] == saved["finetuned"]["overall"]["bleu"] and saved["parent_f_gain"] == 0.0
    assert saved == json.loads(json.dumps({k: result[k] for k in saved}))
    assert saved["examples"] == 5 and saved["same_as_base"] == 5
    assert saved["finetuned"]["overall"]["count"] == 5
    assert set(saved["finetuned"]["overall"]) == {"count", "bleu", "parent_precision", "parent_recall", "parent_f"}
    assert saved["finetuned"]["overlap"]["count"] == 2 and saved["finetuned"]["non_overlap"]["count"] == 2
    for subset in SUBSETS:
        assert saved["gain"][subset] == {"bleu": 0.0, "parent_f": 0.0}
    runtime = json.loads((folder / "metrics" / "runtime" / "evaluate.json").read_text(encoding="utf-8"))
    assert runtime["generation"]["seconds"] > 0 and runtime["generation"]["examples_per_s"] > 0
    from table2text.config import group_settings

    wanted = evaluation.eval_dtype(group_settings("eval", params["eval"])["dtype"], torch.device("cpu"))  # what eval.dtype asks
    assert runtime["model"] == {"kind": "merged", "base": str(tiny_model_dir), "device": "cpu", "dtype": str(wanted)}
    # the summary names the outputs and says that the "fine-tuned" model (the base itself here) changed nothing
    out = capsys.readouterr().out
    assert "metrics/eval.json" in out and "metrics/predictions.jsonl" in out and "fine-tuned BLEU" in out
    assert "evaluate: warning: the fine-tuned model wrote exactly the base model's sentence for all 5" in out

    # A prediction is the model's own greedy continuation of the prompt, cut at the end token.
    model = load_model(tiny_model_dir, dtype=torch.bfloat16, device=torch.device("cpu"))
    ids = tokenizer(records[1]["prompt"], add_special_tokens=True, return_tensors="pt")["input_ids"]
    out = model.generate(input_ids=ids, do_sample=False, max_new_tokens=6, eos_token_id=[1, 106], pad_token_id=0)
    assert rows[1]["prediction"] == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()

    with open(folder / "metrics" / "plots" / "by_highlighted.csv", newline="", encoding="utf-8") as fh:
        by_highlighted = list(csv.DictReader(fh))
    assert [r["bucket"] for r in by_highlighted] == ["1", "2", "3", "5+"]
    assert [int(r["count"]) for r in by_highlighted] == [2, 1, 1, 1]
    assert set(by_highlighted[0]) == {"bucket", "count", "bleu", "parent_f", "base_bleu", "base_parent_f"}
    with open(folder / "metrics" / "plots" / "by_table_size.csv", newline="", encoding="utf-8") as fh:
        by_size = list(csv.DictReader(fh))
    assert sum(int(r["count"]) for r in by_size) == 5
    assert [r["bucket"] for r in by_size] == ["1-50", "51-100", "101-200"]


def test_adapter_without_base_and_max_examples(project, tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    folder, params, _ = project
    torch.manual_seed(0)
    base = load_model(tiny_model_dir, dtype=torch.bfloat16, device=torch.device("cpu"))
    # Random (not zero) LoRA B weights, so the adapter changes the answers.
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"],
                                           init_lora_weights=False))
    lora.save_pretrained(folder / "models" / "adapter", safe_serialization=True)
    from table2text.model.sources import weights_sha256
    (folder / "models" / "adapter" / "training_info.json").write_text(json.dumps(
        {"base_model": {"name": str(tiny_model_dir), "weights_sha256": weights_sha256(tiny_model_dir)},
         "params": {"train": {"quantization": "none"}}, "dtype": "bfloat16"}), encoding="utf-8")
    shutil.rmtree(folder / "models" / "merged")
    params["eval"].update(model="adapter", compare_base=False, max_examples=3)
    set_params(folder, params)

    result = evaluate.main([])
    assert result["base"] is None and result["gain"] is None and result["examples"] == 3
    rows = [json.loads(line) for line in (folder / "metrics" / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 3 and all("base_prediction" not in r for r in rows)
    with open(folder / "metrics" / "plots" / "by_highlighted.csv", newline="", encoding="utf-8") as fh:
        assert next(csv.reader(fh)) == ["bucket", "count", "bleu", "parent_f"]

    # The same adapter on other base weights is refused.
    (folder / "models" / "adapter" / "training_info.json").write_text(json.dumps(
        {"base_model": {"name": "x", "weights_sha256": "0" * 64}}), encoding="utf-8")
    with pytest.raises(AdapterError, match="weights_sha256"):
        evaluate.main([])


def test_missing_inputs_are_clear_errors(project, capsys):
    folder, params, _ = project
    shutil.rmtree(folder / "models" / "merged")
    assert evaluate.cli([]) == 2
    assert "models/merged" in capsys.readouterr().err

    (folder / "data" / "processed" / "validation.jsonl").write_text('{"id": "1", "prompt": "x"}\n', encoding="utf-8")
    assert evaluate.cli([]) == 2
    assert "validation.jsonl:1: field 'references'" in capsys.readouterr().err

    params["eval"]["model"] = "quantised"
    set_params(folder, params)
    assert evaluate.cli([]) == 2
    assert "eval.model" in capsys.readouterr().err

    params["eval"].update(model="merged", fp32_matmul="fast")
    set_params(folder, params)
    assert evaluate.cli([]) == 2
    assert "eval.fp32_matmul must be one of ['ieee', 'tf32'], got 'fast'" in capsys.readouterr().err


def scores(same: int, examples: int = 4) -> dict:
    return {"examples": examples, "same_as_base": same}


def test_a_finetune_that_changed_nothing_is_reported_with_its_cause():
    # every prediction the base's, and the only steps were warm-up steps at learning rate 0
    (equal, cause) = evaluation.finetune_warnings(scores(4), {"steps": 2, "steps_with_nonzero_lr": 0})
    assert "exactly the base model's sentence for all 4 examples" in equal
    assert "all 2 optimiser steps ran at learning rate 0" in cause and "train.warmup_ratio" in cause
    # most predictions equal, one of two steps at lr 0: both said
    (most, cause) = evaluation.finetune_warnings(scores(3), {"steps": 2, "steps_with_nonzero_lr": 1})
    assert "for 3 of 4 examples" in most and "only 1 of 2 optimiser steps" in cause
    # a fine-tune that changed the outputs: no warning, even with warm-up steps
    assert evaluation.finetune_warnings(scores(1), {"steps": 2, "steps_with_nonzero_lr": 1}) == []
    assert evaluation.finetune_warnings({"examples": 4}, {}) == []  # no base compared, no training record


def test_base_predictions_come_from_the_cache_only_for_the_same_settings(project):
    """The base model's answers are kept by content hash (table2text.eval_cache): the same model, prompts and
    settings hit, a changed decoding setting misses, and eval.json is the same byte for byte either way."""
    folder, params, _ = project

    def run():
        evaluate.main([])
        runtime = json.loads((folder / "metrics" / "runtime" / "evaluate.json").read_text(encoding="utf-8"))
        return (folder / "metrics" / "eval.json").read_bytes(), runtime["generation"]

    fresh, gen = run()
    assert gen["base_cache"] == "miss" and gen["base_seconds"] > 0
    assert len(list((folder / ".cache" / "eval-base").glob("*.json"))) == 1
    cached, gen = run()
    assert gen["base_cache"] == "hit" and gen["base_seconds"] is None
    assert cached == fresh

    params["eval"]["max_new_tokens"] = 4  # another decoding setting: other predictions, a new entry
    set_params(folder, params)
    _, gen = run()
    assert gen["base_cache"] == "miss"
    assert len(list((folder / ".cache" / "eval-base").glob("*.json"))) == 2

    params["eval"]["max_new_tokens"] = 6  # back to the first settings: their entry again
    set_params(folder, params)
    again, gen = run()
    assert gen["base_cache"] == "hit" and again == fresh


def test_beam_search_settings_reach_the_generation_of_both_models(project, monkeypatch):
    folder, params, records = project
    seen = []
    real = evaluation.generate

    def recording(model, tokenizer, prompts, **kwargs):
        seen.append((kwargs["num_beams"], kwargs["length_penalty"]))
        return real(model, tokenizer, prompts, **kwargs)

    monkeypatch.setattr(evaluation, "generate", recording)
    params["eval"].update(num_beams=2, length_penalty=0.8, max_examples=2, max_new_tokens=3)
    set_params(folder, params)
    result = evaluate.main([])
    assert seen == [(2, 0.8), (2, 0.8)]  # the fine-tuned model, then the base it is compared with
    assert result["generation"]["num_beams"] == 2 and result["generation"]["length_penalty"] == 0.8
    rows = (folder / "metrics" / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(rows) == 2


def test_auto_decoder_is_resolved_for_the_device_before_generating_and_hashing():
    """eval.decoder auto names the decoder that runs in generate()'s settings, so the runtime record and the
    base cache's key say graph on CUDA and generate on a CPU (a CPU key unchanged from an explicit generate)."""
    cfg = {"max_new_tokens": 8, "batch_size": 4, "cache": "static", "batch_tokens": 0, "fp32_matmul": "tf32",
           "decoder": "auto", "num_beams": 1, "length_penalty": 1.0}
    assert evaluation.generation_settings(cfg, torch.device("cpu"))["decoder"] == "generate"
    assert evaluation.generation_settings(cfg, torch.device("cuda"))["decoder"] == "graph"
    assert evaluation.generation_settings({**cfg, "cache": "dynamic"}, torch.device("cuda"))["decoder"] == "generate"
    assert (evaluation.generation_settings(cfg, torch.device("cpu"))
            == evaluation.generation_settings({**cfg, "decoder": "generate"}, torch.device("cpu")))
