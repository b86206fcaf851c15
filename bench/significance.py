"""Paired bootstrap of FeTaQA PARENT F and BLEU between two systems scored on the same examples.

PARENT F is a mean of per-example scores, so a resample's score is the mean over the drawn examples.
BLEU is a corpus score: a resample's BLEU is computed from the summed sufficient statistics (matches and
totals per n-gram order, lengths) of the drawn examples, which is what sacrebleu's own paired bootstrap
does. The statistics come from the same preparation as table2text.metrics.totto.corpus_bleu (lower-cased,
Moses-detokenised text, 13a tokenisation, exp smoothing), so the full-set BLEU from them is the scorer's.

    python -m bench.significance A B [--rounds 2000]   # A, B: predictions (.jsonl[.gz]) or a peer's JSON
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import numpy as np
from sacrebleu.metrics import BLEU

from table2text.metrics.totto import prepare_prediction, prepare_references

_BLEU = BLEU(tokenize="13a", smooth_method="exp", lowercase=False)  # table2text.metrics.totto.corpus_bleu's


def bleu_statistics(predictions: list[str], references: list[list[str]]) -> list[list[int]]:
    """Per example, BLEU's sufficient statistics (10 integers) of one prediction against its references
    (raw text: prepared here exactly as compute_metrics prepares it)."""
    hyps = [prepare_prediction(p) for p in predictions]
    refs = [prepare_references(r) for r in references]
    streams = [list(stream) for stream in zip(*refs)]  # as corpus_bleu builds them
    # sacrebleu's per-sentence statistics, the ones its PairedTest resamples
    return [list(map(int, s)) for s in _BLEU._extract_corpus_statistics(hyps, streams)]


def bleu_from_statistics(stats) -> float:
    return float(_BLEU._compute_score_from_stats(list(np.asarray(stats, dtype=np.int64).sum(axis=0))).score)


def paired_bootstrap(a: dict, b: dict, rounds: int = 2000, seed: int = 0) -> dict:
    """a, b: example id -> {"parent_f": float, "bleu_stats": [10 ints]} of two systems. Over the ids both
    score: a - b in PARENT F and in BLEU (points), each with the full-set difference and a 95% interval
    from resampling the examples (the same resamples for both metrics)."""
    ids = sorted(set(a) & set(b))
    if not ids:
        raise ValueError("paired bootstrap: the two systems share no example ids")
    fa = np.array([a[i]["parent_f"] for i in ids])
    fb = np.array([b[i]["parent_f"] for i in ids])
    sa = np.array([a[i]["bleu_stats"] for i in ids], dtype=np.int64)
    sb = np.array([b[i]["bleu_stats"] for i in ids], dtype=np.int64)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(ids), size=(rounds, len(ids)))
    df = fa[draws].mean(axis=1) - fb[draws].mean(axis=1)
    sums_a, sums_b = sa[draws].sum(axis=1), sb[draws].sum(axis=1)
    db = np.array([_BLEU._compute_score_from_stats(list(x)).score - _BLEU._compute_score_from_stats(list(y)).score
                   for x, y in zip(sums_a, sums_b)])

    def interval(full: float, samples: np.ndarray) -> dict:
        return {"mean": float(full), "low": float(np.quantile(samples, 0.025)),
                "high": float(np.quantile(samples, 0.975))}

    return {"examples": len(ids), "rounds": rounds,
            "parent_f": interval(fa.mean() - fb.mean(), df),
            "bleu": interval(bleu_from_statistics(sa) - bleu_from_statistics(sb), db)}


def per_example(predictions: list[str], examples: list[dict], scored: list[dict]) -> dict:
    """id -> {"parent_f", "bleu_stats"} of one system: `scored` is compute_metrics' per_example list."""
    stats = bleu_statistics(predictions, [ex["references"] for ex in examples])
    return {str(ex["id"]): {"parent_f": s["parent_f"], "bleu_stats": st}
            for ex, s, st in zip(examples, scored, stats)}


def load_system(path: Path) -> dict:
    """id -> {"parent_f", "bleu_stats"} of a system: an evaluate stage's predictions file
    (metrics/predictions.jsonl, or gzipped: each line's prediction, references and PARENT scores), or a
    peer's per-example record (bench/score_peers.py's JSON, which holds "per_example")."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        if not path.name.endswith((".jsonl", ".jsonl.gz")):
            return json.load(fh)["per_example"]
        return per_example_of_predictions(fh.read())


def per_example_of_predictions(text: str) -> dict:
    """id -> {"parent_f", "bleu_stats"} from the text of an evaluate stage's predictions file (a JSON line
    an example: its prediction, references and PARENT scores)."""
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    stats = bleu_statistics([r["prediction"] for r in rows], [r["references"] for r in rows])
    return {str(r["id"]): {"parent_f": r["parent"]["parent_f"], "bleu_stats": s} for r, s in zip(rows, stats)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="paired bootstrap of PARENT F and BLEU: system A minus system B")
    parser.add_argument("a", type=Path, help="predictions of A (metrics/predictions.jsonl[.gz]) or a peer's JSON")
    parser.add_argument("b", type=Path, help="the same for B")
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result = paired_bootstrap(load_system(args.a), load_system(args.b), args.rounds, args.seed)
    f, b = result["parent_f"], result["bleu"]
    print(f"{args.a.name} - {args.b.name} on {result['examples']} examples, {result['rounds']} resamples: "
          f"PARENT F {f['mean']:+.4f} [{f['low']:+.4f}, {f['high']:+.4f}], "
          f"BLEU {b['mean']:+.2f} [{b['low']:+.2f}, {b['high']:+.2f}]")
    return result


if __name__ == "__main__":
    main()
