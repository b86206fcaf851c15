"""Score the published FeTaQA T5 predictions (the peers of bench/rows.yaml) with the project's scorer.

    python -m bench.score_peers --peers ../shared/data/fetaqa/peers --examples ../shared/data/fetaqa/validation.jsonl.gz

Each peer's predictions file is read and scored exactly as `python -m stages.score --predictions FILE
--examples VALIDATION` does (stages.score's readers, table2text.metrics.totto.compute_metrics). Writes
bench/results/peers/NAME.json: the scores, the sha256 of both inputs, and per example (by feta_id) the
PARENT F and BLEU sufficient statistics that the paired bootstrap of bench/recipe_search.py resamples.
Those are numbers only; the predictions and the data stay out of git.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from bench.significance import bleu_from_statistics, per_example
from table2text.io import readers
from stages.score import read_examples, read_predictions
from table2text.metrics.totto import compute_metrics

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "peers"


def load_peers(path: Path = ROOT / "bench" / "rows.yaml") -> list[dict]:
    return yaml.safe_load(path.read_text(encoding="utf-8"))["peers"]


def score_peer(predictions_path: Path, examples_path: Path) -> tuple[dict, dict]:
    """(summary, id -> per-example numbers) of one predictions file against FeTaQA examples."""
    predictions = read_predictions(predictions_path)
    examples = read_examples(examples_path)
    if len(predictions) != len(examples):
        raise SystemExit(f"{predictions_path}: {len(predictions)} predictions for {len(examples)} examples")
    texts = [p.text for p in predictions]
    summary, scored = compute_metrics(texts, examples)
    numbers = per_example(texts, examples, scored)
    resummed = bleu_from_statistics([n["bleu_stats"] for n in numbers.values()])
    if abs(resummed - summary["overall"]["bleu"]) > 1e-9:  # the bootstrap must resample the scorer's BLEU
        raise SystemExit(f"{predictions_path}: BLEU from per-example statistics {resummed} != scorer's "
                         f"{summary['overall']['bleu']}")
    return summary, numbers


def dump(doc: dict) -> str:
    """JSON with one line per example, so that a rescoring diffs line by line."""
    head = {k: v for k, v in doc.items() if k != "per_example"}
    body = ",\n".join(f"  {json.dumps(i)}: {json.dumps(v, separators=(',', ':'))}" for i, v in doc["per_example"].items())
    return json.dumps(head, indent=1)[:-2] + ',\n "per_example": {\n' + body + "\n }\n}\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=Path, required=True, help="folder with the peers' NAME-validation.txt")
    parser.add_argument("--examples", type=Path, required=True, help="FeTaQA validation.jsonl.gz (500)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for peer in load_peers():
        path = args.peers / peer["file"]
        summary, examples = score_peer(path, args.examples)
        doc = {"name": peer["name"], "desc": peer["desc"], "source": peer["source"],
               "command": f"python -m stages.score --predictions {(Path('../shared/data/fetaqa/peers') / peer['file']).as_posix()} "
                          "--examples ../shared/data/fetaqa/validation.jsonl.gz",
               "inputs": {"predictions": {"file": peer["file"], "sha256": readers.sha256_file(path)},
                          "examples": {"file": args.examples.name, "sha256": readers.sha256_file(args.examples)}},
               "fetaqa": {k: summary["overall"][k] for k in ("count", "bleu", "parent_precision", "parent_recall", "parent_f")},
               "per_example": examples}
        target = args.out / f"{peer['name']}.json"
        target.write_text(dump(doc), encoding="utf-8")
        f = doc["fetaqa"]
        print(f"{peer['name']}: BLEU {f['bleu']:.2f}  PARENT P/R/F {f['parent_precision']:.3f} / "
              f"{f['parent_recall']:.3f} / {f['parent_f']:.3f}  -> {target.relative_to(ROOT) if target.is_relative_to(ROOT) else target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
