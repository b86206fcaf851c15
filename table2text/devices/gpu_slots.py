"""One experiment per GPU: device `auto` claims a free GPU when several are visible.

When `dvc queue start -j N` runs N experiments at once on a host with N GPUs, every stage process whose
device is `auto` takes an exclusive lock on the lock file of one GPU and holds it for the rest of its
life. The lock is the operating system's (the `filelock` package: flock on POSIX, msvcrt.locking on
Windows), which it drops when the process ends, however it ends (exit, crash, kill), so a claim never
outlives its process. A process that finds every GPU claimed waits for one.

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

_held: dict[Path, tuple[object, int]] = {}  # lock folder -> (held FileLock, index) claimed by this process


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
    from filelock import FileLock, Timeout

    folder = Path(folder) if folder else lock_folder()
    if folder in _held:
        return _held[folder][1]
    folder.mkdir(parents=True, exist_ok=True)
    said = False
    while True:
        for index, name in enumerate(gpus):
            path = folder / f"gpu-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.lock"
            # fallback_to_soft=False: a "soft" lock (a file that exists) would outlive a crashed process
            lock = FileLock(path, thread_local=False, fallback_to_soft=False)
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue
            _held[folder] = (lock, index)  # kept referenced: the lock is held while the object lives
            return index
        if not said:
            print(f"gpu_slots: all {len(gpus)} GPUs are claimed by other runs (locks in {folder}); "
                  "waiting for one to be released", file=sys.stderr, flush=True)
            said = True
        time.sleep(poll_seconds)
