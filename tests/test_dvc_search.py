"""bench/dvc_search.py: the recipe grid as queued `dvc exp` experiments, with the candidates, split, choice
and report of bench/recipe_search.py. The whole search through the DVC queue takes minutes on 2 CPU cores
(README, "Recipe search ... through dvc exp": a documented run); here the plan, the parsing of `dvc exp
show --json`, and queueing on a tiny DVC project (what DVC accepts of the -S arguments)."""

import json
from pathlib import Path

import pytest
import yaml

from bench import dvc_search, recipe_search
from bench.dvc_search import dvc_set_args, experiments, plan_finals, plan_selection, queue_args, selection_results
from dvc_project import dvc, make_tiny_project
from test_recipe_search import TINY_RUN, write_fetaqa

REPO = Path(__file__).resolve().parents[1]


def test_a_key_set_twice_keeps_its_last_value_and_a_comma_is_refused():
    assert dvc_set_args(["merge.device=cuda", "lora.r=4", "merge.device=cpu"]) == [
        "-S", "merge.device=cpu", "-S", "lora.r=4"]
    with pytest.raises(SystemExit, match="a comma would make DVC queue a sweep"):
        dvc_set_args(["train.learning_rate=1e-4,2e-4"])
    assert queue_args("rs-sel-a-greedy", ["lora.r=4"]) == ["exp", "run", "--queue", "-n", "rs-sel-a-greedy",
                                                          "-S", "lora.r=4", "evaluate"]


def test_every_candidate_of_the_grid_is_an_experiment_with_recipe_searchs_settings(tmp_path):
    grid = recipe_search.load_grid(REPO / "bench" / "recipe_grid.yaml")
    split = tmp_path / "split"
    planned = plan_selection(grid, split, ["eval.max_new_tokens=8"], "rs")
    runs = recipe_search.selection_runs(grid, split, ["eval.max_new_tokens=8"])
    assert len(planned) == len(grid["configs"]) * len(grid["decodings"]) == len({p["name"] for p in planned})
    by_name = {p["name"]: p for p in planned}
    for run in runs:
        for d in run["decodings"]:
            job = by_name[f"rs-sel-{run['name']}-{d['name']}"]
            assert job["overrides"] == d["overrides"] and job["task"] == d["task"]
            assert f"data.path={split}" in dvc_set_args(job["overrides"])
    (final,) = plan_finals(grid, [{"config": "q-r8-2ep", "decoding": "beam4"}], tmp_path / "fetaqa", [], "rs")
    assert final["name"] == "rs-fin-q-r8-2ep-beam4" and final["task"] == "question"
    assert {"train.epochs=2", "eval.num_beams=4", f"data.path={tmp_path / 'fetaqa'}"} <= set(final["overrides"])


def scores(f: float) -> dict:
    return {"finetuned": {"overall": {"count": 2, "bleu": 10 * f, "parent_precision": f, "parent_recall": f,
                                      "parent_f": f}}}


def test_scores_come_from_exp_show_and_a_failed_experiment_is_reported():
    shown = [{"rev": "workspace", "data": {}, "experiments": None},
             {"rev": "abc", "experiments": [
                 {"executor": None, "revs": [{"rev": "r1", "name": "rs-sel-a-greedy",
                                              "data": {"metrics": {"metrics/eval.json": {"data": scores(0.4)}}}}]},
                 {"executor": {"state": "failed"}, "revs": [{"rev": "r2", "name": "rs-sel-b-greedy", "data": {}}]},
             ]}]
    found = experiments(shown)
    assert found["rs-sel-a-greedy"]["state"] == "success" and found["rs-sel-b-greedy"]["eval"] is None
    jobs = [{"name": f"rs-sel-{c}-greedy", "config": c, "decoding": "greedy", "task": "no_question"} for c in "abc"]
    cands, runs = selection_results(jobs, found)
    assert cands == [{"config": "a", "decoding": "greedy", "task": "no_question", "count": 2, "bleu": 4.0,
                      "parent_precision": 0.4, "parent_recall": 0.4, "parent_f": 0.4}]
    assert [r.get("error") for r in runs] == [None, "failed (dvc queue logs rs-sel-b-greedy)", "not run"]


def test_the_selection_is_queued_as_dvc_experiments_of_a_tiny_project(tmp_path, tiny_model_dir, monkeypatch, capsys):
    root, env = make_tiny_project(tmp_path / "p", tiny_model_dir)
    for key in ("HOME", "DVC_NO_ANALYTICS", "HF_HUB_OFFLINE", "DVC_SITE_CACHE_DIR"):
        monkeypatch.setenv(key, env[key])
    data = write_fetaqa(tmp_path / "fetaqa", 6, 3)
    grid = {**yaml.safe_load((REPO / "bench" / "recipe_grid.yaml").read_text(encoding="utf-8")),
            "configs": [{"name": "r4", "overrides": ["lora.r=4", "lora.alpha=8"]}, {"name": "r8", "overrides": []}],
            "decodings": [{"name": "greedy", "overrides": []}], "holdout": 2}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid), encoding="utf-8")
    sets = [a for s in [f"model.name={tiny_model_dir}", *TINY_RUN] for a in ("--set", s)]
    argv = ["--fetaqa", str(data), "--grid", str(tmp_path / "grid.yaml"), "--repo", str(root), "--workroot",
            str(tmp_path / "work"), "--queue-only", *sets]
    try:
        assert dvc_search.main(argv) == 0
        assert "queued 2; run them:" in capsys.readouterr().out
        status = dvc(root, env, "queue", "status").stdout
        assert status.count("Queued") == 2 and "rs-sel-r4-greedy" in status and "rs-sel-r8-greedy" in status
        split = json.loads((tmp_path / "work" / "split.json").read_text(encoding="utf-8"))
        assert split == {"train": 4, "held_out": 2, "seed": grid["holdout_seed"], "of": 6}
        with pytest.raises(SystemExit, match="rs-sel-r4-greedy, rs-sel-r8-greedy: already experiments"):
            dvc_search.main(argv)
    finally:
        dvc(root, env, "queue", "remove", "--all", check=False)
