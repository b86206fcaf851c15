"""Run rows of the results table (bench/rows.yaml), one row per GPU at a time, each in its own copy of
the project so that rows on different GPUs never share data/, models/ or metrics/.

    python -m bench.run_rows --fetaqa DIR --totto DIR --out OUT [--only NAME ...] [--deadline SECONDS]

A row is two bench/run_recipe.py calls: the whole pipeline on FeTaQA (train 2,004 -> validation 500),
then preprocess + evaluate of the same model on the 55 ToTTo dev examples. Per row, OUT/rows/NAME/ gets
both results JSONs with their params, the training loss history (loss.csv, from the final checkpoint),
the per-bucket validation plots and the FeTaQA predictions (predictions.jsonl.gz: it holds the prompts,
so it stays out of git). --deadline stops starting new rows after that many seconds, so that a GPU call
ends inside its time limit; rows not started are listed as such.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from bench import common

ROOT = Path(__file__).resolve().parents[1]
ROWS_FILE = ROOT / "bench" / "rows.yaml"
# Every row: evaluate the 500 validation examples in batches of up to 500, merge on the GPU, checkpoint
# only at the end (the history is read from it), no base model (the zero-shot rows are measured once).
# The token budget holds a generation batch to 131,072 cache slots (FeTaQA validation: 2 batches; fp32 peak
# 12.3 GiB instead of 30.3 on an H200, bench/generate_bench), so that rows can evaluate side by side on a GPU.
COMMON = ["eval.batch_size=500", "eval.batch_tokens=131072", "eval.compare_base=false", "merge.device=cuda",
          "train.save_steps=100000"]


def load_rows(path: Path = ROWS_FILE) -> list[dict]:
    rows = yaml.safe_load(path.read_text(encoding="utf-8"))["rows"]
    names = [r["name"] for r in rows]
    if len(set(names)) != len(names):
        raise SystemExit(f"{path}: duplicate row names")
    return rows


def recipe_cmd(name: str, overrides: list[str], out: Path, stages: list[str] | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "bench.run_recipe", "--name", name, "--out", str(out)]
    if stages:
        cmd += ["--stages", *stages]
    for assignment in overrides:
        cmd += ["--set", assignment]
    return cmd


def copy_project(workdir: Path) -> None:
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    for item in ("stages", "table2text", "bench", "params.yaml"):
        src = ROOT / item
        if src.is_dir():
            shutil.copytree(src, workdir / item, ignore=shutil.ignore_patterns("__pycache__", "results"))
        else:
            shutil.copy2(src, workdir / item)


def write_history(workdir: Path, dest: Path) -> None:
    """The logged rows of the run (step, loss, learning rate, speed) from its final checkpoint."""
    states = sorted((workdir / "checkpoints").glob("step-*/state.json"))
    if not states:
        return
    history = json.loads(states[-1].read_text(encoding="utf-8")).get("history", [])
    if history:
        keys = list(history[0])
        with open(dest / "loss.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(history)


def row_commands(row: dict, fetaqa: Path, totto: Path, results: Path) -> list[list[str]]:
    """A row's runs: all four stages on FeTaQA, then preprocess + evaluate of the same model on ToTTo dev55
    (unless the row says `totto: false`: a task ToTTo has no input for, as its examples hold no question)."""
    name, overrides = row["name"], list(row.get("overrides", []))
    cmds = [recipe_cmd(name, ["data.source=fetaqa", f"data.path={fetaqa}", *COMMON, *overrides], results)]
    if row.get("totto", True):
        cmds.append(recipe_cmd(f"{name}-totto-dev55", ["data.source=totto", f"data.path={totto}", *COMMON,
                                                       *overrides], results, ["preprocess", "evaluate"]))
    return cmds


def run_row(row: dict, gpu: int, args) -> dict:
    name = row["name"]
    workdir = args.workroot / name
    dest = args.out / "rows" / name
    dest.mkdir(parents=True, exist_ok=True)
    copy_project(workdir)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu), "PYTHONUNBUFFERED": "1"}
    results = workdir / "results"
    start = time.perf_counter()
    with open(dest / "log.txt", "w", encoding="utf-8") as log:
        for cmd in row_commands(row, args.fetaqa, args.totto, results):
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            done = subprocess.run(cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
            if done.returncode != 0:
                log.flush()
                tail = (dest / "log.txt").read_text(encoding="utf-8", errors="replace").splitlines()[-25:]
                print(f"[gpu {gpu}] {name} failed; the end of its log:\n" + "\n".join(tail), flush=True)
                return {"name": name, "gpu": gpu, "error": f"exit {done.returncode}: see rows/{name}/log.txt"}
            if "totto" not in cmd[cmd.index("--name") + 1]:  # the FeTaQA run: keep its predictions and plots
                with open(workdir / "metrics" / "predictions.jsonl", "rb") as src, \
                        gzip.open(dest / "predictions.jsonl.gz", "wb") as dst:
                    shutil.copyfileobj(src, dst)
                for plot in (workdir / "metrics" / "plots").glob("*.csv"):
                    shutil.copy2(plot, dest / f"fetaqa-{plot.name}")
                write_history(workdir, dest)
    for f in results.glob("*"):
        if f.suffix in {".json", ".yaml"}:
            shutil.copy2(f, dest / f.name)
    return {"name": name, "gpu": gpu, "seconds": time.perf_counter() - start}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fetaqa", type=Path, required=True, help="folder with FeTaQA train/validation .jsonl.gz")
    parser.add_argument("--totto", type=Path, required=True, help="folder with ToTTo train/dev .jsonl.gz")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", nargs="+", help="row names, in the order to start them (default: all)")
    parser.add_argument("--gpus", type=int, nargs="+",
                        help="GPU ids to use, one row at a time on each; repeat an id to run rows side by side on "
                             "that GPU (default: all visible, once)")
    parser.add_argument("--deadline", type=float, default=0, help="start no row after this many seconds")
    parser.add_argument("--workroot", type=Path, default=Path("/tmp/totto-rows"))
    args = parser.parse_args(argv)
    args.fetaqa, args.totto, args.out = args.fetaqa.resolve(), args.totto.resolve(), args.out.resolve()

    rows = {r["name"]: r for r in load_rows()}
    wanted = args.only or list(rows)
    unknown = [n for n in wanted if n not in rows]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; bench/rows.yaml has {list(rows)}")
    gpus = args.gpus or list(range(torch.cuda.device_count()))
    if not gpus:
        raise SystemExit("no CUDA device: the rows are GPU runs")

    t0 = time.perf_counter()

    def work(row: dict, gpu: int) -> dict:
        print(f"[gpu {gpu}] {row['name']} ...", flush=True)
        outcome = run_row(row, gpu, args)
        print(f"[gpu {gpu}] {outcome}", flush=True)
        return outcome

    outcomes = common.run_queue([rows[n] for n in wanted], gpus, work,
                                too_late=lambda: bool(args.deadline) and time.perf_counter() - t0 > args.deadline,
                                skipped=lambda row: {"name": row["name"], "not_started": True})
    (args.out / "rows").mkdir(parents=True, exist_ok=True)
    (args.out / "rows" / f"outcomes-{int(time.time())}.json").write_text(json.dumps(outcomes, indent=2), encoding="utf-8")
    print(json.dumps(outcomes, indent=2))
    return 1 if any("error" in o for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
