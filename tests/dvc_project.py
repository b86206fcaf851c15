"""A throwaway copy of this project, as its own git + DVC repository, that a whole `dvc repro` runs in seconds.

    root, env = make_tiny_project(tmp_path, tiny_model_dir, {"train.max_steps": 4})
    dvc(root, env, "repro")

The copy holds the real stages/, dvc.yaml, params.yaml, .dvc/config and data/demo, so tests exercise the
pipeline users run; only params differ (TINY below): the tiny random Gemma 3 of tests/conftest.py as
model.name and a few steps and examples everywhere. DVC runs as `python -m dvc` of this interpreter with
this interpreter's folder first on PATH (the stages' `python`), in a private HOME with analytics off and
DVC's state database in the project's .dvc/site-cache (as run.py sets it); the default remote is a folder
next to the project. The initial state is committed, so tests can diff commits.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
COPIED = ("stages", "table2text", "dvc.yaml", "params.yaml", "data/demo", ".gitignore", ".dvcignore")
# over those `dvc init` writes: analytics off, default remote, the offline plots page and its bar template
DVC_FILES = (".dvc/config", ".dvc/.gitignore", ".dvc/plots/offline.html", ".dvc/plots/bar_buckets.json")
GIT_NAME, GIT_EMAIL = "DVC test", "dvc-test@example.invalid"

# Settings under which preprocess -> train -> merge -> evaluate (-> export, disabled) of the tiny model takes seconds on 2 CPU cores.
TINY = {
    "data.train_samples": 8,
    "data.max_length": 256,
    "train.quantization": "none",   # NF4 needs bitsandbytes kernels; plain LoRA is what the CPU runs fast
    "train.effective_batch": 4,
    "train.max_steps": 2,
    "train.learning_rate": 1.0e-2,  # large, and no warm-up, so that two steps change what the model writes
    "train.warmup_ratio": 0.0,
    "train.save_steps": 1,
    "train.logging_steps": 1,
    "train.device": "cpu",
    "merge.device": "cpu",
    "merge.verify_prompts": 2,
    "eval.max_examples": 4,
    "eval.max_new_tokens": 8,
    "eval.batch_size": 4,
    "eval.device": "cpu",
    # The tiny model (head_dim 32, query scale 1/sqrt(256), 2 layers) is not one llama.cpp's gemma3 graph
    # computes, so the export stage refuses it; disabled, it still runs and writes its note and metrics.
    "export.enabled": False,
}


def private_env(home: Path, site_cache: Path | None = None) -> dict:
    """This process's environment without the user's DVC/git/ssh config; `python` is this interpreter.

    site_cache: DVC's state database folder, as run.py sets it (None: DVC's default)."""
    private = {"SSH_AUTH_SOCK", "XDG_CONFIG_HOME", "DVC_GLOBAL_CONFIG_DIR", "DVC_SITE_CACHE_DIR", "GIT_DIR",
               "GIT_WORK_TREE", "TOTTO_PARAMS"}
    env = {k: v for k, v in os.environ.items() if k not in private}
    env["HOME"] = str(home)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["DVC_NO_ANALYTICS"] = "1"  # also for `dvc init`, which runs before .dvc/config exists
    env["HF_HUB_OFFLINE"] = "1"    # model.name is a local folder: nothing may be fetched
    if site_cache is not None:
        env["DVC_SITE_CACHE_DIR"] = str(site_cache)
    for role in ("AUTHOR", "COMMITTER"):  # git commits here and those `dvc exp` makes
        env[f"GIT_{role}_NAME"], env[f"GIT_{role}_EMAIL"] = GIT_NAME, GIT_EMAIL
    return env


def dvc(cwd: Path, env: dict, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """`dvc ARGS` in cwd; raises with dvc's output when it fails (unless check=False)."""
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=timeout, stdin=subprocess.DEVNULL, encoding="utf-8")
    if check and result.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def git(cwd: Path, env: dict, *args: str) -> str:
    """`git ARGS` in cwd with the test identity; returns stdout, raises with stderr when it fails."""
    result = subprocess.run(["git", "-c", f"user.name={GIT_NAME}", "-c", f"user.email={GIT_EMAIL}", *args],
                            cwd=cwd, env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, encoding="utf-8")
    if result.returncode != 0:
        raise AssertionError(f"git {' '.join(args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result.stdout


def set_params(root: Path, overrides: dict) -> dict:
    """Apply dotted-key overrides ({"train.max_steps": 4}) to root/params.yaml; returns the new params.

    A key that params.yaml does not have is an error (a typo must not silently add a new knob)."""
    path = root / "params.yaml"
    params = yaml.safe_load(path.read_text(encoding="utf-8"))
    for dotted, value in overrides.items():
        *groups, key = dotted.split(".")
        node = params
        for group in groups:
            node = node.get(group) if isinstance(node, dict) else None
        if not isinstance(node, dict) or key not in node:
            raise KeyError(f"{path}: no param {dotted!r}")
        node[key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    return params


def make_tiny_project(root: Path, model_dir: Path, overrides: dict | None = None) -> tuple[Path, dict]:
    """Create root/project (git + DVC, committed), root/home and root/remote; returns (project, env).

    params.yaml is the project's with model.name = model_dir, TINY, then `overrides` (dotted keys)."""
    root = Path(root)
    project, home, remote = root / "project", root / "home", root / "remote"
    for folder in (project, home, remote):
        folder.mkdir(parents=True)
    env = private_env(home, site_cache=project / ".dvc" / "site-cache")  # as run.py does
    for name in COPIED:
        source, target = REPO / name, project / name
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    set_params(project, {"model.name": str(Path(model_dir).resolve()), **TINY, **(overrides or {})})

    git(project, env, "init", "-q", "-b", "main")
    # The local identity also serves the commits `dvc exp` makes through its own git library.
    git(project, env, "config", "user.name", GIT_NAME)
    git(project, env, "config", "user.email", GIT_EMAIL)
    dvc(project, env, "init", "-q")
    for name in DVC_FILES:
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, project / name)
    default_remote = dvc(project, env, "config", "core.remote").stdout.strip()
    dvc(project, env, "remote", "modify", default_remote, "url", str(remote))  # absolute: `dvc exp` runs elsewhere too
    git(project, env, "add", "-A")
    git(project, env, "commit", "-q", "-m", "tiny project")
    return project, env
