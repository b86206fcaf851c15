"""The merge and export checks' logit distance (table2text.model.fidelity.LogitDistance) over one prompt's
[positions, vocabulary] logits, whole or in chunks of rows: seconds (best of --repeats) and the results,
which must not depend on the chunking.

    python -m bench.logit_distance_bench [--positions 256] [--vocab 262144] [--repeats 6]

Writes bench/results/cpu/<date>-logit-distance.json and prints a BENCHMARKS.md table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from table2text.model.fidelity import LogitDistance, chunk_rows

OUT_DIR = Path("bench/results/cpu")


def measure(reference: torch.Tensor, candidate: torch.Tensor, chunk_bytes: int) -> tuple[float, dict]:
    distance = LogitDistance(chunk_bytes=chunk_bytes)
    start = time.perf_counter()
    distance.add(reference, candidate)
    result = distance.result()
    return time.perf_counter() - start, result


def measure_all(reference: torch.Tensor, candidate: torch.Tensor, sizes: list[int], repeats: int) -> list[dict]:
    """Best of `repeats` for each chunk size, the sizes taking turns in each round: a shared machine's
    load drifts, and it drifts over all of them alike."""
    best = {size: float("inf") for size in sizes}
    results = {}
    for _ in range(repeats):
        for size in sizes:
            seconds, results[size] = measure(reference, candidate, size)
            best[size] = min(best[size], seconds)
    return [{"chunk_bytes": size, "seconds": best[size], **results[size]} for size in sizes]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, default=256, help="rows: one prompt's positions")
    parser.add_argument("--vocab", type=int, default=262144, help="columns: Gemma 3's vocabulary")
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--chunk-mib", type=float, nargs="+", default=[0, 8, 4, 2, 1],
                        help="chunk sizes in MiB (0: the whole block at once); the default chunk is measured too")
    args = parser.parse_args(argv)

    generator = torch.Generator().manual_seed(0)
    reference = torch.randn(args.positions, args.vocab, generator=generator) * 3
    candidate = reference + torch.randn(args.positions, args.vocab, generator=generator) * 0.05
    default = chunk_rows(reference) * args.vocab * reference.element_size()
    sizes = [int(mib * 2**20) for mib in args.chunk_mib]
    rows = measure_all(reference, candidate, sizes + [default] * (default not in sizes), args.repeats)
    for r in rows:
        r["default"] = r["chunk_bytes"] == default
    whole = next((r for r in rows if r["chunk_bytes"] == 0), rows[0])
    for r in rows:  # the same distance whatever the chunking (the KL's float64 total sums in another order)
        r["mean_kl_rel_diff_vs_whole"] = abs(r["mean_kl"] - whole["mean_kl"]) / whole["mean_kl"]
        r["same_top1_and_spread"] = (r["top1_agreement"] == whole["top1_agreement"]
                                     and r["max_logit_diff"] == whole["max_logit_diff"])

    doc = {"date": dt.date.today().isoformat(), "kind": "logit-distance",
           "command": " ".join(["python -m bench.logit_distance_bench", *(sys.argv[1:] if argv is None else argv)]),
           "repeats": args.repeats,
           "host": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
           "shape": [args.positions, args.vocab], "default_chunk_bytes": default, "results": rows}
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / f"{doc['date']}-logit-distance.json"
    path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}")
    print("| chunk | seconds (best of %d) | vs whole | mean KL rel. diff | top-1, max diff equal |" % args.repeats)
    print("|---|---|---|---|---|")
    for r in rows:
        label = "whole block" if r["chunk_bytes"] == 0 else f"{r['chunk_bytes'] / 2**20:g} MiB"
        label += " (default)" if r["default"] else ""
        print(f"| {label} | {r['seconds']:.3f} | {whole['seconds'] / r['seconds']:.2f}x | "
              f"{r['mean_kl_rel_diff_vs_whole']:.1e} | {r['same_top1_and_spread']} |")


if __name__ == "__main__":
    main()
