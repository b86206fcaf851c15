"""The pipeline as users drive it: `dvc repro` runs only stale stages, `dvc metrics diff` compares commits,
`dvc exp run -S` and a queued sweep work, and `dvc pull` restores models that write the same text.

Every test runs real `dvc` commands on one tiny project (tests/dvc_project.py: this project's stages,
dvc.yaml and .dvc/config on a tiny random Gemma 3, a whole `dvc repro` in about a minute on 2 CPU cores).
Its history is built once by the module fixtures: a full repro (commit 1), an eval param change (commit
2), a lora param change (commit 3). The tests that change the workspace (pull, experiments) come last.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import psutil
import pytest
from configobj import ConfigObj

from dvc_project import dvc, git, make_tiny_project, set_params

REPO = Path(__file__).resolve().parents[1]
STAGES = ["preprocess", "train", "merge", "evaluate", "export"]  # dvc.yaml order (export: disabled here)
# metrics/eval.json keys (stages/evaluate.py) that a comparison of two runs is about, as DVC flattens them
SCORES = [f"{run}.overall.{score}" for run in ("finetuned", "base")
          for score in ("bleu", "parent_precision", "parent_recall", "parent_f")]
SCORES += ["gain.overall.bleu", "gain.overall.parent_f"]


def ran_stages(output: str) -> list[str]:
    """The stages a `dvc repro` / `dvc exp run` ran, in order, from its output."""
    return re.findall(r"Running stage '([\w-]+)'", output)


def commit(root: Path, env: dict, message: str) -> str:
    git(root, env, "add", "-A")  # the throwaway repository: dvc.lock, params.yaml, metrics
    git(root, env, "commit", "-q", "-m", message)
    return git(root, env, "rev-parse", "HEAD").strip()


def lookup(tree: dict, dotted: str):
    for key in dotted.split("."):
        tree = tree[key]
    return tree


def experiments(root: Path, env: dict) -> list[dict]:
    """Every experiment `dvc exp show --json` lists: {"name", "rev", "params", "metrics", "state"}."""
    shown = json.loads(dvc(root, env, "exp", "show", "--json").stdout)
    found = []
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            for rev in exp["revs"]:
                data = rev["data"]
                found.append({
                    "name": rev["name"], "rev": rev["rev"],
                    "params": data["params"]["params.yaml"]["data"],
                    "metrics": {path: m.get("data") for path, m in (data.get("metrics") or {}).items()},
                    "state": (exp.get("executor") or {}).get("state"),
                })
    return found


def processes_in(folder: Path) -> list[psutil.Process]:
    """Processes (other than this one) whose working directory is inside `folder`: queue workers and the
    experiments they run (in .dvc/tmp/exps/...)."""
    found = []
    for proc in psutil.process_iter(["pid", "cwd", "cmdline"]):
        cwd = proc.info.get("cwd")
        if proc.pid != psutil.Process().pid and cwd and Path(cwd).is_relative_to(folder):
            found.append(proc)
    return found


def wait_gone(folder: Path, seconds: float) -> list[psutil.Process]:
    deadline = time.monotonic() + seconds
    while (left := processes_in(folder)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def wait_for_queue(root: Path, env: dict, seconds: float) -> str:
    """Wait until no task is queued or running; returns `dvc queue status`. A worker stops by itself once the
    queue has been empty for 10 s, so this watches processes and asks dvc (1-7 s a call on 2 busy cores)
    only when they are gone."""
    deadline = time.monotonic() + seconds
    while True:
        wait_gone(root, max(0.0, deadline - time.monotonic()))
        status = dvc(root, env, "queue", "status").stdout
        if not re.search(r"\b(Queued|Running)\b", status) or time.monotonic() > deadline:
            return status
        time.sleep(2)


def snapshot(root: Path, folder: str) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted((root / folder).rglob("*")) if p.is_file()}


def predictions(root: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (root / "metrics" / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    return [(row["id"], row["prediction"], row["base_prediction"]) for row in rows]


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir):
    """The tiny project after a full `dvc repro`, committed."""
    root, env = make_tiny_project(tmp_path_factory.mktemp("dvc-workflow"), tiny_model_dir)
    first = dvc(root, env, "repro").stdout
    return {"root": root, "env": env, "first": first, "rev": commit(root, env, "full repro")}


@pytest.fixture(scope="module")
def eval_change(project):
    """eval.max_examples 4 -> 6 in params.yaml, `dvc repro`, committed."""
    root, env = project["root"], project["env"]
    set_params(root, {"eval.max_examples": 6})
    output = dvc(root, env, "repro").stdout
    return {"output": output, "old": project["rev"], "new": commit(root, env, "evaluate on 6 examples")}


@pytest.fixture(scope="module")
def lora_change(eval_change, project):
    """lora.alpha 16 -> 32 in params.yaml, `dvc repro`, committed."""
    root, env = project["root"], project["env"]
    set_params(root, {"lora.alpha": 32})
    output = dvc(root, env, "repro").stdout
    return {"output": output, "rev": commit(root, env, "lora alpha 32")}


def test_a_repro_with_nothing_changed_runs_no_stage_within_5_seconds(project):
    root, env = project["root"], project["env"]
    assert ran_stages(project["first"]) == STAGES

    start = time.perf_counter()
    again = dvc(root, env, "repro")
    seconds = time.perf_counter() - start

    assert ran_stages(again.stdout) == [], again.stdout
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in again.stdout
    assert json.loads(dvc(root, env, "status", "--json").stdout) == {}
    assert seconds < 5.0, f"a no-op `dvc repro` took {seconds:.1f} s (the bound is 5 s)"


def test_an_eval_param_change_reruns_only_evaluate(eval_change):
    assert ran_stages(eval_change["output"]) == ["evaluate"], eval_change["output"]


def test_a_lora_param_change_reruns_train_merge_evaluate_and_export_but_not_preprocess(lora_change):
    assert ran_stages(lora_change["output"]) == ["train", "merge", "evaluate", "export"], lora_change["output"]
    assert "Stage 'preprocess' didn't change, skipping" in lora_change["output"]


def test_metrics_diff_between_two_commits_shows_bleu_and_parent_deltas(project, eval_change):
    root, env, old, new = project["root"], project["env"], eval_change["old"], eval_change["new"]
    params = json.loads(dvc(root, env, "params", "diff", old, new, "--json").stdout)
    assert params == {"params.yaml": {"eval.max_examples": {"old": 4, "new": 6, "diff": 2}}}  # the one difference

    diff = json.loads(dvc(root, env, "metrics", "diff", old, new, "--all", "--json").stdout)["metrics/eval.json"]

    committed = {rev: json.loads(git(root, env, "show", f"{rev}:metrics/eval.json")) for rev in (old, new)}
    for key in SCORES:
        before, after = lookup(committed[old], key), lookup(committed[new], key)
        assert diff[key]["old"] == pytest.approx(before, abs=1e-5), key
        assert diff[key]["new"] == pytest.approx(after, abs=1e-5), key
        assert diff[key]["diff"] == pytest.approx(after - before, abs=1e-5), key
    assert diff["finetuned.overall.count"] == {"old": 4, "new": 6, "diff": 2}  # the diff is of these commits


def test_pull_restores_models_that_generate_the_same_text(project, lora_change):
    root, env = project["root"], project["env"]
    dvc(root, env, "push")
    models, before = snapshot(root, "models"), predictions(root)

    for folder in ("models", "data/processed", ".dvc/cache"):
        shutil.rmtree(root / folder)
    (root / "metrics" / "predictions.jsonl").unlink()
    dvc(root, env, "pull")
    assert snapshot(root, "models") == models

    rerun = dvc(root, env, "repro", "--force", "--single-item", "evaluate")  # generates with models/merged
    assert ran_stages(rerun.stdout) == ["evaluate"]
    assert predictions(root) == before


def test_exp_run_with_a_set_param_is_listed_by_exp_show(project, lora_change):
    root, env = project["root"], project["env"]
    git(root, env, "reset", "-q", "--hard")  # from the committed state (the pull test re-ran evaluate)

    run = dvc(root, env, "exp", "run", "-n", "rank-16", "-S", "lora.r=16")

    assert ran_stages(run.stdout) == ["train", "merge", "evaluate", "export"], run.stdout
    listed = {exp["name"]: exp for exp in experiments(root, env)}
    assert listed["rank-16"]["params"]["lora"]["r"] == 16
    assert lookup(listed["rank-16"]["metrics"]["metrics/eval.json"], "finetuned.overall.count") == 6


@pytest.fixture
def queue_workers(project):
    """Stops (and as a last resort kills) whatever the experiment queue left running in the project."""
    root, env = project["root"], project["env"]
    yield
    dvc(root, env, "queue", "stop", "--kill", check=False)
    for proc in wait_gone(root, 30):  # ours: started by `dvc queue start` in this test's project
        proc.kill()


def test_a_queued_sweep_runs_every_value_and_exp_show_lists_them(project, queue_workers):
    root, env = project["root"], project["env"]
    git(root, env, "reset", "-q", "--hard")
    rates = [0.02, 0.005]

    dvc(root, env, "exp", "run", "--queue", "-S", f"train.learning_rate={','.join(map(str, rates))}")
    dvc(root, env, "queue", "start", "-j", "1")
    status = wait_for_queue(root, env, 600)

    swept = [exp for exp in experiments(root, env) if exp["params"]["train"]["learning_rate"] in rates]
    logs = {exp["name"]: dvc(root, env, "queue", "logs", exp["name"], check=False).stdout[-3000:] for exp in swept}
    assert sorted(exp["params"]["train"]["learning_rate"] for exp in swept) == sorted(rates), status
    for exp in swept:
        assert exp["state"] == "success", f"{exp['name']}: {status}\n{logs[exp['name']]}"
        assert "finetuned" in exp["metrics"]["metrics/eval.json"], exp["name"]

    dvc(root, env, "queue", "stop")  # the worker has stopped by itself already (queue empty for 10 s)
    left = wait_gone(root, 30)
    assert not left, f"left running by the queue: {[' '.join(p.info['cmdline'] or []) for p in left]}"


def test_committed_dvc_config_has_no_relative_site_cache_dir():
    """DVC 3.67 resolves a relative core.site_cache_dir against the current folder (remote URLs, by contrast,
    against the config file): queued and --temp experiments, which run in .dvc/tmp/exps/..., then fail with
    "unable to open database file", and dvc started in a subfolder builds a second state database there.
    run.py gives DVC an absolute DVC_SITE_CACHE_DIR inside the project instead."""
    site_cache = ConfigObj(str(REPO / ".dvc" / "config"))["core"].get("site_cache_dir")
    assert site_cache is None or Path(site_cache).is_absolute(), site_cache
