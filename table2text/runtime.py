"""How a stage ran, as opposed to what it computed: wall times, throughput, peak memory, the device and
the kernels it used, whether it resumed. These vary from run to run and from host to host, so they stay
out of every DVC-tracked output and metric (a fresh `dvc repro` of the same params must leave `git status`
clean and `dvc metrics diff` must show scores, not timings). Each stage prints them and writes them to
metrics/runtime/<stage>.json: git-ignored, not declared in dvc.yaml, overwritten by every run; the
benches (bench/run_recipe.py, bench/multi_gpu_bench.py) read them from there.
"""

from __future__ import annotations

import json
from pathlib import Path

from table2text.io.atomic import write_json

RUNTIME_DIR = Path("metrics/runtime")


def runtime_file(stage: str, folder: Path | None = None) -> Path:
    return Path(folder if folder is not None else RUNTIME_DIR) / f"{stage}.json"


def write_runtime(stage: str, record: dict, folder: Path | None = None) -> Path:
    """metrics/runtime/<stage>.json (or folder/<stage>.json), written atomically; returns its path."""
    path = runtime_file(stage, folder)
    write_json(path, record, sort_keys=True)
    return path


def read_runtime(stage: str, folder: Path | None = None) -> dict:
    """The last run's record of `stage`, {} when that stage has not run here (e.g. outputs pulled)."""
    path = runtime_file(stage, folder)
    if not path.is_file():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))
