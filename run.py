#!/usr/bin/env python3
"""Set-up and entry points, standard library only, so they work on a fresh machine (Linux, macOS, Windows).

    python3 run.py repro [dvc repro args]   run the pipeline (`dvc repro`) on the committed params
    python3 run.py test [pytest args]       run the test suite
    python3 run.py dvc ARGS...              any other dvc command inside the project's environment
    python3 run.py pull [TARGET ...]        dvc pull, with one clear message when the remote lacks the outputs
    python3 run.py infer ARGS...            python -m stages.infer (write a sentence for a table)
    python3 run.py score ARGS...            python -m stages.score (score a predictions file)

Each creates the virtual environment .venv from requirements.txt on first use and reuses it afterwards;
it re-installs only when requirements.txt changes.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / ("python.exe" if os.name == "nt" else "python")
STAMP = VENV / ".requirements.sha256"


def ensure_venv() -> None:
    wanted = hashlib.sha256((ROOT / "requirements.txt").read_bytes()).hexdigest()
    if PYTHON.exists() and STAMP.exists() and STAMP.read_text().strip() == wanted:
        return
    if not PYTHON.exists():
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    print("installing requirements.txt (first run only)", flush=True)
    subprocess.run([str(PYTHON), "-m", "pip", "install", "-q", "-r", str(ROOT / "requirements.txt")], check=True)
    STAMP.write_text(wanted)


def main(argv: list[str]) -> int:
    # command -> what it runs inside .venv (the stages' modules import torch, dvc... from there)
    modules = {"pull": "stages.pull", "infer": "stages.infer", "score": "stages.score"}
    if not argv or argv[0] not in {"repro", "test", "dvc", *modules}:
        print(__doc__, file=sys.stderr)
        return 2
    ensure_venv()
    env = dict(os.environ)
    # Stages run as `python -m stages.<name>`: the environment's python must come first on PATH.
    env["PATH"] = str(BIN) + os.pathsep + env.get("PATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    # DVC's state database inside the project. Given here as an absolute path: DVC 3.67 resolves a relative
    # core.site_cache_dir against the current directory, which breaks `dvc exp run --queue/--temp` (they run
    # in .dvc/tmp/exps/...) and makes dvc in a subfolder start an empty one there.
    env.setdefault("DVC_SITE_CACHE_DIR", str(ROOT / ".dvc" / "site-cache"))
    command, rest = argv[0], argv[1:]
    if command == "repro":
        cmd = [str(PYTHON), "-m", "dvc", "repro", *rest]
    elif command == "dvc":
        cmd = [str(PYTHON), "-m", "dvc", *rest]
    elif command in modules:
        cmd = [str(PYTHON), "-m", modules[command], *rest]
    else:
        cmd = [str(PYTHON), "-m", "pytest", "-q", *(rest or ["tests"])]
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
