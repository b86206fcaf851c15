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
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from configobj import ConfigObj

from dvc_project import dvc, git, make_tiny_project, set_params

REPO = Path(__file__).resolve().parents[1]
STAGES = ["preprocess", "train", "merge", "evaluate", "export"]  # dvc.yaml order (export: disabled here)
# metrics/eval.json keys (table2text/evaluation.py eval_result) that a comparison of two runs is about, as DVC flattens them
SCORES = [f"{run}.overall.{score}" for run in ("finetuned", "base")
          for score in ("bleu", "parent_precision", "parent_recall", "parent_f")]
SCORES += ["gain.overall.bleu", "gain.overall.parent_f"]
# A table as a user writes one for `python3 run.py infer` (README "Inference")
TABLE = {"title": "1998 FIFA World Cup", "section": "Final", "header": ["Team", "Goals"],
         "rows": [["France", 3], ["Brazil", 0]], "highlight": [[0, 0], [0, 1]]}
# What varies from run to run or host to host, and so must never be in a DVC-tracked metric
RUNTIME_WORDS = ("second", "per_s", "memory", "device", "resumed", "host", "date", "time")


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


def tracked_files(root: Path, env: dict) -> dict[str, bytes]:
    """Every file git tracks in the project, by path."""
    return {name: (root / name).read_bytes() for name in git(root, env, "ls-files").splitlines()}


def clone(root: Path, env: dict, dest: Path) -> tuple[Path, dict]:
    """`git clone` of the project at dest, as on another machine: its own DVC cache and state database."""
    git(root, env, "clone", "-q", str(root), str(dest))
    return dest, {**env, "DVC_SITE_CACHE_DIR": str(dest / ".dvc" / "site-cache")}


def module(cwd: Path, env: dict, name: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    """`python -m NAME ARGS` in cwd: what `python3 run.py pull|infer ...` runs inside .venv."""
    return subprocess.run([sys.executable, "-m", name, *args], cwd=cwd, env=env, input=stdin, capture_output=True,
                          text=True, encoding="utf-8", timeout=600)


def readme_command(pattern: str) -> str:
    """The README's command line that matches `pattern` (so that the test runs what users copy), its
    backslash-continued lines joined."""
    text = re.sub(r"\\\n\s*", " ", (REPO / "README.md").read_text(encoding="utf-8"))
    lines = [line.strip() for line in text.splitlines()]
    found = [line for line in lines if re.search(pattern, line)]
    assert found, f"README.md has no command matching {pattern!r}"
    return found[0].split("  #")[0].strip()


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


def test_repro_with_train_method_full_runs_every_stage_on_the_trained_weights(tmp_path, tiny_model_dir):
    """`dvc repro` with train.method full end to end: full fine-tuning, its merge (nothing to fold: the
    trained weights in merge.dtype) and an evaluation of the merged model, with no adapter anywhere."""
    root, env = make_tiny_project(tmp_path, tiny_model_dir, {"train.method": "full", "train.learning_rate": 1e-3})
    output = dvc(root, env, "repro").stdout
    assert ran_stages(output) == STAGES
    adapter_dir = root / "models" / "adapter"
    info = json.loads((adapter_dir / "training_info.json").read_text(encoding="utf-8"))
    assert info["method"] == "full" and info["dtype"] == "float32"
    assert (adapter_dir / "model.safetensors").is_file() and not (adapter_dir / "adapter_config.json").exists()
    merge = json.loads((root / "metrics" / "merge.json").read_text(encoding="utf-8"))
    assert merge["passed"] and merge["adapter_effect"]["mean_kl"] > 0
    scores = json.loads((root / "metrics" / "eval.json").read_text(encoding="utf-8"))
    assert scores["examples"] == 4 and scores["finetuned"]["overall"]["bleu"] is not None
    runtime = json.loads((root / "metrics" / "runtime" / "train.json").read_text(encoding="utf-8"))
    assert runtime["method"] == "full" and runtime["cuda_graphs"] is False


def test_a_repro_with_nothing_changed_runs_no_stage(project):
    root, env = project["root"], project["env"]
    assert ran_stages(project["first"]) == STAGES

    again = dvc(root, env, "repro")

    assert ran_stages(again.stdout) == [], again.stdout
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in again.stdout
    assert json.loads(dvc(root, env, "status", "--json").stdout) == {}


def test_a_second_fresh_repro_rewrites_every_tracked_file_byte_for_byte(project):
    """Nothing that varies from run to run sits in a DVC-tracked output or metric: after a repro from
    nothing (no models, no checkpoints, no run cache) of the same params, `git status` is clean."""
    root, env = project["root"], project["env"]
    before = tracked_files(root, env)
    for folder in ("models", "checkpoints", "data/processed", "metrics/runtime"):
        shutil.rmtree(root / folder, ignore_errors=True)

    rerun = dvc(root, env, "repro", "--force", "--no-run-cache")

    assert ran_stages(rerun.stdout) == STAGES and "resuming" not in rerun.stdout, rerun.stdout
    assert git(root, env, "status", "--porcelain") == "", git(root, env, "diff")
    assert tracked_files(root, env) == before
    assert json.loads(dvc(root, env, "status", "--json").stdout) == {}
    # how the run went is still recorded, in the git-ignored runtime files, and printed
    runtime = json.loads((root / "metrics" / "runtime" / "train.json").read_text(encoding="utf-8"))
    assert runtime["resumed_from_step"] == 0 and runtime["wall_seconds"] > 0 and runtime["tokens_per_s"] > 0
    assert "times and throughput -> metrics/runtime/train.json" in rerun.stdout
    evaluated = json.loads((root / "metrics" / "runtime" / "evaluate.json").read_text(encoding="utf-8"))
    assert evaluated["generation"]["seconds"] > 0


def test_metrics_show_holds_scores_and_no_timings(project):
    shown = json.loads(dvc(project["root"], project["env"], "metrics", "show", "--json").stdout)
    names = [f"{path}:{key}" for path, data in shown[""]["data"].items()
             for key in flatten(data["data"])]
    assert "metrics/eval.json:finetuned.overall.parent_f" in names
    assert not [n for n in names if any(word in n for word in RUNTIME_WORDS)], names


def flatten(tree, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


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


def test_a_checkout_round_trip_of_cached_states_runs_no_stage(project, lora_change):
    """Resume points are no DVC output, so a cached state checked out again is up to date."""
    root, env = project["root"], project["env"]
    for rev in (project["rev"], "main"):
        git(root, env, "checkout", "-q", rev)
        dvc(root, env, "checkout")
        assert json.loads(dvc(root, env, "status", "--json").stdout) == {}, rev
        again = dvc(root, env, "repro")
        assert ran_stages(again.stdout) == [], f"{rev}: {again.stdout}"
    assert (root / "checkpoints").is_dir()  # still there for a crashed run to resume from


def test_a_fresh_clone_pulls_only_the_adapter_and_infers_without_training(project, lora_change, tmp_path):
    """One machine trains and pushes; a `git clone` elsewhere pulls models/adapter alone and writes the
    sentence the trained adapter writes. Before the push, the pull says so in one line."""
    root, env = project["root"], project["env"]
    fresh, fresh_env = clone(root, env, tmp_path / "elsewhere")

    never_pushed = module(fresh, fresh_env, "stages.pull", "models/adapter")
    assert never_pushed.returncode == 2, never_pushed.stdout + never_pushed.stderr
    message = never_pushed.stderr.strip()
    assert "\n" not in message and "Missing cache files" not in message, message
    assert "does not hold the committed version of models/adapter" in message and "dvc push" in message, message
    assert not (fresh / "models").exists()

    dvc(root, env, "push")
    pulled = module(fresh, fresh_env, "stages.pull", "models/adapter")
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    assert (fresh / "models" / "adapter" / "adapter_model.safetensors").is_file()
    assert not (fresh / "models" / "merged").exists() and not (fresh / "data" / "processed").exists()

    args = ("-", "--adapter", "models/adapter", "--max-new-tokens", "8", "--device", "cpu")
    here = module(root, env, "stages.infer", *args, stdin=json.dumps(TABLE))
    there = module(fresh, fresh_env, "stages.infer", *args, stdin=json.dumps(TABLE))
    assert here.returncode == 0 and there.returncode == 0, here.stderr + there.stderr
    assert there.stdout == here.stdout and there.stdout.strip()
    assert "Running stage" not in there.stdout + there.stderr

    everything = module(fresh, fresh_env, "stages.pull")
    assert everything.returncode == 0, everything.stdout + everything.stderr
    assert json.loads(dvc(fresh, fresh_env, "status", "--json").stdout) == {}


def test_artifacts_get_fetches_one_model_by_version_tag_without_studio(project, lora_change, tmp_path):
    """`dvc artifacts get` needs no Studio once the artifact has a version tag (NAME@vX.Y.Z)."""
    root, env = project["root"], project["env"]
    dvc(root, env, "push", "models/adapter")
    git(root, env, "tag", "-a", "totto-adapter@v0.1.0", "-m", "adapter of the lora change")

    dvc(tmp_path, env, "artifacts", "get", str(root), "totto-adapter", "-o", "adapter")

    fetched = {p.name: p.read_bytes() for p in (tmp_path / "adapter").iterdir()}
    assert fetched == {p.name: p.read_bytes() for p in (root / "models" / "adapter").iterdir()}


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


def test_the_readme_exp_show_command_fits_120_columns_with_params_and_scores(project):
    root, env = project["root"], project["env"]
    command = readme_command(r"run\.py dvc exp show --only-changed")
    args = shlex.split(command)[3:]  # after `python3 run.py dvc`

    shown = dvc(root, {**env, "COLUMNS": "120"}, *args).stdout

    widths = [len(line.rstrip()) for line in shown.splitlines()]
    assert max(widths) <= 120, shown
    header = shown.splitlines()[1].split()
    for column in ("bleu", "parent_f", "parent_f_gain", "lora.r", "train.learning_rate"):  # changed params, scores
        assert column in header, shown


def test_the_plots_page_renders_offline_with_unique_ids_and_data(project, tmp_path):
    root, env = project["root"], project["env"]
    dvc(root, env, "plots", "show", "-o", str(tmp_path / "page"))
    page = (tmp_path / "page" / "index.html").read_text(encoding="utf-8")

    assert "cdn.jsdelivr" not in page and "<script src=" not in page  # the libraries are inlined
    assert "vegaEmbed" in page and "vega-lite@5.2.0" in page
    ids = re.findall(r"vegaEmbed\('#([\w-]+)'", page)
    assert ids[:3] == ["train_loss", "train_learning_rate", "train_grad_norm"] and len(ids) == len(set(ids)) == 7
    specs = [json.loads(m) for m in re.findall(r"var spec = (\{.*?\});\s*vegaEmbed", page, flags=re.S)]
    assert len(specs) == len(ids) and all(spec["data"]["values"] for spec in specs)


def test_committed_dvc_config_has_no_relative_site_cache_dir():
    """DVC 3.67 resolves a relative core.site_cache_dir against the current folder (remote URLs, by contrast,
    against the config file): queued and --temp experiments, which run in .dvc/tmp/exps/..., then fail with
    "unable to open database file", and dvc started in a subfolder builds a second state database there.
    run.py gives DVC an absolute DVC_SITE_CACHE_DIR inside the project instead."""
    site_cache = ConfigObj(str(REPO / ".dvc" / "config"))["core"].get("site_cache_dir")
    assert site_cache is None or Path(site_cache).is_absolute(), site_cache
