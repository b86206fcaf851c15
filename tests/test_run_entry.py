"""run.py's command dispatch: infer, score and pull run the project's modules with .venv's python, like
repro runs dvc, so the README's `python3 run.py infer ...` works without activating .venv."""

from __future__ import annotations

import importlib.util
import sys
import subprocess
from pathlib import Path

import pytest

from stages.pull import wanted

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def run_py(monkeypatch):
    spec = importlib.util.spec_from_file_location("run_entry", REPO / "run.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # run.py defines dataclasses, which look their module up there
    spec.loader.exec_module(module)
    calls = []
    monkeypatch.setattr(module, "ensure_venv", lambda: calls.append("ensure_venv"))
    monkeypatch.setattr(module.subprocess, "run",
                        lambda cmd, **kw: calls.append((cmd, kw)) or subprocess.CompletedProcess(cmd, 0))
    return module, calls


@pytest.mark.parametrize("command, target", [("infer", "stages.infer"), ("score", "stages.score"),
                                             ("pull", "stages.pull")])
def test_module_commands_run_inside_the_venv(run_py, command, target):
    module, calls = run_py
    assert module.main([command, "-", "--model", "models/merged"]) == 0
    assert calls[0] == "ensure_venv"  # the environment is created first, as for repro
    cmd, kwargs = calls[1]
    assert cmd == [str(module.PYTHON), "-m", target, "-", "--model", "models/merged"]
    assert kwargs["cwd"] == module.ROOT and kwargs["env"]["PATH"].startswith(str(module.BIN))


def test_an_unknown_command_prints_the_usage_with_the_new_commands(run_py, capsys):
    module, calls = run_py
    assert module.main(["nonsense"]) == 2 and calls == []
    usage = capsys.readouterr().err
    assert "run.py infer" in usage and "run.py pull" in usage and "run.py score" in usage


@pytest.mark.parametrize("path, targets, expected", [
    ("models/adapter", [], True),                   # no targets: every output
    ("models/adapter", ["models/adapter"], True),
    ("models/adapter", ["models/adapter/"], True),
    ("models/merged", ["models/adapter"], False),
    ("models/adapter", ["models"], True),           # a folder above the output
    ("data/processed/train.jsonl", ["models/adapter"], False),
    ("models/adapter", ["models/adapter/adapter_model.safetensors"], True),  # a file inside it
])
def test_pull_targets_select_outputs_by_path(path, targets, expected):
    assert wanted(path, targets) is expected
