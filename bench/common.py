"""Results files and the BENCHMARKS.md rows shared by the benchmarks."""

from __future__ import annotations

import datetime as dt
import json
import platform
from pathlib import Path

import torch

BENCHMARKS_MD = Path("BENCHMARKS.md")


def environment() -> dict:
    import peft
    import transformers

    env = {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
    }
    from importlib import metadata

    for name in ("bitsandbytes", "trl", "liger-kernel"):
        key = name.replace("-", "_")
        try:  # the installed distribution's version (liger_kernel has no __version__ attribute)
            env[key] = metadata.version(name)
        except metadata.PackageNotFoundError:  # not installed on this host: recorded as absent
            env[key] = None
    return env


def write_results(out_dir: Path, kind: str, results: list[dict], meta: dict) -> Path:
    env = environment()
    date = dt.date.today().isoformat()
    gpu = env["gpu"].replace(" ", "-").replace("/", "-")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{date}-{gpu}-{kind}.json"
    path.write_text(json.dumps({"date": date, "kind": kind, "env": env, **meta, "results": results}, indent=2) + "\n", encoding="utf-8")
    append_markdown(path)
    print(f"wrote {path}")
    return path


def append_markdown(results_file: Path, md: Path = BENCHMARKS_MD) -> None:
    """Append one table (one row per run) for a results file to BENCHMARKS.md."""
    doc = json.loads(Path(results_file).read_text(encoding="utf-8"))
    env = doc["env"]
    versions = ", ".join(f"{k} {v}" for k, v in env.items() if k not in {"gpu"} and v)
    lines = [f"\n### {doc['date']} · {doc['kind']} · {env['gpu']}\n",
             f"`{doc.get('command', '')}` — results file `{Path(results_file).name}`; {versions}\n"]
    rows = doc["results"]
    if doc["kind"].startswith("train"):
        lines.append("| run | samples/s | tokens/s | step time (s) | peak allocated (GiB) | final loss | MFU |")
        lines.append("|---|---|---|---|---|---|---|")
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['name']} | failed: {r['error'][:120]} | | | | | |")
            else:
                mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "—"
                lines.append(f"| {r['name']} | {r['samples_per_s']:.1f} | {r['tokens_per_s']:,.0f} | "
                             f"{r['step_time_s']:.3f} | {r['peak_allocated_gib']:.2f} | {r['final_loss']:.4f} | {mfu} |")
    elif doc["kind"].startswith("recipe"):
        lines.append("| run | stage wall times (s) | train tokens/s | train peak (GiB) | final loss | "
                     "BLEU (base → tuned) | PARENT F (base → tuned) |")
        lines.append("|---|---|---|---|---|---|---|")
        for r in rows:
            st = r["stages"]
            walls = ", ".join(f"{k} {v['wall_seconds']:.1f}" for k, v in st.items())
            tr = st.get("train", {}).get("metrics", {})
            ev = st.get("evaluate", {}).get("metrics", {})

            def pair(key, digits):
                tuned = (ev.get("finetuned") or {}).get("overall", {}).get(key)
                base = (ev.get("base") or {}).get("overall", {}).get(key)
                fmt = (lambda x: "–" if x is None else f"{x:.{digits}f}")
                return f"{fmt(base)} → {fmt(tuned)}" if ev else ""

            lines.append(f"| {r['name']} | {walls} | {tr.get('tokens_per_s', float('nan')):,.0f} | "
                         f"{tr.get('peak_memory_gb', float('nan')):.2f} | {tr.get('final_loss', float('nan')):.4f} | "
                         f"{pair('bleu', 1)} | {pair('parent_f', 3)} |")
    else:
        keys = [k for k in rows[0] if k != "name" and not isinstance(rows[0][k], (list, dict))]
        lines.append("| run | " + " | ".join(keys) + " |")
        lines.append("|---" * (len(keys) + 1) + "|")
        for r in rows:
            cells = [f"{r.get(k):.4g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys]
            lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    with open(md, "a", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")


def run_queue(jobs: list, workers: list, work, too_late=None, skipped=None) -> list:
    """work(job, worker) for every job, one thread per worker pulling the next job off a shared queue (the
    runs that share GPUs side by side); a job taken once too_late() is true gets skipped(job) instead.
    Returns the outcomes in the order they finished."""
    import queue
    import threading

    todo: queue.Queue = queue.Queue()
    for job in jobs:
        todo.put(job)
    outcomes: list = []

    def worker(slot) -> None:
        while True:
            try:
                job = todo.get_nowait()
            except queue.Empty:
                return
            outcomes.append(skipped(job) if too_late is not None and too_late() else work(job, slot))

    threads = [threading.Thread(target=worker, args=(slot,)) for slot in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes
