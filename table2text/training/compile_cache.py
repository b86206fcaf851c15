"""A persistent compile cache in a stated folder, so that a second run does not compile again.

torch.compile keeps what inductor produced (FX graph cache: the generated kernels' code; AOTAutograd
cache: the forward/backward graphs; Triton's compiled kernels; autotuning results) on disk under
TORCHINDUCTOR_CACHE_DIR (torch's documented setting; default /tmp/torchinductor_<user>, which a fresh
host or a tmp cleaner loses). This points it at .cache/torch-compile in the project (git-ignored, no DVC
output). The caches are keyed by torch's own hashes of the graph, input shapes, config, torch/Triton
version and GPU, so a stale entry is never used; deleting the folder only costs the next run its
compilation. Dynamo still traces each process (seconds); the compilation proper is what is saved.
A TORCHINDUCTOR_CACHE_DIR already set (by the user) is left as it is.
"""

from __future__ import annotations

import os
from pathlib import Path

COMPILE_CACHE_DIR = Path(".cache/torch-compile")
ENV = "TORCHINDUCTOR_CACHE_DIR"


def use_compile_cache(folder: Path | None = None) -> Path:
    """Point inductor's on-disk caches at `folder` (default .cache/torch-compile under the working
    directory) unless TORCHINDUCTOR_CACHE_DIR is set; returns the folder in use. Call it before the first
    compilation of the process: inductor reads the setting when it first writes or looks up an entry."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    path = Path(folder if folder is not None else COMPILE_CACHE_DIR).resolve()
    path.mkdir(parents=True, exist_ok=True)
    os.environ[ENV] = str(path)
    return path


def cache_counters() -> dict:
    """How this process's compilations used the cache so far: FX graph and AOTAutograd hits and misses."""
    from torch._dynamo.utils import counters

    return {"fx_graph_hit": counters["inductor"]["fxgraph_cache_hit"],
            "fx_graph_miss": counters["inductor"]["fxgraph_cache_miss"],
            "aot_autograd_hit": counters["aot_autograd"]["autograd_cache_hit"],
            "aot_autograd_miss": counters["aot_autograd"]["autograd_cache_miss"]}
