"""Crash safety, integrity and security of the pipeline (issue 8; docs/RELIABILITY.md lists the cases).

* crash safety: SIGKILL of the train stage at a random step of a real `dvc repro`, then `dvc repro`
  resumes from the last complete checkpoint and ends with the adapter of an uninterrupted run;
  half-written checkpoints are never loaded; outputs are written atomically, with normal permissions;
* integrity: an adapter on another base model, corrupt safetensors (truncated, flipped header bytes)
  are refused with a message naming the file; the merged model is not started without the disk space;
* security: no remote code, no pickle weights, and fake credentials in the environment of a whole
  pipeline run appear in none of its outputs, logs or git history.
"""

from __future__ import annotations

import ast
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from dvc_project import dvc, git, make_tiny_project
from table2text.io import atomic as atomic_io
from table2text.model import finetuned
from stages import infer
from table2text.model import sources as model_sources
from table2text.io.readers import read_processed
from table2text.training import loop
from table2text.io.atomic import current_umask, write_atomic
from table2text.model import merging

REPO = Path(__file__).resolve().parents[1]
CODE = sorted([*(REPO / "stages").glob("*.py"), *(REPO / "table2text").rglob("*.py")])  # the stages and their library
MAX_STEPS, SAVE_STEPS = 6, 2
# over make_tiny_project's TINY; no base-model comparison: evaluate runs once, faster
PROJECT = {"train.max_steps": MAX_STEPS, "train.save_steps": SAVE_STEPS, "eval.compare_base": False}
MARKER = "fAkE-SeCrEt-" + os.urandom(8).hex()
SECRET_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                    "AWS_SESSION_TOKEN", "AZURE_STORAGE_KEY", "AZURE_STORAGE_CONNECTION_STRING",
                    "AZURE_STORAGE_SAS_TOKEN", "GOOGLE_APPLICATION_CREDENTIALS", "GITHUB_TOKEN", "WANDB_API_KEY")


@pytest.fixture(autouse=True)
def _two_threads():
    torch.set_num_threads(2)  # the CPU is shared


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors", device="cpu")


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


# ------------------------------------------------------------------------------------------------
# One real pipeline run: fake credentials in the environment throughout, the train stage SIGKILLed at a
# random step of `dvc repro`, half-written checkpoints planted, then `dvc repro` to the end and `dvc push`.


def logged_steps(project: Path) -> int:
    loss = project / "metrics" / "train" / "plots" / "metrics" / "loss.tsv"
    try:
        return max(0, len(loss.read_text(encoding="utf-8").splitlines()) - 1)
    except FileNotFoundError:
        return 0


def plant_half_written_checkpoints(folder: Path) -> list[Path]:
    """What a crash (or a lying disk) could leave next to the complete checkpoints: a temp folder, a
    folder without state.json, one with a truncated weights file, one with a truncated state.json;
    copies of the latest checkpoint, numbered past any real step so that "latest wins" would pick them
    (and no real checkpoint is written under their names later)."""
    latest = sorted(folder.glob("step-*"))[-1]
    planted = []
    for step, damage in enumerate(["tmp", "no state", "truncated adapter", "truncated state"], start=999_990):
        name = f".tmp-step-{os.urandom(4).hex()}" if damage == "tmp" else f"step-{step:06d}"
        bad = folder / name
        shutil.copytree(latest, bad)
        state = json.loads((bad / "state.json").read_text(encoding="utf-8"))
        (bad / "state.json").write_text(json.dumps({**state, "step": step}), encoding="utf-8")
        if damage == "no state":
            (bad / "state.json").unlink()
        elif damage == "truncated adapter":
            data = (bad / "adapter.safetensors").read_bytes()
            (bad / "adapter.safetensors").write_bytes(data[: len(data) // 2])
        elif damage == "truncated state":
            text = (bad / "state.json").read_text(encoding="utf-8")
            (bad / "state.json").write_text(text[: len(text) // 2], encoding="utf-8")
        planted.append(bad)
    return planted


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, tiny_model_dir) -> dict:
    """What happened: project, env, the step of the kill, the checkpoint left, what was there after the
    kill, what was planted, the log of every command, and an uninterrupted run's adapter folder."""
    import psutil  # a dependency of dvc

    root = tmp_path_factory.mktemp("pipeline")
    project, env = make_tiny_project(root, tiny_model_dir, PROJECT)
    env = {**env, **{name: f"{MARKER}-{name}" for name in SECRET_VARIABLES}}
    run = {"project": project, "env": env, "log": []}

    # `dvc repro train` runs preprocess, then train; the kill comes after a random number of logged steps
    kill_after = random.SystemRandom().randint(1, MAX_STEPS - 2)
    repro = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "train"], cwd=project, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, encoding="utf-8")
    deadline = time.monotonic() + 300
    while logged_steps(project) < kill_after and repro.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    # the python process itself: DVC starts the command through `sh -c`, and a shell such as dash stays as
    # its parent rather than exec-ing it, so match the argument, not the command line's text
    stage = [p for p in psutil.Process(repro.pid).children(recursive=True) if "stages.train" in p.cmdline()]
    assert len(stage) == 1, f"train stage not running (logged {logged_steps(project)} steps)"
    stage[0].send_signal(signal.SIGKILL)
    output, _ = repro.communicate(timeout=120)
    run["log"].append(output)
    complete = sorted((project / "checkpoints").glob("step-*"))
    run.update(returncode=repro.returncode, killed_at=logged_steps(project),
               all_with_state=all((c / "state.json").is_file() for c in complete),
               adapter_after_kill=(project / "models" / "adapter").exists(),
               last=int(complete[-1].name.split("-")[1]) if complete else 0,
               planted=list((project / "checkpoints").glob(".tmp-step-*")))  # a real one if killed mid-write
    if complete:
        run["planted"] += plant_half_written_checkpoints(project / "checkpoints")

    for args in (["repro"], ["push"]):
        result = dvc(project, env, *args)
        run["log"] += [result.stdout, result.stderr]
    git(project, env, "add", "-A")
    git(project, env, "commit", "-q", "-m", "results")

    # The uninterrupted run: the train stage's own command on the same data and params, run the same
    # way (a fresh python process, same threads), in a folder of its own.
    whole = root / "uninterrupted"
    (whole / "data" / "processed").mkdir(parents=True)
    shutil.copy2(project / "params.yaml", whole / "params.yaml")
    shutil.copy2(project / "data" / "processed" / "train.jsonl", whole / "data" / "processed" / "train.jsonl")
    result = subprocess.run([sys.executable, "-m", "stages.train", "--no-dvclive"], cwd=whole,
                            env={**env, "PYTHONPATH": str(project)}, capture_output=True, text=True, timeout=600, encoding="utf-8")
    assert result.returncode == 0, result.stdout + result.stderr
    run["log"] += [result.stdout, result.stderr]
    run["uninterrupted"] = whole / "models" / "adapter"
    return run


@pytest.mark.posix_only("SIGKILL (Windows has TerminateProcess, a different path, not tested)")
def test_sigkill_of_the_train_stage_then_dvc_repro_resumes(pipeline_run):
    run, project = pipeline_run, pipeline_run["project"]
    killed_at, last = run["killed_at"], run["last"]
    assert run["returncode"] != 0 and killed_at < MAX_STEPS
    assert not run["adapter_after_kill"]  # the adapter is only ever written whole
    assert run["all_with_state"]  # every step-* folder left by the kill is complete
    # the checkpoint of the last logged step, or the one before when the kill came while writing it
    assert last % SAVE_STEPS == 0 and killed_at - SAVE_STEPS <= last <= killed_at, (last, killed_at)
    resumed = f"train: resuming from checkpoints/step-{last:06d} (step {last} of {MAX_STEPS}"
    assert (resumed in "".join(run["log"])) == (last > 0), f"killed after step {killed_at}"
    runtime = json.loads((project / "metrics" / "runtime" / "train.json").read_text(encoding="utf-8"))  # how it ran: not DVC-tracked
    assert runtime["resumed_from_step"] == last
    assert not any(p.exists() for p in run["planted"])  # half-written checkpoints: removed, never loaded
    assert_same_tensors(adapter_tensors(run["uninterrupted"]), adapter_tensors(project / "models" / "adapter"))
    status = dvc(project, run["env"], "status").stdout
    assert "changed" not in status and "modified" not in status, status  # dvc.lock records the finished run


@pytest.mark.posix_only("SIGKILL (Windows has TerminateProcess, a different path, not tested)")
def test_fake_credentials_appear_in_no_output_log_or_commit(pipeline_run):
    project, env, log = pipeline_run["project"], pipeline_run["env"], "\n".join(pipeline_run["log"])
    assert "Running stage 'evaluate'" in log  # the whole pipeline ran
    assert MARKER not in log
    leaks = [p for p in project.parent.rglob("*") if p.is_file() and MARKER.encode() in p.read_bytes()]
    assert not leaks, leaks  # params, dvc.lock, metrics, models' JSON, DVC cache and remote, .git (packed)
    history = git(project, env, "log", "-p", "--all", "--format=%H %an %ae %s%n%b")
    assert "results" in history and "dvc.lock" in history
    assert MARKER not in history
    # and in every version of every file git stores (git grep exits 1 when nothing matches)
    revisions = git(project, env, "rev-list", "--all").split()
    found = subprocess.run(["git", "grep", "-I", "-e", "fAkE-SeCrEt", *revisions], cwd=project, env=env,
                           capture_output=True, text=True, encoding="utf-8")
    assert (found.returncode, found.stdout) == (1, ""), found.stdout + found.stderr


@pytest.mark.posix_only("POSIX permission bits and umask (Windows files have ACLs)")
def test_outputs_have_normal_permissions(pipeline_run):
    project = pipeline_run["project"]
    expected = 0o666 & ~current_umask()
    for name in ("metrics/preprocess.json", "metrics/train.json", "metrics/merge.json", "metrics/eval.json",
                 "metrics/predictions.jsonl", "metrics/plots/by_table_size.csv"):
        assert (project / name).stat().st_mode & 0o777 == expected, name
    # the model folders too (they were 0700, their safetensors 0600): train's adapter, merge's model
    for folder in ("models/adapter", "models/merged"):
        assert (project / folder).stat().st_mode & 0o777 == 0o777 & ~current_umask(), folder
        files = [p for p in (project / folder).rglob("*") if p.is_file()]
        assert any(p.suffix == ".safetensors" for p in files), folder
        for file in files:
            assert file.stat().st_mode & 0o777 == expected, file


# ------------------------------------------------------------------------------------------------
# Crash safety of training, in process


def small_params(tiny_model_dir) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    params["model"]["name"] = str(tiny_model_dir)
    params["train"].update(quantization="none", effective_batch=4, max_steps=3, save_steps=1, logging_steps=1,
                           learning_rate=1e-2, warmup_ratio=0.0, device="cpu", cpu_micro_batch_tokens=256)
    return params


def test_half_written_checkpoints_are_never_loaded(tiny_model_dir, real_tokenizer, processed_dir, tmp_path):
    records = read_processed(processed_dir / "train.jsonl")
    params = small_params(tiny_model_dir)

    def run(folder, on_step=None):
        return loop.train(params, records, folder / "adapter", checkpoint_dir=folder / "ckpt", metrics_dir=None,
                           model_dir=tiny_model_dir, tokenizer=real_tokenizer, on_step=on_step, progress=False)

    run(tmp_path / "whole")

    def crash(step):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed", on_step=crash)
    planted = plant_half_written_checkpoints(tmp_path / "resumed" / "ckpt")
    stats = run(tmp_path / "resumed")
    assert stats["resumed_from_step"] == 2
    assert not any(p.exists() for p in planted)  # cleared away, never loaded
    assert_same_tensors(adapter_tensors(tmp_path / "whole" / "adapter"), adapter_tensors(tmp_path / "resumed" / "adapter"))


# ------------------------------------------------------------------------------------------------
# Atomic outputs


@pytest.mark.posix_only("POSIX permission bits and umask (Windows files have ACLs)")
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_files_get_the_permissions_of_a_plain_open(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        assert current_umask() == umask
        write_atomic(tmp_path / "out.json", "{}\n")
        with open(tmp_path / "plain.json", "w", encoding="utf-8") as fh:
            fh.write("{}\n")
    finally:
        os.umask(old)
    assert (tmp_path / "out.json").stat().st_mode & 0o777 == mode == (tmp_path / "plain.json").stat().st_mode & 0o777


@pytest.mark.posix_only("SIGKILL (Windows has TerminateProcess, a different path, not tested)")
def test_sigkill_during_an_atomic_write_leaves_the_previous_file(tmp_path):
    target = tmp_path / "train.jsonl"
    target.write_text("previous complete output\n", encoding="utf-8")
    # The child stops inside write_atomic with the new text written to its temp file, not yet renamed.
    child = subprocess.Popen([sys.executable, "-c", f"""
import os, sys, time
from table2text.io import atomic as atomic_io
def stop(fd):
    print("written", flush=True)
    time.sleep(600)
atomic_io.os.fsync = stop
atomic_io.write_atomic({str(target)!r}, "new output\\n" * 100000)
"""], cwd=REPO, stdout=subprocess.PIPE, text=True, encoding="utf-8")
    assert child.stdout.readline() == "written\n"
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=60)
    assert target.read_text(encoding="utf-8") == "previous complete output\n"
    leftovers = [p.name for p in tmp_path.iterdir() if p != target]
    assert len(leftovers) == 1 and re.fullmatch(r"\.train\.jsonl\..+\.tmp", leftovers[0])  # hidden, never the output


def test_an_exception_during_an_atomic_write_leaves_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "eval.json"
    target.write_text("previous\n", encoding="utf-8")

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("table2text.io.atomic.os.fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_atomic(target, "new\n")
    assert target.read_text(encoding="utf-8") == "previous\n" and [p.name for p in tmp_path.iterdir()] == ["eval.json"]


WRITES = {"open", "write_text", "write_bytes", "save_file", "save", "save_pretrained", "dump", "copy", "copy2",
          "copyfile", "copytree"}


def raw_writes(function: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(function):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        if name == "open":  # only opening for writing counts: open(path, "w"), path.open("a"), gzip.open(p, "wt")
            modes = [a.value for a in node.args[:2] + [k.value for k in node.keywords if k.arg == "mode"]
                     if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            if not any(re.fullmatch(r"[rwxabt+]*[wax+][rwxabt+]*", m) for m in modes):
                continue
        qualified = ast.unparse(node.func)
        if name == "save" and qualified != "torch.save" or name.startswith("copy") and not qualified.startswith("shutil."):
            continue  # e.g. dict.copy(), a trainer's save()
        if name in WRITES:
            found.append(f"{qualified} (line {node.lineno})")
    return found


def test_every_stage_writes_its_files_atomically():
    """A file write in stages/ or table2text/ is either table2text.io.atomic (temp file, rename) or inside a function that builds a
    temp folder (tempfile.mkdtemp) and renames it into place (os.replace / replace_dir), or fills one of
    atomic_io's temp folders (staged_dir, StagedOutputs.folder)."""
    sample = ast.parse("def f(p):\n    open(p, 'w').write(p.read_text())\n    json.dump({}, p.open('a'))\n").body[0]
    assert sorted(raw_writes(sample)) == ["json.dump (line 3)", "open (line 2)", "p.open (line 3)"]  # what it finds
    offenders = []
    for path in CODE:
        if path.name == "atomic.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for function in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.Module))]:
            own = function.body if isinstance(function, ast.Module) else [function]
            if isinstance(function, ast.Module):  # module level: statements outside any function
                own = [n for n in function.body if not isinstance(n, (ast.FunctionDef, ast.ClassDef))]
            writes = [w for node in own for w in raw_writes(node)]
            if not writes:
                continue
            calls = {ast.unparse(n.func) for node in own for n in ast.walk(node) if isinstance(n, ast.Call)}
            staged = {"staged_dir", "atomic_io.staged_dir", "stage.folder"} & calls  # atomic_io's temp folders
            if not (staged or {"tempfile.mkdtemp"} & calls and {"os.replace", "replace_dir"} & calls):
                offenders.append(f"{path.name}:{getattr(function, 'name', '<module>')}: {writes}")
    assert not offenders, offenders


# ------------------------------------------------------------------------------------------------
# Merge: an interrupted merge keeps the previous model; no start without the disk space


@pytest.fixture(scope="module")
def fresh_adapter(tmp_path_factory, tiny_model_dir) -> Path:
    """A LoRA adapter of the tiny model as the train stage saves it (B random, so merging changes weights)."""
    from peft import LoraConfig, get_peft_model

    folder = tmp_path_factory.mktemp("adapter") / "adapter"
    torch.manual_seed(0)
    base = model_sources.load_model(tiny_model_dir, dtype=torch.float32, device=torch.device("cpu"))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.01)
    model.save_pretrained(folder)
    info = {"base_model": {"name": str(tiny_model_dir), "weights_sha256": model_sources.weights_sha256(tiny_model_dir)},
            "params": {"train": {"quantization": "none"}}, "dtype": "float32"}
    (folder / "training_info.json").write_text(json.dumps(info), encoding="utf-8")
    return folder


def merge_params(tiny_model_dir) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    params["model"]["name"] = str(tiny_model_dir)
    params["merge"].update(device="cpu", verify_prompts=2)
    return params


PROMPTS = ["Describe the highlighted cells.\n<cell> 3 </cell>\n", "Describe the table.\n<cell> Ajax </cell>\n"]


def test_an_interrupted_merge_keeps_the_previous_model(tiny_model_dir, fresh_adapter, tmp_path, monkeypatch):
    from transformers import GenerationConfig

    merged = tmp_path / "models" / "merged"
    shutil.copytree(tiny_model_dir, merged)  # the previous model
    before = {p.name: p.read_bytes() for p in merged.iterdir()}

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as a Ctrl-C half-way through saving

    monkeypatch.setattr(GenerationConfig, "save_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        merging.merge(merge_params(tiny_model_dir), fresh_adapter, merged, PROMPTS, metrics_file=None)
    assert {p.name: p.read_bytes() for p in merged.iterdir()} == before
    assert [p.name for p in merged.parent.iterdir()] == ["merged"]  # no temp folder left


def test_merge_refuses_to_start_without_the_disk_space(tiny_model_dir, fresh_adapter, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    free = 3 * 2**20
    monkeypatch.setattr(atomic_io.shutil, "disk_usage", lambda path: usage(2**40, 2**40 - free, free))
    merged = tmp_path / "models" / "merged"
    with pytest.raises(atomic_io.OutputError) as err:
        merging.merge(merge_params(tiny_model_dir), fresh_adapter, merged, PROMPTS, metrics_file=None)
    message = str(err.value)
    assert f"{merged.parent.as_posix()}: not enough disk space for the merged model (bfloat16): needs about " in message
    assert f"{free:,} bytes free" in message
    assert not merged.exists() and list(merged.parent.iterdir()) == []
    # the estimate covers the merged model, which has the base's tensors in bf16 and its tokenizer files
    needed = int(re.search(r"needs about ([\d,]+) bytes", message).group(1).replace(",", ""))
    base = sum(p.stat().st_size for p in tiny_model_dir.iterdir())
    assert base < needed < base * 1.5 + merging.DISK_SLACK_BYTES


# ------------------------------------------------------------------------------------------------
# Integrity: another base model, corrupt safetensors


@pytest.fixture(scope="module")
def other_base(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny model with one weight changed: same shapes, another identity."""
    folder = tmp_path_factory.mktemp("other-base")
    for f in tiny_model_dir.iterdir():
        shutil.copy2(f, folder / f.name)
    weights = load_file(folder / "model.safetensors")
    name = next(k for k in weights if k.endswith("q_proj.weight"))
    weights[name] = weights[name] + 1
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_an_adapter_on_another_base_is_refused_everywhere(tiny_model_dir, fresh_adapter, other_base, tmp_path, capsys):
    params = merge_params(tiny_model_dir)
    with pytest.raises(finetuned.AdapterError, match=r"was trained on base weights sha256 [0-9a-f]{16}\.\.\. .*but "
                                                     r".*other-base\d* has [0-9a-f]{16}"):
        merging.merge(params, fresh_adapter, tmp_path / "merged", PROMPTS, metrics_file=None, model_dir=other_base)
    with pytest.raises(finetuned.AdapterError, match=r"training_info.json: field 'base_model.weights_sha256': the "
                                                     r"adapter was trained on base weights sha256"):
        finetuned.load_adapter_model(fresh_adapter, other_base, torch.device("cpu"), torch.float32)
    table = tmp_path / "t.json"
    table.write_text(json.dumps({"rows": [["a"]], "highlight": [[0, 0]]}), encoding="utf-8")
    code = infer.cli([str(table), "--adapter", str(fresh_adapter), "--base", str(other_base), "--device", "cpu",
                      "--params", str(REPO / "params.yaml")])
    err = capsys.readouterr().err
    assert code == 2 and "field 'base_model.weights_sha256': the adapter was trained on base weights sha256" in err, err


def corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        data = data[: len(data) - 100]
    elif how == "header length":
        data = bytes([data[0] ^ 0x40]) + data[1:]
    elif how == "header bytes":
        data = data[:9] + bytes(b ^ 0xFF for b in data[9:13]) + data[13:]
    elif how == "empty":
        data = b""
    path.write_bytes(data)


CORRUPTIONS = ["truncated", "header length", "header bytes", "empty"]


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_a_corrupt_base_model_file_is_named(tiny_model_dir, tmp_path, how):
    folder = tmp_path / "base"
    shutil.copytree(tiny_model_dir, folder)
    corrupt(folder / "model.safetensors", how)
    pattern = rf"{re.escape((folder / 'model.safetensors').as_posix())}: corrupt safetensors file \(.+\); fetch it again"
    with pytest.raises(model_sources.WeightsError, match=pattern):
        model_sources.load_model(folder, device=torch.device("cpu"))
    with pytest.raises(model_sources.WeightsError, match=pattern):  # identity hash (train, merge, evaluate)
        model_sources.weights_sha256(folder)


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_a_corrupt_adapter_file_is_named(tiny_model_dir, fresh_adapter, tmp_path, capsys, how):
    adapter = tmp_path / "adapter"
    shutil.copytree(fresh_adapter, adapter)
    corrupt(adapter / "adapter_model.safetensors", how)
    pattern = rf"{re.escape((adapter / 'adapter_model.safetensors').as_posix())}: corrupt safetensors file"
    with pytest.raises(model_sources.WeightsError, match=pattern):
        merging.merge(merge_params(tiny_model_dir), adapter, tmp_path / "merged", PROMPTS, metrics_file=None)
    with pytest.raises(model_sources.WeightsError, match=pattern):
        finetuned.load_adapter_model(adapter, tiny_model_dir, torch.device("cpu"), torch.float32)
    table = tmp_path / "t.json"
    table.write_text(json.dumps({"rows": [["a"]], "highlight": [[0, 0]]}), encoding="utf-8")
    code = infer.cli([str(table), "--adapter", str(adapter), "--device", "cpu", "--params", str(REPO / "params.yaml")])
    err = capsys.readouterr().err
    assert code == 2 and re.search(pattern, err) and "Traceback" not in err, err


# ------------------------------------------------------------------------------------------------
# Security: no remote code, safetensors only


def test_no_remote_code_anywhere_in_the_repository():
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True, encoding="utf-8").stdout.split()
    pattern = re.compile(r"trust_remote_code\s*=\s*True|trust_remote_code\s*:\s*true", re.IGNORECASE)
    hits = [f for f in files if (REPO / f).is_file() and pattern.search((REPO / f).read_text(errors="replace", encoding="utf-8"))]
    assert not hits, hits


class Pickled:
    """A pickle that, when loaded, creates a file: proof that a loader unpickled it."""

    def __init__(self, proof: Path):
        self.proof = proof

    def __reduce__(self):
        return (Path.touch, (self.proof,))


def test_pickle_weights_are_never_loaded(tiny_model_dir, fresh_adapter, tmp_path):
    proof = tmp_path / "unpickled"
    model = tmp_path / "model"
    model.mkdir()
    shutil.copy2(tiny_model_dir / "config.json", model / "config.json")
    torch.save(Pickled(proof), model / "pytorch_model.bin")
    with pytest.raises(model_sources.WeightsError, match=r"model: no \*.safetensors weights \(found pytorch_model.bin: "
                                                          r"pickle formats are never loaded\)"):
        model_sources.load_model(model, device=torch.device("cpu"))

    adapter = tmp_path / "adapter"
    shutil.copytree(fresh_adapter, adapter)
    (adapter / "adapter_model.safetensors").unlink()
    torch.save(Pickled(proof), adapter / "adapter_model.bin")
    message = r"adapter: no adapter_model.safetensors weights \(found adapter_model.bin"
    with pytest.raises(model_sources.WeightsError, match=message):
        finetuned.load_adapter_model(adapter, tiny_model_dir, torch.device("cpu"), torch.float32)
    with pytest.raises(model_sources.WeightsError, match=message):
        merging.merge(merge_params(tiny_model_dir), adapter, tmp_path / "merged", PROMPTS, metrics_file=None)
    assert not proof.exists()


def test_loaders_ask_for_safetensors_and_no_remote_code(tiny_model_dir, monkeypatch, tmp_path):
    import huggingface_hub
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("TOTTO_GEMMA_CACHE", str(tmp_path))  # an empty tokenizer cache: the tokenizer is built
    calls = {}

    def record(name):
        def fake(*args, **kwargs):
            calls[name] = kwargs
            raise RuntimeError("stop here")
        return fake

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", record("model"))
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", record("tokenizer"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", record("hub"))
    for call in (lambda: model_sources.load_model(tiny_model_dir, device=torch.device("cpu")),
                 lambda: model_sources.load_tokenizer(tiny_model_dir),
                 lambda: model_sources.resolve_model("some-org/some-model")):
        with pytest.raises(RuntimeError, match="stop here"):
            call()
    assert calls["model"]["use_safetensors"] is True and calls["model"]["trust_remote_code"] is False
    assert calls["tokenizer"]["trust_remote_code"] is False
    fetched = calls["hub"]["allow_patterns"]
    assert "*.safetensors" in fetched and not [p for p in fetched if re.search(r"bin|pt|pth|ckpt|pkl|\*$", p)]


def test_checkpoints_are_read_without_unpickling_code():
    """torch.load runs pickled code unless weights_only=True: every call in stages/ and table2text/ must say so."""
    loads = []
    for path in CODE:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                weights_only = [k for k in node.keywords if k.arg == "weights_only"]
                loads.append((path.name, node.lineno, bool(weights_only) and weights_only[0].value.value is True))
    assert loads and all(ok for *_, ok in loads), loads
