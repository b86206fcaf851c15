"""Is there an NVIDIA GPU, and which CUDA version does its driver support? Standard library only: run.py
asks before any package is installed (to pick the torch build), and the stages ask when torch sees no
GPU (to refuse a silent CPU run).

The answer comes from `nvidia-smi` (installed with the driver: on PATH on Linux, in System32 on Windows);
on Linux the driver's /proc/driver/nvidia/version also says a GPU is there when nvidia-smi is missing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class Driver:
    """An NVIDIA driver found on this machine: how it was found, and the newest CUDA it supports
    (None when only the kernel module was seen)."""

    found_by: str
    cuda: tuple[int, int] | None


def nvidia_smi_path(which: Callable[[str], str | None] = shutil.which, environ=os.environ,
                    is_file: Callable[[Path], bool] = Path.is_file) -> str | None:
    found = which("nvidia-smi")
    if found:
        return found
    if os.name == "nt" or "SystemRoot" in environ:  # the Windows driver puts it in System32, not always on PATH
        candidate = Path(environ.get("SystemRoot", r"C:\Windows")) / "System32" / "nvidia-smi.exe"
        if is_file(candidate):
            return str(candidate)
    return None


def parse_cuda_version(nvidia_smi_output: str) -> tuple[int, int] | None:
    """The "CUDA Version: 12.4" of nvidia-smi's header, as (12, 4)."""
    match = re.search(r"CUDA Version\s*:\s*(\d+)\.(\d+)", nvidia_smi_output)
    return (int(match.group(1)), int(match.group(2))) if match else None


def find_driver(run=subprocess.run, which: Callable[[str], str | None] = shutil.which, environ=os.environ,
                is_file: Callable[[Path], bool] = Path.is_file) -> Driver | None:
    """The NVIDIA driver of this machine, or None if there is none (the arguments are for tests)."""
    smi = nvidia_smi_path(which, environ, is_file)
    if smi:
        try:
            out = run([smi], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=30)
        except (OSError, subprocess.SubprocessError):
            out = None
        if out is not None and out.returncode == 0:
            return Driver(found_by=smi, cuda=parse_cuda_version(out.stdout))
        # nvidia-smi present but failing (no GPU attached, driver not loaded): not a usable GPU
        return None
    proc = Path("/proc/driver/nvidia/version")
    if is_file(proc):
        return Driver(found_by=str(proc), cuda=None)
    return None
