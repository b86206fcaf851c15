"""bench/run_rows.py runs the rows of bench/rows.yaml: every row's overrides are settings the pipeline
accepts, and a row runs on FeTaQA and then on ToTTo dev55 unless it says `totto: false`."""

import copy
from pathlib import Path

import pytest
import yaml

from bench import run_rows
from bench.run_recipe import apply_override
from table2text.params import ConfigError, validate_params

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("row", run_rows.load_rows(), ids=lambda r: r["name"])
def test_every_row_is_a_valid_setting_of_the_pipeline(row):
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    for assignment in ["data.source=fetaqa", "data.path=/data/fetaqa", *run_rows.COMMON, *row.get("overrides", [])]:
        apply_override(params, assignment)
    validate_params(params)  # raises ConfigError naming the key


def test_a_bad_override_is_refused_by_the_same_check():
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    bad = copy.deepcopy(params)
    apply_override(bad, "train.method=full")  # full fine-tuning of NF4 weights cannot be
    with pytest.raises(ConfigError, match="train.quantization"):
        validate_params(bad)


def test_a_row_runs_on_fetaqa_then_totto_unless_it_says_not():
    rows = {r["name"]: r for r in run_rows.load_rows()}
    both = run_rows.row_commands(rows["full-nq-3ep-beam4"], Path("/f"), Path("/t"), Path("/r"))
    assert [c[c.index("--name") + 1] for c in both] == ["full-nq-3ep-beam4", "full-nq-3ep-beam4-totto-dev55"]
    stages = both[1].index("--stages")
    assert "data.source=totto" in both[1] and both[1][stages + 1:stages + 3] == ["preprocess", "evaluate"]
    only = run_rows.row_commands(rows["full-q-3ep-beam4"], Path("/f"), Path("/t"), Path("/r"))
    assert len(only) == 1 and "data.include_question=true" in only[0] and "data.source=fetaqa" in only[0]
