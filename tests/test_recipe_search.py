"""bench/recipe_search.py on the CPU with the tiny model: the whole search (split, selection on the
held-out examples, finals through the four stages, bootstrap, results JSON) runs before any GPU call."""

import gzip
import json
from pathlib import Path

import pytest
import yaml

from bench import recipe_search
from bench.recipe_search import candidates, choose

REPO = Path(__file__).resolve().parents[1]


def fetaqa_record(i: int) -> dict:
    year = 1990 + i
    return {"feta_id": 1000 + i, "table_source_json": "x.json", "page_wikipedia_url": "http://x",
            "table_page_title": f"Club {i}", "table_section_title": "Seasons",
            "table_array": [["Year", "Club", "Place"], [str(year), f"Club {i}", str(i % 3 + 1)],
                            [str(year + 1), f"Club {i}", "2"]],
            "highlighted_cell_ids": [[1, 0], [1, 2]], "question": f"Where did Club {i} finish in {year}?",
            "answer": f"In {year}, Club {i} finished in place {i % 3 + 1}."}


def write_fetaqa(folder: Path, n_train: int, n_validation: int) -> Path:
    folder.mkdir(parents=True)
    for name, ids in (("train.jsonl.gz", range(n_train)), ("validation.jsonl.gz", range(100, 100 + n_validation))):
        with gzip.open(folder / name, "wt", encoding="utf-8") as fh:
            fh.writelines(json.dumps(fetaqa_record(i)) + "\n" for i in ids)
    return folder


GRID = {
    "holdout": 2, "holdout_seed": 3, "finals_per_task": 1,
    "common": ["train.learning_rate=1.0e-2"],
    "selection_common": ["eval.model=adapter"],
    "decodings": [{"name": "greedy", "overrides": []},
                  {"name": "beam2", "overrides": ["eval.num_beams=2", "eval.length_penalty=1.0"]}],
    "configs": [{"name": "nq", "overrides": []},
                {"name": "q", "overrides": ["data.include_question=true", "train.label_smoothing=0.1"]}],
}
TINY_RUN = ["train.quantization=none", "train.effective_batch=2", "train.max_steps=1", "train.warmup_ratio=0.0",
            "train.device=cpu", "train.num_threads=1", "merge.device=cpu", "merge.verify_prompts=1",
            "eval.device=cpu", "eval.num_threads=1", "eval.max_new_tokens=3", "eval.batch_tokens=0"]


def test_the_split_holds_out_a_seeded_draw_and_keeps_the_rest(tmp_path):
    data = write_fetaqa(tmp_path / "fetaqa", 10, 1)
    split = recipe_search.split_training(data / "train.jsonl.gz", tmp_path / "split", holdout=3, seed=1)
    assert (split["train"], split["held_out"], split["of"]) == (7, 3, 10)
    read = {name: [json.loads(line)["feta_id"] for line in gzip.open(tmp_path / "split" / name, "rt", encoding="utf-8")]
            for name in ("train.jsonl.gz", "validation.jsonl.gz")}
    assert sorted(read["train.jsonl.gz"] + read["validation.jsonl.gz"]) == list(range(1000, 1010))
    assert read["validation.jsonl.gz"] == [1000 + line - 1 for line in split["held_out_lines"]]
    again = recipe_search.split_training(data / "train.jsonl.gz", tmp_path / "again", holdout=3, seed=1)
    assert again["held_out_lines"] == split["held_out_lines"]
    for name in ("train.jsonl.gz", "validation.jsonl.gz"):  # byte for byte: a DVC dependency hashes the same
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "split" / name).read_bytes()
    with pytest.raises(SystemExit, match="holdout 10"):
        recipe_search.split_training(data / "train.jsonl.gz", tmp_path / "x", holdout=10, seed=1)


def test_the_choice_is_by_parent_f_then_bleu_per_task():
    selection = [
        {"name": "a", "decodings": {"greedy": {"task": "question", "held_out": {"bleu": 30, "parent_f": 0.6}},
                                    "beam4": {"task": "question", "held_out": {"bleu": 31, "parent_f": 0.6}}}},
        {"name": "b", "decodings": {"greedy": {"task": "question", "held_out": {"bleu": 20, "parent_f": 0.61}}}},
        {"name": "c", "decodings": {"greedy": {"task": "no_question", "held_out": {"bleu": 25, "parent_f": 0.5}}}},
        {"name": "d", "error": "exit 1", "decodings": {}},
    ]
    chosen = choose(candidates(selection), per_task=2)
    assert [(c["config"], c["decoding"]) for c in chosen] == [("c", "greedy"), ("b", "greedy"), ("a", "beam4")]


def test_a_bad_setting_in_the_grid_is_refused_before_anything_runs(tmp_path):
    data = write_fetaqa(tmp_path / "fetaqa", 6, 2)
    grid = {**GRID, "configs": [{"name": "bad", "overrides": ["train.label_smoothing=1.5"]}]}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid), encoding="utf-8")
    with pytest.raises(SystemExit, match="config bad, decoding greedy: train.label_smoothing must be 0 <= value < 1"):
        recipe_search.main(["--fetaqa", str(data), "--grid", str(tmp_path / "grid.yaml"), "--workroot",
                            str(tmp_path / "work"), "--out", str(tmp_path / "out"), "--cpu"])
    assert not (tmp_path / "work").exists()


def test_the_dry_run_prints_every_command(tmp_path, capsys):
    data = write_fetaqa(tmp_path / "fetaqa", 6, 2)
    assert recipe_search.main(["--fetaqa", str(data), "--workroot", str(tmp_path / "work"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    grid = yaml.safe_load((REPO / "bench" / "recipe_grid.yaml").read_text(encoding="utf-8"))
    assert out.count("bench.run_recipe") == len(grid["configs"]) * len(grid["decodings"])
    assert not (tmp_path / "work").exists()


def test_the_whole_search_runs_on_the_cpu_with_the_tiny_model(tmp_path, tiny_model_dir, capsys):
    # one config (question, label smoothing) x two decodings, one final: 8 stage processes, the fewest that
    # run every path (preprocess, train, evaluate greedy and beam on the held-out split; the four stages)
    data = write_fetaqa(tmp_path / "fetaqa", 6, 3)
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump({**GRID, "configs": GRID["configs"][1:]}), encoding="utf-8")
    sets = [a for s in [f"model.name={tiny_model_dir}", *TINY_RUN] for a in ("--set", s)]
    status = recipe_search.main(["--fetaqa", str(data), "--grid", str(tmp_path / "grid.yaml"), "--cpu", "--slots", "2",
                                 "--workroot", str(tmp_path / "work"), "--out", str(tmp_path / "out"), *sets])
    out = capsys.readouterr().out
    assert status == 0, out
    (result,) = (tmp_path / "out").glob("*-recipe-search.json")
    doc = json.loads(result.read_text(encoding="utf-8"))
    assert doc["split"] == {"train": 4, "held_out": 2, "seed": 3, "of": 6}
    assert doc["compared_on_held_out"] == 2  # 1 config x 2 decodings, each scored on the 2 held-out examples
    assert all(c["count"] == 2 and c["task"] == "question" for c in doc["candidates"])
    assert {c["decoding"] for c in doc["candidates"]} == {"greedy", "beam2"}
    assert len(doc["chosen"]) == 1 and doc["compared_on_validation"] == 1
    (final,) = doc["finals"]
    assert final["validation"]["count"] == 3 and "per_example" not in final  # numbers only in the workroot
    assert final["train"]["steps"] == 1 and final["best_of_task"]
    assert "bench.run_recipe --name" in final["command"] and "train.label_smoothing=0.1" in final["command"]
    full = json.loads((tmp_path / "work" / "recipe-search-full.json").read_text(encoding="utf-8"))
    assert len(full["finals"][0]["per_example"]) == 3
    assert "error" in final["vs_t5_large"]  # tiny data shares no ids with T5's 500
    assert "| final (all 2,004 → validation 500) |" in out and "| q | greedy | question |" in out
    assert len(list((tmp_path / "work" / "predictions").glob("*.jsonl.gz"))) == 1


def _dies_within(pid: int, seconds: float) -> bool:
    """SIGKILL is delivered asynchronously: a killed process can still read "R" for a moment while the
    kernel tears it down. Gone, or a zombie (dead, not yet reaped by init), counts as dead."""
    import time

    status_file = Path(f"/proc/{pid}/status")
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            state = status_file.read_text(encoding="utf-8").split("State:\t", 1)[1][0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return True
        if state in "ZX":
            return True
        time.sleep(0.05)
    return False


def test_the_hard_deadline_stops_a_command_and_what_it_started(tmp_path):
    import sys
    import time

    runner = recipe_search.Runner([""], tmp_path, hard_deadline=10, t0=time.perf_counter())
    script = ("import subprocess, sys, time; "
              "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
              "open('child.pid', 'w', encoding='utf-8').write(str(p.pid)); time.sleep(60)")
    start = time.perf_counter()
    with open(tmp_path / "log.txt", "w", encoding="utf-8") as log:
        status = runner.command([sys.executable, "-c", script], tmp_path, "", log)
    assert status == "stopped: hard deadline" and time.perf_counter() - start < 40
    child = int((tmp_path / "child.pid").read_text(encoding="utf-8"))
    assert _dies_within(child, seconds=10)
    with open(tmp_path / "log.txt", "w", encoding="utf-8") as log:  # past the deadline nothing starts
        assert runner.command([sys.executable, "-c", "print(1)"], tmp_path, "", log) == "not started: hard deadline"
