"""One experiment per GPU: device `auto` claims a free GPU when several are visible.

When `dvc queue start -j N` runs N experiments at once on a host with N GPUs, every stage process whose
device is `auto` takes an exclusive lock (fcntl.flock) on the lock file of one GPU and holds it for the
rest of its life; the kernel drops the lock when the process ends, however it ends (exit, crash, kill),
so a claim never outlives its process. A process that finds every GPU claimed waits for one.

The lock files live in $TOTTO_GEMMA_GPU_LOCKS, or <temp dir>/totto-gemma-gpu-locks; a GPU's file is
named after its CUDA_VISIBLE_DEVICES entry (its index when that variable is unset), so processes that
see the same GPUs agree on the names. Only this project's processes take these locks: a GPU busy with
another program does not look busy here.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from pathlib import Path

_held: dict[Path, tuple[int, int]] = {}  # lock folder -> (open lock file, index) claimed by this process


def lock_folder() -> Path:
    env = os.environ.get("TOTTO_GEMMA_GPU_LOCKS")
    return Path(env) if env else Path(tempfile.gettempdir()) / "totto-gemma-gpu-locks"


def visible_gpus(count: int) -> list[str]:
    """Names of the `count` GPUs this process sees: its CUDA_VISIBLE_DEVICES entries, else 0..count-1."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None:
        return [str(i) for i in range(count)]
    return [name.strip() for name in env.split(",") if name.strip()][:count]


def claim(gpus: list[str], folder: Path | None = None, poll_seconds: float = 2.0) -> int:
    """Index into `gpus` of a GPU this process now holds alone (the same one on every call); waits,
    polling, while all are held."""
    import fcntl  # POSIX only; imported here so that importing this module works everywhere

    folder = Path(folder) if folder else lock_folder()
    if folder in _held:
        return _held[folder][1]
    folder.mkdir(parents=True, exist_ok=True)
    said = False
    while True:
        for index, name in enumerate(gpus):
            path = folder / f"gpu-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.lock"
            fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)  # flock needs no write access
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            _held[folder] = (fd, index)
            return index
        if not said:
            print(f"gpu_slots: all {len(gpus)} GPUs are claimed by other runs (locks in {folder}); "
                  "waiting for one to be released", file=sys.stderr, flush=True)
            said = True
        time.sleep(poll_seconds)
