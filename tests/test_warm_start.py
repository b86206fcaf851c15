"""Warm start: a stage handed to the helper behaves as the same stage in its own process."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from table2text import warm_start

REPO = Path(__file__).resolve().parents[1]
posix_only = pytest.mark.posix_only("fork, Unix sockets and signals")


def test_only_the_dvc_stages_run_as_modules_are_handed_off():
    assert warm_start.stage_module(["python", "-m", "stages.train", "--params", "p.yaml"]) == "stages.train"
    assert warm_start.stage_module(["python", "-X", "utf8", "-m", "stages.evaluate"]) == "stages.evaluate"
    assert warm_start.stage_module(["python", "-m", "stages.infer"]) is None  # a user CLI: runs as before
    assert warm_start.stage_module(["python", "stages/train.py"]) is None
    assert warm_start.stage_module(["python", "-m", "pytest"]) is None


def test_the_helper_key_follows_the_variables_libraries_read_at_import(monkeypatch):
    before = warm_start.key()
    monkeypatch.setenv("UNRELATED_TO_IMPORTS", "1")
    assert warm_start.key() == before
    monkeypatch.setenv("HF_HUB_OFFLINE", "0" if os.environ.get("HF_HUB_OFFLINE") == "1" else "1")
    assert warm_start.key() != before


def test_it_is_off_when_asked(monkeypatch):
    monkeypatch.setenv("TOTTO_WARM_START", "0")
    assert not warm_start.enabled()


@posix_only
def test_a_socket_folder_others_can_enter_is_refused(monkeypatch):
    base = Path(tempfile.mkdtemp(prefix="tw", dir="/tmp"))
    try:
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(base))
        folder = warm_start.private_dir()
        assert folder.stat().st_mode & 0o777 == 0o700
        folder.chmod(0o755)
        with pytest.raises(PermissionError, match="not a private folder"):
            warm_start.private_dir()
    finally:
        shutil.rmtree(base)


# ----------------------------------------------------------------------------------------- end to end
@pytest.fixture
def project():
    """A copy of the project's code and params in a short folder, with its own helper folder (a Unix
    socket's path must stay under ~100 bytes), and the helper stopped afterwards."""
    base = Path(tempfile.mkdtemp(prefix="tw", dir="/tmp"))
    root = base / "p"
    for folder in ("stages", "table2text", "data/demo"):
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(REPO / "params.yaml", root / "params.yaml")
    env = {**os.environ, "XDG_RUNTIME_DIR": str(base), "TOTTO_WARM_START": "1", "TOTTO_WARM_START_IDLE": "60"}
    env.pop("TOTTO_WARM_CHILD", None)
    yield root, env
    for sock in (base / f"totto-warm-{os.getuid()}").glob("*.sock"):
        sock.unlink()  # a helper whose socket is gone exits at its next check
    time.sleep(0.1)
    shutil.rmtree(base, ignore_errors=True)


def stage(root: Path, env: dict, name: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"stages.{name}", *args], cwd=root, env=env, text=True,
                          capture_output=True, encoding="utf-8", timeout=600, **kwargs)


def helper_log(env: dict) -> str:
    logs = list((Path(env["XDG_RUNTIME_DIR"]) / f"totto-warm-{os.getuid()}").glob("*.log"))
    return "".join(p.read_text(encoding="utf-8") for p in logs)


def wait_for_helper(env: dict, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while "ready:" not in helper_log(env):
        assert time.monotonic() < deadline, "the helper did not get ready"
        time.sleep(0.2)


@posix_only
def test_a_stage_run_by_the_helper_writes_what_its_own_process_writes(project):
    root, env = project
    first = stage(root, env, "preprocess")
    assert first.returncode == 0, first.stderr
    assert "warm start: helper pid" in first.stderr  # it says that it started one, and how to turn it off
    outputs = {p: p.read_bytes() for p in [*(root / "data/processed").glob("*.jsonl"), root / "metrics/preprocess.json"]}
    second = stage(root, env, "preprocess")  # at once: it waits for the helper that is still importing
    assert second.returncode == 0, second.stderr
    assert "stages.preprocess in" in helper_log(env)  # this time the helper ran it
    assert "warm start" not in second.stderr
    assert second.stdout == first.stdout
    assert {p: p.read_bytes() for p in outputs} == outputs
    # The stages named the tokenizer they load; the helper parses it once, and the next stage takes it.
    deadline = time.monotonic() + 30
    while "parsed for the next stages" not in helper_log(env):
        assert time.monotonic() < deadline, helper_log(env)
        time.sleep(0.2)
    third = stage(root, env, "preprocess")
    assert third.returncode == 0, third.stderr
    assert "tokenizer backend from the helper" in helper_log(env)
    assert third.stdout == first.stdout
    assert {p: p.read_bytes() for p in outputs} == outputs


@posix_only
def test_bad_settings_end_the_same_way_through_the_helper(project):
    root, env = project
    (root / "bad.yaml").write_text((root / "params.yaml").read_text(encoding="utf-8").replace(
        "learning_rate:", "learning_rate: -1 #", 1), encoding="utf-8")
    alone = stage(root, {**env, "TOTTO_WARM_START": "0"}, "train", "--params", "bad.yaml")
    stage(root, env, "preprocess")
    wait_for_helper(env)
    handed = stage(root, env, "train", "--params", "bad.yaml")
    assert "stages.train in" in helper_log(env)
    assert alone.returncode == handed.returncode == 2
    assert handed.stderr.strip().splitlines()[-1] == alone.stderr.strip().splitlines()[-1]
    assert "train.learning_rate" in handed.stderr


@posix_only
def test_a_signal_to_the_stage_reaches_the_stage_the_helper_runs(project):
    root, env = project
    stage(root, env, "preprocess")
    wait_for_helper(env)
    running = subprocess.Popen([sys.executable, "-m", "stages.train"], cwd=root, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, encoding="utf-8")
    deadline = time.monotonic() + 60
    while "stages.train in" not in helper_log(env):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    child = int(helper_log(env).rsplit("child pid ", 1)[1].split()[0])
    running.send_signal(signal.SIGTERM)
    _, err = running.communicate(timeout=60)
    assert running.returncode == 128 + signal.SIGTERM, err  # as a shell reports a stage killed by SIGTERM
    deadline = time.monotonic() + 10
    while f"child pid {child} exit status" not in helper_log(env):
        assert time.monotonic() < deadline, helper_log(env)
        time.sleep(0.1)
    assert f"child pid {child} exit status -{int(signal.SIGTERM)}" in helper_log(env)


@posix_only
def test_training_in_the_helper_gives_the_adapter_training_alone_gives(project):
    root, env = project
    assert stage(root, env, "preprocess").returncode == 0
    alone = stage(root, {**env, "TOTTO_WARM_START": "0"}, "train")
    assert alone.returncode == 0, alone.stderr
    trained = {p: p.read_bytes() for p in [*(root / "models/adapter").rglob("*"), root / "metrics/train.json"]
               if p.is_file()}
    handed = stage(root, env, "train")
    assert handed.returncode == 0, handed.stderr
    assert "stages.train in" in helper_log(env)
    assert {p: p.read_bytes() for p in trained} == trained
