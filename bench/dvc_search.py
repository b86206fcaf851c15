"""The recipe search of bench/recipe_search.py through `dvc exp`: the same grid (bench/recipe_grid.yaml), the
same split, choice and bootstrap, but every candidate a queued DVC experiment of this repository.

    python -m bench.dvc_search --fetaqa DIR [--jobs N] [--phase all|selection|finals|report] [--queue-only]
                               [--grid FILE] [--set KEY=VALUE ...] [--only NAME ...] [--prefix P]
                               [--workroot DIR] [--out DIR] [--repo DIR] [--dry-run]

For a machine with DVC (the GPU hosts of BENCHMARKS.md have none: there bench/recipe_search.py runs the
stages directly). Each candidate is `dvc exp run --queue -n NAME -S key=value ... evaluate` (preprocess,
train, merge, evaluate of dvc.yaml; no export), its -S the overrides bench/recipe_search.py passes to
bench/run_recipe.py for the same candidate (bench/run_rows.py's COMMON, the grid's common and
selection_common, the config's and the decoding's overrides, then --set; a key set twice keeps the last
value, as --set does). Names: P-sel-CONFIG-DECODING and P-fin-CONFIG-DECODING.

1. selection: DIR's train.jsonl.gz split by the grid's seeded draw into WORKROOT/split (train less the
   held-out examples, and the held-out ones as its validation file: data.path of every selection run). Every
   candidate is queued and the queue run with `dvc exp run --run-all --jobs N`. Preprocess, train and merge
   are found in DVC's run cache where they repeat (the decodings of one config share one training once it
   has run; train's dvclive folder metrics/train is a cached out, since DVC 3.67 saves no run-cache entry
   for a stage with an uncached out that is not a metric or plot); evaluate always runs.
2. finals: the selection's scores from `dvc exp show --json` (metrics/eval.json), the best
   `finals_per_task` per task by held-out PARENT F, BLEU as tie-break (recipe_search.choose), queued on all
   of DIR and run the same way.
3. report: the finals' predictions (metrics/predictions.jsonl of each experiment's commit), the paired
   bootstrap against the best of each task and T5-large (recipe_search.compare), written to
   OUT/<date>-<gpu>-dvc-recipe-search.json, and the tables recipe_search prints.

--queue-only queues a phase's experiments and stops (run them with `dvc queue start -j N` or `dvc exp run
--run-all -j N`, then call the next --phase). --jobs N experiments at a time: with train.device auto each
takes a free GPU (README "Several GPUs"), several share one where N exceeds the GPUs. DVC runs as
`python -m dvc` of this interpreter, with DVC_SITE_CACHE_DIR as run.py sets it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

from bench.recipe_search import (GRID, PEER, SCORES, choose, environment, final_runs, load_grid, report_finals,
                                 selection_runs, split_training)
from bench.significance import per_example_of_predictions

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "recipe-search"
TARGET = "evaluate"  # preprocess -> train -> merge -> evaluate; the export stage is not part of the search


def dvc_set_args(overrides: list[str]) -> list[str]:
    """-S KEY=VALUE per key, in first-seen order, each with its last value (run_recipe's --set order)."""
    last: dict[str, str] = {}
    for assignment in overrides:
        key, sep, value = assignment.partition("=")
        if not sep:
            raise SystemExit(f"{assignment!r}: expected group.key=value")
        if "," in value:  # DVC reads -S a=1,2 as a sweep of two experiments
            raise SystemExit(f"{assignment!r}: a comma would make DVC queue a sweep")
        last[key] = value
    return [arg for key, value in last.items() for arg in ("-S", f"{key}={value}")]


def queue_args(name: str, overrides: list[str]) -> list[str]:
    return ["exp", "run", "--queue", "-n", name, *dvc_set_args(overrides), TARGET]


class Dvc:
    """`python -m dvc ARGS` in the repository, DVC's state database where run.py puts it."""

    def __init__(self, repo: Path):
        self.repo = repo
        self.env = {**os.environ}
        self.env.setdefault("DVC_SITE_CACHE_DIR", str(repo / ".dvc" / "site-cache"))

    def __call__(self, *args: str, stream: bool = False) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "dvc", *args]
        if stream:  # a long run: its progress goes to our output
            print("$ dvc " + " ".join(args), flush=True)
            return subprocess.run(cmd, cwd=self.repo, env=self.env, stdin=subprocess.DEVNULL)
        done = subprocess.run(cmd, cwd=self.repo, env=self.env, capture_output=True, text=True, encoding="utf-8",
                              stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise SystemExit(f"dvc {' '.join(args[:3])} ... failed (exit {done.returncode}): "
                             f"{(done.stderr or done.stdout).strip().splitlines()[-1:]}")
        return done

    def git_show(self, rev: str, path: str) -> str:
        done = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=self.repo, capture_output=True, text=True,
                              encoding="utf-8")
        if done.returncode != 0:
            raise ValueError(f"{rev[:8]}:{path}: {done.stderr.strip()}")
        return done.stdout


def experiments(shown: list) -> dict[str, dict]:
    """name -> {"rev", "state", "eval"} of every experiment `dvc exp show --json` lists; "eval" is its
    metrics/eval.json (None while queued, running or failed)."""
    found = {}
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            state = (exp.get("executor") or {}).get("state")
            for rev in exp.get("revs") or []:
                data = rev.get("data") or {}
                metrics = (data.get("metrics") or {}).get("metrics/eval.json") or {}
                found[rev.get("name") or rev["rev"]] = {"rev": rev["rev"], "state": state or "success",
                                                        "eval": metrics.get("data")}
    return found


# ----------------------------------------------------------------------------------------------- plan
def plan_selection(grid: dict, split_dir: Path, extra: list[str], prefix: str) -> list[dict]:
    out = []
    for run in selection_runs(grid, split_dir, extra):
        for d in run["decodings"]:
            out.append({"name": f"{prefix}-sel-{run['name']}-{d['name']}", "config": run["name"],
                        "decoding": d["name"], "task": d["task"], "overrides": d["overrides"]})
    return out


def plan_finals(grid: dict, chosen: list[dict], fetaqa: Path, extra: list[str], prefix: str) -> list[dict]:
    return [{**f, "name": f"{prefix}-fin-{f['config']}-{f['decoding']}"}
            for f in final_runs(grid, chosen, fetaqa, extra)]


def check_names_free(dvc: Dvc, jobs: list[dict]) -> None:
    existing = experiments(json.loads(dvc("exp", "show", "--json").stdout))
    taken = [j["name"] for j in jobs if j["name"] in existing]
    if taken:
        raise SystemExit(f"{', '.join(taken)}: already experiments of {dvc.repo} (dvc exp remove them, or --prefix)")


def queue_and_run(dvc: Dvc, jobs: list[dict], n_jobs: int, queue_only: bool, dry_run: bool) -> None:
    """Queue every job; unless queue_only, run the queue with `dvc exp run --run-all --jobs n_jobs`."""
    if not dry_run:
        check_names_free(dvc, jobs)
    for job in jobs:
        args = queue_args(job["name"], job["overrides"])
        print("dvc " + " ".join(args), flush=True)
        if not dry_run:
            dvc(*args)
    if dry_run:
        print(f"dvc exp run --run-all --jobs {n_jobs}")
    elif queue_only:
        print(f"queued {len(jobs)}; run them: {sys.executable} -m dvc exp run --run-all --jobs {n_jobs}")
    else:
        status = dvc("exp", "run", "--run-all", "--jobs", str(n_jobs), stream=True).returncode
        if status != 0:
            print(f"dvc exp run --run-all: exit {status} (failed experiments are reported as such)", flush=True)


# ---------------------------------------------------------------------------------------- results
def selection_results(jobs: list[dict], found: dict) -> tuple[list[dict], list[dict]]:
    """(the candidates scored on the held-out split, one record per selection experiment)."""
    cands, runs = [], []
    for job in jobs:
        exp = found.get(job["name"])
        run = {"name": job["name"], "config": job["config"], "decoding": job["decoding"], "task": job["task"]}
        if exp is None or exp["eval"] is None:
            run["error"] = "not run" if exp is None else f"{exp['state']} (dvc queue logs {job['name']})"
        else:
            run["rev"] = exp["rev"]
            cands.append({"config": job["config"], "decoding": job["decoding"], "task": job["task"],
                          **{k: exp["eval"]["finetuned"]["overall"][k] for k in SCORES}})
        runs.append(run)
    return cands, runs


def final_results(dvc: Dvc, jobs: list[dict], found: dict) -> list[dict]:
    finals = []
    for job in jobs:
        exp = found.get(job["name"])
        final = {k: job[k] for k in ("name", "config", "decoding", "task")}
        final["command"] = "dvc " + " ".join(queue_args(job["name"], job["overrides"]))
        if exp is None or exp["eval"] is None:
            final["error"] = "not run" if exp is None else f"{exp['state']} (dvc queue logs {job['name']})"
        else:
            final["rev"] = exp["rev"]
            final["validation"] = {k: exp["eval"]["finetuned"]["overall"][k] for k in SCORES}
            final["per_example"] = per_example_of_predictions(dvc.git_show(exp["rev"], "metrics/predictions.jsonl"))
        finals.append(final)
    return finals


def write(doc: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    gpu = doc["env"]["gpu"].replace(" ", "-").replace("/", "-")
    path = out / f"{doc['date']}-{gpu}-dvc-recipe-search.json"
    slim = json.loads(json.dumps(doc))
    for f in slim.get("finals", []):
        f.pop("per_example", None)  # numbers per example: the experiments' predictions hold them
    path.write_text(json.dumps(slim, indent=1) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------- main
def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fetaqa", type=Path, required=True, help="folder with FeTaQA train/validation .jsonl.gz")
    parser.add_argument("--grid", type=Path, default=GRID)
    parser.add_argument("--phase", choices=("all", "selection", "finals", "report"), default="all")
    parser.add_argument("--jobs", type=int, default=1, help="experiments at a time (dvc exp run --run-all --jobs)")
    parser.add_argument("--queue-only", action="store_true", help="queue the phase's experiments, run nothing")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="applies last, to every run")
    parser.add_argument("--only", nargs="+", help="configs of the grid to run (default: all)")
    parser.add_argument("--prefix", default="rs", help="experiment names start with it (default rs)")
    parser.add_argument("--workroot", type=Path, default=Path("/tmp/totto-dvc-search"),
                        help="the held-out split (data.path of the selection runs)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--repo", type=Path, default=ROOT, help="the DVC repository (default: this project)")
    parser.add_argument("--peer", type=Path, default=PEER, help="T5-large per-example scores (bench/score_peers.py)")
    parser.add_argument("--dry-run", action="store_true", help="print the selection's dvc commands; run nothing")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    fetaqa, workroot, repo = args.fetaqa.resolve(), args.workroot.resolve(), args.repo.resolve()
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
    selection = plan_selection(grid, split_dir, args.set, args.prefix)  # every setting checked first
    for c in grid["configs"]:  # and the finals' too, whichever get chosen
        plan_finals(grid, [{"config": c["name"], "decoding": d["name"]} for d in grid["decodings"]], fetaqa, args.set,
                    args.prefix)
    dvc = Dvc(repo)
    if args.phase in ("all", "selection"):
        if not args.dry_run:
            check_names_free(dvc, selection)  # before the split is rewritten under queued experiments
            split = split_training(fetaqa / "train.jsonl.gz", split_dir, int(grid["holdout"]), int(grid["holdout_seed"]))
            split.pop("held_out_lines")
            (workroot / "split.json").write_text(json.dumps(split), encoding="utf-8")
        queue_and_run(dvc, selection, args.jobs, args.queue_only, args.dry_run)
        if args.dry_run or args.queue_only:
            return 0
    doc = {"date": dt.date.today().isoformat(), "kind": "dvc-recipe-search", "env": environment(),
           "command": "python -m bench.dvc_search " + " ".join(map(str, argv if argv is not None else sys.argv[1:])),
           "grid": grid, "split": json.loads((workroot / "split.json").read_text(encoding="utf-8"))}
    found = experiments(json.loads(dvc("exp", "show", "--json").stdout))
    doc["candidates"], doc["selection"] = selection_results(selection, found)
    doc["compared_on_held_out"] = len(doc["candidates"])
    doc["chosen"] = choose(doc["candidates"], int(grid["finals_per_task"]))
    finals = plan_finals(grid, doc["chosen"], fetaqa, args.set, args.prefix)
    if args.phase in ("all", "finals"):
        queue_and_run(dvc, finals, args.jobs, args.queue_only, False)
        if args.queue_only:
            return 0
        found = experiments(json.loads(dvc("exp", "show", "--json").stdout))
    doc["finals"] = final_results(dvc, finals, found)
    return report_finals(doc, args.peer, args.out, "failed or not run: {} (dvc queue logs NAME)", writer=write)


if __name__ == "__main__":
    sys.exit(main())
