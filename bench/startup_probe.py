"""What a stage's fixed costs are made of, each in a new process: Python with torch and transformers
imported, the CUDA context, the tokenizer (transformers' build against the cached backend), the model's
load to the GPU (transformers' from_pretrained, as the stages call it), the CUDA context started in a
thread while the main thread loads the tokenizer (the overlap a stage could have), and whether a process
forked after importing peft and bitsandbytes can still use the GPU (for the warm-start helper).

    python -m bench.startup_probe [--model-dir DIR] [--out bench/results/startup]

Writes <date>-<gpu>-startup.json; each probe runs --attempts times (default 1), each in a new process. Numbers are seconds of wall time inside the probe process, plus the process's own wall.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

# Could the warm-start helper (table2text.warm_start) also import peft and bitsandbytes? Only if a child
# forked after those imports can still use the GPU: measured here, with the helper's NVML-based CUDA check.
FORK_AFTER_PEFT = """
import os, torch
os.environ['PYTORCH_NVML_BASED_CUDA_CHECK'] = '1'
from transformers.models.gemma3 import modeling_gemma3
t = time.perf_counter()
import peft, bitsandbytes
r['peft_bnb_import'] = time.perf_counter() - t
r['cuda_initialized_in_parent'] = torch.cuda.is_initialized()
pid = os.fork()
if pid == 0:
    try:
        x = torch.randn(256, 256, device='cuda')
        q, state = bitsandbytes.functional.quantize_4bit(x, quant_type='nf4')
        y = bitsandbytes.functional.dequantize_4bit(q, state)
        torch.cuda.synchronize()
        os._exit(0 if float((y - x).abs().mean()) < 0.2 else 3)
    except BaseException:
        import traceback; traceback.print_exc(); os._exit(4)
r['child_status'] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
"""

PROBES = {
    "imports": "import torch, transformers; from transformers import AutoModelForCausalLM",
    "cuda_context": "import torch; t = time.perf_counter(); torch.zeros(1, device='cuda'); "
                    "torch.cuda.synchronize(); r['cuda'] = time.perf_counter() - t",
    "tokenizer_built": "from table2text.model import tokenizer as T; t = time.perf_counter(); "
                       "T.load_tokenizer(M, cache=False); r['tokenizer'] = time.perf_counter() - t",
    "tokenizer_cached": "from table2text.model import tokenizer as T; T.load_tokenizer(M); t = time.perf_counter(); "
                        "T.load_tokenizer(M); r['tokenizer'] = time.perf_counter() - t",
    "cuda_then_tokenizer": "import torch; from table2text.model import tokenizer as T; t = time.perf_counter(); "
                           "torch.zeros(1, device='cuda'); torch.cuda.synchronize(); T.load_tokenizer(M); "
                           "r['both'] = time.perf_counter() - t",
    "cuda_beside_tokenizer": "import torch, threading; from table2text.model import tokenizer as T; "
                             "t = time.perf_counter(); th = threading.Thread(target=lambda: torch.zeros(1, device='cuda')); "
                             "th.start(); T.load_tokenizer(M); th.join(); torch.cuda.synchronize(); "
                             "r['both'] = time.perf_counter() - t",
    "model_fp32_cuda": "import torch; from table2text.model import sources as S; torch.zeros(1, device='cuda'); "
                       "t = time.perf_counter(); S.load_model(M, dtype=torch.float32, device=torch.device('cuda')); "
                       "torch.cuda.synchronize(); r['model'] = time.perf_counter() - t",
    "model_bf16_cuda": "import torch; from table2text.model import sources as S; torch.zeros(1, device='cuda'); "
                       "t = time.perf_counter(); S.load_model(M, dtype=torch.bfloat16, device=torch.device('cuda')); "
                       "torch.cuda.synchronize(); r['model'] = time.perf_counter() - t",
    "fork_after_peft_bnb": f"exec({FORK_AFTER_PEFT!r})",
}


def run_probe(name: str, model_dir: Path) -> dict:
    code = ("import json, sys, time; t0 = time.perf_counter(); r = {}; from pathlib import Path; "
            f"M = Path({str(model_dir)!r}); {PROBES[name]}; r['in_process'] = time.perf_counter() - t0; "
            "print('PROBE ' + json.dumps(r))")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8")
    wall = time.perf_counter() - start
    lines = [line for line in done.stdout.splitlines() if line.startswith("PROBE ")]
    if done.returncode or not lines:
        return {"name": name, "error": done.stderr[-1500:]}
    return {"name": name, "process_wall": round(wall, 3),
            **{k: round(v, 3) for k, v in json.loads(lines[-1][6:]).items()}}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, help="model folder (default: the packaged model)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/startup"))
    parser.add_argument("--only", nargs="*", help="run only these probes")
    parser.add_argument("--attempts", type=int, default=1, help="runs of each probe")
    args = parser.parse_args(argv)
    from bench import common
    from table2text.model.sources import resolve_model

    model_dir = args.model_dir or resolve_model("packaged")
    results = []
    for name in PROBES:
        if args.only and name not in args.only:
            continue
        for attempt in range(1, args.attempts + 1):
            results.append({**run_probe(name, model_dir), "attempt": attempt})
            print(json.dumps(results[-1]), flush=True)
    common.write_results(args.out, "startup", results,
                         {"command": "python -m bench.startup_probe " + " ".join(sys.argv[1:])})
    return results


if __name__ == "__main__":
    main()
