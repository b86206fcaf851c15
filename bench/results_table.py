"""The README results table (issue #7) from the JSON that bench/run_rows.py brought back.

    python -m bench.results_table [--rows bench/results/rows] [--predictions DIR] [--best NAME]

Reads bench/rows.yaml (the rows and their overrides) and, per row, bench/results/rows/NAME/*.json (the
FeTaQA run and the ToTTo dev55 evaluation of the same model); the zero-shot row comes from the base-model
scores of the earlier recipe runs in bench/results/; the published T5 rows (rows.yaml's peers) from
bench/results/peers/NAME.json (bench/score_peers.py: the same scorer on their predictions). Writes bench/results/rows/summary.json and
summary.csv (the plot of the final scores, see bench/results/rows/dvc.yaml) and prints the two markdown
tables of the README. With --predictions (a folder holding NAME/predictions.jsonl.gz, which stay out of
git because they hold the data's text) it adds a paired bootstrap of FeTaQA PARENT F against --best.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import random
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
# The zero-shot scores: the base model scored beside a fine-tuned one (FeTaQA: fp32 decoding, 2026-12-02;
# ToTTo dev55: bf16 decoding, 2026-11-28, the only base-model run on it).
ZERO_SHOT = {"fetaqa": ROOT / "bench/results/2026-12-02-NVIDIA-H200-recipe-fetaqa-nf4-r8-4ep.json",
             "totto": ROOT / "bench/results/2026-11-28-NVIDIA-H200-recipe-totto-dev55-of-fetaqa-nf4-r8-4ep.json"}
SUBSETS = ("overall", "overlap", "non_overlap")


def scores(block: dict) -> dict:
    return {k: block[k] for k in ("count", "bleu", "parent_precision", "parent_recall", "parent_f")}


def read_row(folder: Path, name: str) -> dict | None:
    """One row's numbers, or None when its run did not finish (no results JSON)."""
    fetaqa = folder / name
    files = sorted(fetaqa.glob(f"*-{name}.json"))  # nf4-r8-1ep: an earlier run_recipe call (fetaqa-nf4-r8-1ep)
    totto = sorted(fetaqa.glob(f"*-recipe-{name}-totto-dev55.json"))
    if not files:
        return None
    run = json.loads(files[-1].read_text(encoding="utf-8"))
    stages = run["results"][0]["stages"]
    row = {"name": name, "date": run["date"], "gpu": run["env"]["gpu"], "command": run["command"],
           "train": {k: stages["train"]["metrics"][k] for k in ("steps", "samples", "final_loss", "tokens_per_s",
                                                              "peak_memory_gb")},
           "train_wall_seconds": stages["train"]["wall_seconds"],
           "train_examples": stages["preprocess"]["metrics"]["train"]["written"],
           "fetaqa": scores(stages["evaluate"]["metrics"]["finetuned"]["overall"]), "totto": None}
    if totto:
        evaluated = json.loads(totto[-1].read_text(encoding="utf-8"))["results"][0]["stages"]["evaluate"]["metrics"]["finetuned"]
        row["totto"] = {s: scores(evaluated[s]) for s in SUBSETS}
    return row


def zero_shot() -> dict:
    fetaqa = json.loads(ZERO_SHOT["fetaqa"].read_text(encoding="utf-8"))["results"][0]["stages"]["evaluate"]["metrics"]["base"]
    totto = json.loads(ZERO_SHOT["totto"].read_text(encoding="utf-8"))["results"][0]["stages"]["evaluate"]["metrics"]["base"]
    date = json.loads(ZERO_SHOT["fetaqa"].read_text(encoding="utf-8"))["date"]
    return {"name": "zero-shot", "date": date, "fetaqa": scores(fetaqa["overall"]), "totto": {s: scores(totto[s]) for s in SUBSETS},
            "source": [str(p.relative_to(ROOT)) for p in ZERO_SHOT.values()]}


PEERS = ROOT / "bench" / "results" / "peers"


def read_peer(name: str, folder: Path = PEERS) -> dict | None:
    """A published system's FeTaQA scores (bench/score_peers.py), or None when not scored yet."""
    path = folder / f"{name}.json"
    if not path.is_file():
        return None
    doc = json.loads(path.read_text(encoding="utf-8"))
    return {"name": name, "peer": True, "command": doc["command"], "source": doc["source"],
            "fetaqa": doc["fetaqa"], "totto": None}


def paired_bootstrap(a: dict, b: dict, rounds: int = 2000, seed: int = 0) -> dict:
    """Mean of a - b over the examples both score, with a 95% interval from resampling examples."""
    ids = sorted(set(a) & set(b))
    diffs = [a[i] - b[i] for i in ids]
    rng = random.Random(seed)
    means = sorted(sum(diffs[rng.randrange(len(diffs))] for _ in diffs) / len(diffs) for _ in range(rounds))
    return {"examples": len(ids), "mean": sum(diffs) / len(diffs),
            "low": means[int(0.025 * rounds)], "high": means[int(0.975 * rounds) - 1]}


def per_example_parent_f(path: Path) -> dict:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return {r["id"]: r["parent"]["parent_f"] for r in map(json.loads, fh)}


def fmt(x, digits=3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def markdown(rows: list[dict], described: dict) -> str:
    lines = ["| row | recipe | run | train examples × epochs (steps) | train stage wall s | FeTaQA BLEU | P | R | F |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = r["fetaqa"]
        if r["name"] == "zero-shot":
            lines.append(f"| zero-shot | packaged base, no training | {r['date']} | — | — | {f['bleu']:.1f} | {fmt(f['parent_precision'])} "
                         f"| {fmt(f['parent_recall'])} | {fmt(f['parent_f'])} |")
            continue
        if r.get("peer"):
            lines.append(f"| {r['name']} | {described[r['name']]} | published | 7326 × 13 (official train split) | — "
                         f"| {f['bleu']:.1f} | {fmt(f['parent_precision'])} | {fmt(f['parent_recall'])} | {fmt(f['parent_f'])} |")
            continue
        t = r["train"]
        epochs = round(t["samples"] / r["train_examples"])
        lines.append(f"| {r['name']} | {described[r['name']]} | {r['date']} | {r['train_examples']} × {epochs} ({t['steps']}) "
                     f"| {r['train_wall_seconds']:.0f} | {f['bleu']:.1f} | {fmt(f['parent_precision'])} "
                     f"| {fmt(f['parent_recall'])} | {fmt(f['parent_f'])} |")
    lines += ["", "| row | ToTTo dev55 overall: BLEU · P / R / F | overlap (37) | non-overlap (18) |", "|---|---|---|---|"]
    for r in rows:
        if r.get("peer"):  # published FeTaQA predictions only
            continue
        if r["totto"] is None:
            why = "not run: ToTTo's examples hold no question" if r.get("totto_run") is False else "not measured"
            lines.append(f"| {r['name']} | {why} | | |")
            continue
        cells = [f"{s['bleu']:.1f} · {s['parent_precision']:.3f} / {s['parent_recall']:.3f} / {s['parent_f']:.3f}"
                 for s in (r["totto"][k] for k in SUBSETS)]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def collect(folder: Path) -> tuple[list[dict], list[str], dict]:
    """(rows with results, zero-shot first, the published peers last; names of rows without;
    name -> description), in rows.yaml order."""
    doc = yaml.safe_load((ROOT / "bench" / "rows.yaml").read_text(encoding="utf-8"))
    plan, peers = doc["rows"], doc.get("peers", [])
    rows, missing = [zero_shot()], []
    for entry in plan:
        row = read_row(folder, entry["name"])
        if row:
            row["totto_run"] = entry.get("totto", True)  # false: a task ToTTo has no input for
        (rows.append(row) if row else missing.append(entry["name"]))
    for entry in peers:
        row = read_peer(entry["name"])
        (rows.append(row) if row else missing.append(entry["name"]))
    return rows, missing, {r["name"]: r["desc"] for r in plan + peers}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=Path, default=ROOT / "bench" / "results" / "rows")
    parser.add_argument("--predictions", type=Path, help="folder with NAME/predictions.jsonl.gz per row")
    parser.add_argument("--best", default="nf4-r8-lr2e-4-1ep", help="row the others are compared with")
    args = parser.parse_args(argv)

    rows, missing, described = collect(args.rows)
    summary = {"rows": rows, "not_finished": missing}
    if args.predictions:
        best = per_example_parent_f(args.predictions / args.best / "predictions.jsonl.gz")
        summary["fetaqa_parent_f_vs_best"] = {
            "best": args.best,
            "rows": {r["name"]: paired_bootstrap(best, per_example_parent_f(args.predictions / r["name"] / "predictions.jsonl.gz"))
                     for r in rows[1:] if r["name"] != args.best
                     and (args.predictions / r["name"] / "predictions.jsonl.gz").is_file()}}
    elif (args.rows / "summary.json").is_file():  # keep the bootstrap of a run that had the predictions
        previous = json.loads((args.rows / "summary.json").read_text(encoding="utf-8"))
        if "fetaqa_parent_f_vs_best" in previous:
            summary["fetaqa_parent_f_vs_best"] = previous["fetaqa_parent_f_vs_best"]
    (args.rows / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    with open(args.rows / "summary.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["row", "fetaqa_bleu", "fetaqa_parent_f", "totto_bleu", "totto_parent_f"])
        for r in rows:
            totto = r["totto"]["overall"] if r["totto"] else {"bleu": "", "parent_f": ""}
            writer.writerow([r["name"], r["fetaqa"]["bleu"], r["fetaqa"]["parent_f"], totto["bleu"], totto["parent_f"]])
    print(markdown(rows, described))
    if missing:
        print(f"\nnot finished: {', '.join(missing)}")
    for name, b in summary.get("fetaqa_parent_f_vs_best", {}).get("rows", {}).items():
        print(f"FeTaQA PARENT F, {args.best} - {name}: {b['mean']:+.4f} (95% [{b['low']:+.4f}, {b['high']:+.4f}], "
              f"{b['examples']} examples)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
