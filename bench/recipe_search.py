"""The recipe search of issue 20: choose on a held-out split of the FeTaQA training examples, then train
the chosen few on all of them and score them on the 500 validation examples.

    python -m bench.recipe_search --fetaqa DIR [--grid bench/recipe_grid.yaml] [--slots N] [--out DIR]
                                  [--deadline S] [--hard-deadline S] [--set KEY=VALUE ...] [--only NAME ...]
                                  [--dry-run]

Every run is bench/run_recipe.py (`python -m stages.<stage> --params ...`, what dvc.yaml runs) in its own
copy of the project (bench/run_rows.copy_project), on top of params.yaml, bench/run_rows.py's COMMON, the
grid's `common` and the config's overrides; --set applies last, to every run (e.g. a tiny model on CPU).

1. Selection (guard against tuning on validation): DIR's train.jsonl.gz is split, by a seeded draw, into
   `holdout` held-out examples and the rest; each config trains on the rest and its trained model is
   scored on the held-out examples with every decoding of the grid (greedy, beam search). The validation
   file is not read in this phase.
2. Finals: per task (data.include_question true / false), the best `finals_per_task` candidates (config
   + decoding) by held-out PARENT F, BLEU as tie-break, run all four stages on all of DIR's training
   examples and are scored on its validation file with their decoding. Paired bootstrap (2,000 resamples
   of the 500 examples, bench/significance.py) of PARENT F and BLEU against the best final of the same
   task and against the published T5-large predictions (bench/results/peers/t5-large.json).

Several runs share one GPU side by side (--slots; --gpus to spread them over GPUs). --deadline: no final
starts after that many seconds; --hard-deadline: every command still running then is stopped, so that the
results JSON is written inside the call's limit. Writes OUT/<date>-<gpu>-recipe-search.json after each
phase and prints the markdown tables. Predictions, logs and data copies stay in --workroot (they hold the
data's text). --dry-run prints the plan (splits, runs and their commands) and runs nothing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from bench import common
from bench.run_recipe import apply_override
from bench.run_rows import COMMON, copy_project, recipe_cmd, write_history
from bench.significance import paired_bootstrap, per_example_of_predictions
from table2text.io import readers
from table2text.config import Config
from table2text.params import load_params

ROOT = Path(__file__).resolve().parents[1]
GRID = ROOT / "bench" / "recipe_grid.yaml"
OUT = ROOT / "bench" / "results" / "recipe-search"
PEER = ROOT / "bench" / "results" / "peers" / "t5-large.json"
SCORES = ("count", "bleu", "parent_precision", "parent_recall", "parent_f")


# ----------------------------------------------------------------------------------------------- plan
def load_grid(path: Path) -> dict:
    grid = yaml.safe_load(path.read_text(encoding="utf-8"))
    for key in ("holdout", "holdout_seed", "finals_per_task", "configs", "decodings"):
        if key not in grid:
            raise SystemExit(f"{path}: missing {key!r}")
    names = [c["name"] for c in grid["configs"]] + [d["name"] for d in grid["decodings"]]
    if len(set(names)) != len(names):
        raise SystemExit(f"{path}: config and decoding names must be unique, got {names}")
    grid.setdefault("common", [])
    grid.setdefault("selection_common", [])
    return grid


def checked_params(overrides: list[str], where: str) -> dict:
    """params.yaml with `overrides`, validated by table2text.config (one line naming the key) before any run."""
    params = load_params()
    for assignment in overrides:
        apply_override(params, assignment)
    try:
        Config.from_dict(params)
    except Exception as err:  # table2text.config.ConfigError: say which run it belongs to
        raise SystemExit(f"{where}: {err}") from None
    return params


def task_of(params: dict) -> str:
    return "question" if params["data"]["include_question"] else "no_question"


def selection_runs(grid: dict, data_dir: Path, extra: list[str]) -> list[dict]:
    runs = []
    for config in grid["configs"]:
        base = ["data.source=fetaqa", f"data.path={data_dir}", *COMMON, *grid["common"], *grid["selection_common"],
                *config["overrides"]]
        decodings = []
        for decoding in grid["decodings"]:
            overrides = [*base, *decoding["overrides"], *extra]
            params = checked_params(overrides, f"config {config['name']}, decoding {decoding['name']}")
            decodings.append({"name": decoding["name"], "overrides": overrides, "task": task_of(params)})
        runs.append({"name": config["name"], "desc": config.get("desc", ""), "config_overrides": config["overrides"],
                     "decodings": decodings})
    return runs


def final_runs(grid: dict, chosen: list[dict], data_dir: Path, extra: list[str]) -> list[dict]:
    decodings = {d["name"]: d for d in grid["decodings"]}
    configs = {c["name"]: c for c in grid["configs"]}
    runs = []
    for pick in chosen:
        overrides = ["data.source=fetaqa", f"data.path={data_dir}", *COMMON, *grid["common"],
                     *configs[pick["config"]]["overrides"], *decodings[pick["decoding"]]["overrides"], *extra]
        params = checked_params(overrides, f"final {pick['config']}+{pick['decoding']}")
        runs.append({"name": f"{pick['config']}+{pick['decoding']}", "config": pick["config"],
                     "decoding": pick["decoding"], "task": task_of(params), "overrides": overrides})
    return runs


def split_training(train_file: Path, dest: Path, holdout: int, seed: int) -> dict:
    """dest/train.jsonl.gz (the training examples less `holdout`) and dest/validation.jsonl.gz (the held-out
    ones), copied line by line from `train_file`; the draw is seeded, the order kept."""
    lines = [bytes(raw) for _, raw in readers.iter_lines(train_file, "FeTaQA train file") if raw.strip()]
    if not 0 < holdout < len(lines):
        raise SystemExit(f"holdout {holdout}: must be between 1 and {len(lines) - 1} ({train_file} has {len(lines)})")
    held = set(random.Random(seed).sample(range(len(lines)), holdout))
    dest.mkdir(parents=True, exist_ok=True)
    for name, keep in (("train.jsonl.gz", lambda i: i not in held), ("validation.jsonl.gz", lambda i: i in held)):
        # mtime 0: the same draw gives the same bytes (a DVC dependency's hash, its run cache)
        with gzip.GzipFile(dest / name, "wb", mtime=0) as fh:
            fh.writelines(line + b"\n" for i, line in enumerate(lines) if keep(i))
    return {"train": len(lines) - holdout, "held_out": holdout, "seed": seed, "of": len(lines),
            "held_out_lines": sorted(i + 1 for i in held)}


# ------------------------------------------------------------------------------------------ running
class Runner:
    """Runs jobs on a pool of slots (GPU ids, repeated to share a GPU); every command gets the time left
    before the hard deadline."""

    def __init__(self, slots: list[str], workroot: Path, hard_deadline: float, t0: float):
        self.slots, self.workroot, self.hard_deadline, self.t0 = slots, workroot, hard_deadline, t0

    def command(self, cmd: list[str], workdir: Path, slot: str, log) -> int | str:
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": slot, "PYTHONUNBUFFERED": "1"}
        timeout = None
        if self.hard_deadline:
            timeout = self.hard_deadline - (time.perf_counter() - self.t0)
            if timeout <= 0:
                return "not started: hard deadline"
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        # its own process group, so that a stop also ends the stage process that run_recipe started
        group = ({"start_new_session": True} if os.name == "posix"
                 else {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP})
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, **group)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            if os.name == "posix":
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                subprocess.run(["taskkill", "/F", "/T", "/PID", str(proc.pid)], capture_output=True)
            proc.wait()
            return "stopped: hard deadline"

    def map(self, jobs: list, work, deadline: float = 0) -> list[dict]:
        def timed(job: dict, slot: str) -> dict:
            print(f"[slot {slot}] {job['name']} ...", flush=True)
            start = time.perf_counter()
            try:
                outcome = work(job, slot)
            except Exception as err:  # one broken run must not lose the others' results
                outcome = {"name": job["name"], "error": f"{type(err).__name__}: {err}"}
            outcome["wall_seconds"] = time.perf_counter() - start
            print(f"[slot {slot}] {job['name']}: "
                  + (outcome["error"] if "error" in outcome else f"done in {outcome['wall_seconds']:.0f} s"), flush=True)
            return outcome

        outcomes = common.run_queue(jobs, self.slots, timed,
                                    too_late=lambda: bool(deadline) and time.perf_counter() - self.t0 > deadline,
                                    skipped=lambda job: {"name": job["name"], "error": "not started: deadline"})
        order = {job["name"]: i for i, job in enumerate(jobs)}
        return sorted(outcomes, key=lambda o: order[o["name"]])


def log_tail(path: Path, lines: int = 25) -> str:
    return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


def stage_record(workdir: Path) -> dict:
    """What the run's train and evaluate stages wrote (their DVC metrics files)."""
    record = {}
    train = workdir / "metrics" / "train.json"
    if train.is_file():
        metrics = json.loads(train.read_text(encoding="utf-8"))
        record["train"] = {k: metrics.get(k) for k in ("steps", "samples", "tokens", "final_loss", "trainable_params")}
    return record


def eval_scores(workdir: Path) -> dict:
    return {k: json.loads((workdir / "metrics" / "eval.json").read_text(encoding="utf-8"))["finetuned"]["overall"][k]
            for k in SCORES}


def run_selection(job: dict, slot: str, runner: Runner) -> dict:
    workdir = runner.workroot / "selection" / job["name"]
    copy_project(workdir)
    results = workdir / "results"
    out = {"name": job["name"], "decodings": {}, "commands": []}
    with open(workdir / "log.txt", "w", encoding="utf-8") as log:
        for i, decoding in enumerate(job["decodings"]):
            # the first decoding runs preprocess + train + evaluate; the others evaluate the same model
            stages = ["preprocess", "train", "evaluate"] if i == 0 else ["evaluate"]
            cmd = recipe_cmd(f"{job['name']}-{decoding['name']}", decoding["overrides"], results, stages)
            out["commands"].append(" ".join(cmd[1:]))
            status = runner.command(cmd, workdir, slot, log)
            if status != 0:
                log.flush()
                out["decodings"][decoding["name"]] = {"error": f"exit {status}", "log_tail": log_tail(workdir / "log.txt")}
                if i == 0:
                    out["error"] = f"{decoding['name']}: exit {status}"
                    return out
                continue
            if i == 0:
                out.update(stage_record(workdir))
            out["decodings"][decoding["name"]] = {"task": decoding["task"], "held_out": eval_scores(workdir)}
    return out


def run_final(job: dict, slot: str, runner: Runner) -> dict:
    workdir = runner.workroot / "finals" / job["name"]
    copy_project(workdir)
    results = workdir / "results"
    cmd = recipe_cmd(job["name"], job["overrides"], results)
    out = {"name": job["name"], "config": job["config"], "decoding": job["decoding"], "task": job["task"],
           "command": " ".join(cmd[1:])}
    with open(workdir / "log.txt", "w", encoding="utf-8") as log:
        status = runner.command(cmd, workdir, slot, log)
    if status != 0:
        out.update(error=f"exit {status}", log_tail=log_tail(workdir / "log.txt"))
        return out
    out.update(stage_record(workdir))
    out["validation"] = eval_scores(workdir)
    merge = json.loads((workdir / "metrics" / "merge.json").read_text(encoding="utf-8"))
    out["merge"] = {k: merge.get(k) for k in ("base", "stored_dtype", "error_ratio", "passed") if k in merge}
    out["per_example"] = per_example_of_predictions((workdir / "metrics" / "predictions.jsonl").read_text(encoding="utf-8"))
    keep = runner.workroot / "predictions"
    keep.mkdir(parents=True, exist_ok=True)
    with open(workdir / "metrics" / "predictions.jsonl", "rb") as src, gzip.open(keep / f"{job['name']}.jsonl.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    write_history(workdir, keep.parent / "finals" / job["name"])
    return out


# --------------------------------------------------------------------------------------------- choice
def candidates(selection: list[dict]) -> list[dict]:
    """Every (config, decoding) scored on the held-out split."""
    out = []
    for run in selection:
        for name, scored in run.get("decodings", {}).items():
            if "held_out" in scored:
                out.append({"config": run["name"], "decoding": name, "task": scored["task"], **scored["held_out"]})
    return out


def rank_key(c: dict) -> tuple:
    return (-c["parent_f"], -c["bleu"])  # PARENT F first, BLEU as tie-break


def choose(cands: list[dict], per_task: int) -> list[dict]:
    chosen = []
    for task in sorted({c["task"] for c in cands}):
        chosen += sorted((c for c in cands if c["task"] == task), key=rank_key)[:per_task]
    return chosen


def compare(finals: list[dict], peer: dict | None, rounds: int = 2000) -> None:
    """Adds, to every finished final, the paired bootstrap against its task's best and against T5-large."""
    done = [f for f in finals if "validation" in f]
    for task in {f["task"] for f in done}:
        ranked = sorted((f for f in done if f["task"] == task), key=lambda f: rank_key(f["validation"]))
        best = ranked[0]
        best["best_of_task"] = True
        for f in ranked[1:]:
            f["vs_best"] = {"best": best["name"], **paired_bootstrap(f["per_example"], best["per_example"], rounds)}
    if peer is not None:
        for f in done:
            try:
                f["vs_t5_large"] = paired_bootstrap(f["per_example"], peer["per_example"], rounds)
            except ValueError as err:  # other examples than FeTaQA validation's 500 (a test's tiny data)
                f["vs_t5_large"] = {"error": str(err)}


# ------------------------------------------------------------------------------------------- report
def fmt_delta(b: dict, metric: str, digits: int) -> str:
    m = b[metric]
    return f"{m['mean']:+.{digits}f} [{m['low']:+.{digits}f}, {m['high']:+.{digits}f}]"


def markdown(doc: dict) -> str:
    lines = [f"Selection: trained on {doc['split']['train']} of the {doc['split']['of']} FeTaQA training examples, "
             f"scored on the other {doc['split']['held_out']} (seed {doc['split']['seed']}); "
             f"{doc['compared_on_held_out']} candidates (config x decoding) compared there, "
             f"{len(doc.get('finals', []))} scored on validation.", "",
             "| config | decoding | task | held-out BLEU | P | R | F | chosen |", "|---|---|---|---|---|---|---|---|"]
    chosen = {(c["config"], c["decoding"]) for c in doc.get("chosen", [])}
    for c in sorted(doc["candidates"], key=lambda c: (c["task"],) + rank_key(c)):
        lines.append(f"| {c['config']} | {c['decoding']} | {c['task']} | {c['bleu']:.2f} | {c['parent_precision']:.3f} "
                     f"| {c['parent_recall']:.3f} | {c['parent_f']:.3f} | {'yes' if (c['config'], c['decoding']) in chosen else ''} |")
    for run in doc["selection"]:
        if "error" in run:
            lines.append(f"| {run['name']} | — | — | failed: {run['error']} | | | | |")
    if doc.get("finals"):
        lines += ["", "| final (all 2,004 → validation 500) | task | BLEU | P | R | F | vs best of task: ΔF · ΔBLEU "
                  "| vs T5-large: ΔF · ΔBLEU |", "|---|---|---|---|---|---|---|---|"]
        for f in doc["finals"]:
            if "validation" not in f:
                lines.append(f"| {f['name']} | {f.get('task', '')} | failed: {f['error']} | | | | | |")
                continue
            v = f["validation"]
            vs_best = "best" if f.get("best_of_task") else (
                f"{fmt_delta(f['vs_best'], 'parent_f', 3)} · {fmt_delta(f['vs_best'], 'bleu', 1)}" if "vs_best" in f else "—")
            vs_t5 = (f"{fmt_delta(f['vs_t5_large'], 'parent_f', 3)} · {fmt_delta(f['vs_t5_large'], 'bleu', 1)}"
                     if "parent_f" in f.get("vs_t5_large", {}) else "—")
            lines.append(f"| {f['name']} | {f['task']} | {v['bleu']:.2f} | {v['parent_precision']:.3f} "
                         f"| {v['parent_recall']:.3f} | {v['parent_f']:.3f} | {vs_best} | {vs_t5} |")
    return "\n".join(lines)


def environment() -> dict:
    try:
        import torch

        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        return {"gpu": gpu, "torch": torch.__version__}
    except Exception as err:  # the record still gets written
        return {"gpu": "unknown", "error": str(err)}


def write(doc: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    gpu = doc["env"]["gpu"].replace(" ", "-").replace("/", "-")
    path = out / f"{doc['date']}-{gpu}-recipe-search.json"
    slim = json.loads(json.dumps({k: v for k, v in doc.items() if k != "workroot_path"}))
    for f in slim.get("finals", []):
        f.pop("per_example", None)  # numbers per example: in the workroot's copy, not in the committed file
    path.write_text(json.dumps(slim, indent=1) + "\n", encoding="utf-8")
    (doc["workroot_path"] / "recipe-search-full.json").write_text(json.dumps(doc, indent=1, default=str) + "\n",
                                                                  encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fetaqa", type=Path, required=True, help="folder with FeTaQA train/validation .jsonl.gz")
    parser.add_argument("--grid", type=Path, default=GRID)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--workroot", type=Path, default=Path("/tmp/totto-recipe-search"))
    parser.add_argument("--slots", type=int, default=0, help="runs side by side (default: one per config)")
    parser.add_argument("--gpus", nargs="+", default=["0"], help="GPU ids the slots go round (default 0)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (CUDA_VISIBLE_DEVICES empty): tests")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="applies last, to every run")
    parser.add_argument("--deadline", type=float, default=0, help="start no final after this many seconds")
    parser.add_argument("--hard-deadline", type=float, default=0, help="stop every command at this many seconds")
    parser.add_argument("--peer", type=Path, default=PEER, help="T5-large per-example scores (bench/score_peers.py)")
    parser.add_argument("--only", nargs="+", help="configs of the grid to run (default: all)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and the commands; run nothing")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    fetaqa, workroot = args.fetaqa.resolve(), args.workroot.resolve()
    for name in ("train.jsonl.gz", "validation.jsonl.gz"):
        if not (fetaqa / name).is_file():
            raise SystemExit(f"{fetaqa / name}: not found (--fetaqa is a folder with FeTaQA's train and validation)")

    grid = load_grid(args.grid)
    if args.only:
        unknown = sorted(set(args.only) - {c["name"] for c in grid["configs"]})
        if unknown:
            raise SystemExit(f"--only {' '.join(unknown)}: not configs of {args.grid}")
        grid["configs"] = [c for c in grid["configs"] if c["name"] in args.only]
    split_dir = workroot / "split"
    selection = selection_runs(grid, split_dir, args.set)  # every setting checked before anything runs
    for run in selection:  # and the finals' settings too, whichever get chosen
        final_runs(grid, [{"config": run["name"], "decoding": d["name"]} for d in run["decodings"]], fetaqa, args.set)
    n_slots = args.slots or len(selection)
    slots = [("" if args.cpu else args.gpus[i % len(args.gpus)]) for i in range(n_slots)]
    if args.dry_run:
        print(f"split: {grid['holdout']} of {fetaqa / 'train.jsonl.gz'} held out (seed {grid['holdout_seed']}) -> {split_dir}")
        print(f"{len(selection)} selection runs x {len(grid['decodings'])} decodings, {n_slots} side by side on "
              f"{'the CPU' if args.cpu else 'GPUs ' + ' '.join(sorted(set(slots)))}:")
        for run in selection:
            for i, d in enumerate(run["decodings"]):
                stages = ["preprocess", "train", "evaluate"] if i == 0 else ["evaluate"]
                print("  " + " ".join(recipe_cmd(f"{run['name']}-{d['name']}", d["overrides"], Path("results"), stages)))
        print(f"then the best {grid['finals_per_task']} per task: all four stages on {fetaqa} (train -> validation)")
        return 0

    if workroot.exists():
        shutil.rmtree(workroot)
    workroot.mkdir(parents=True)
    runner = Runner(slots, workroot, args.hard_deadline, t0)
    doc = {"date": dt.date.today().isoformat(), "kind": "recipe-search", "env": environment(),
           "command": "python -m bench.recipe_search " + " ".join(map(str, argv if argv is not None else sys.argv[1:])),
           "grid": grid, "workroot_path": workroot}
    doc["split"] = split_training(fetaqa / "train.jsonl.gz", split_dir, int(grid["holdout"]), int(grid["holdout_seed"]))
    (split_dir / "held_out_lines.json").write_text(json.dumps(doc["split"]["held_out_lines"]), encoding="utf-8")
    doc["split"].pop("held_out_lines")  # which lines: in the workroot; the seed and count say it

    doc["selection"] = runner.map(selection, lambda job, slot: run_selection(job, slot, runner))
    doc["candidates"] = candidates(doc["selection"])
    doc["compared_on_held_out"] = len(doc["candidates"])
    doc["chosen"] = choose(doc["candidates"], int(grid["finals_per_task"]))
    doc["selection_seconds"] = time.perf_counter() - t0
    write(doc, args.out)
    print(markdown(doc), flush=True)

    finals = final_runs(grid, doc["chosen"], fetaqa, args.set)
    doc["finals"] = runner.map(finals, lambda job, slot: run_final(job, slot, runner), deadline=args.deadline)
    doc["total_seconds"] = time.perf_counter() - t0
    return report_finals(doc, args.peer, args.out, f"failed or not started: {{}} (logs under {workroot})")


def report_finals(doc: dict, peer_file: Path, out: Path, failed_line: str, writer=None) -> int:
    """The finals against T5-large (peer_file, when it exists), the record written (by writer(doc, out):
    this module's write by default) and the table printed; 1 if a run failed or did not run (named by
    failed_line, a format with one {} for the names), else 0."""
    peer = json.loads(peer_file.read_text(encoding="utf-8")) if peer_file.is_file() else None
    compare(doc["finals"], peer)
    doc["compared_on_validation"] = sum("validation" in f for f in doc["finals"])
    path = (writer or write)(doc, out)
    print("\n" + markdown(doc))
    print(f"\nwrote {path}")
    failed = [r["name"] for r in doc["selection"] + doc["finals"] if "error" in r]
    if failed:
        print(failed_line.format(", ".join(failed)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
