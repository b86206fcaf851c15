#!/usr/bin/env python3
"""Set-up and entry points, standard library only, so they work on a fresh machine (Linux, macOS, Windows).

    python3 run.py repro [dvc repro args]   run the pipeline (`dvc repro`) on the committed params
    python3 run.py test [pytest args]       run the test suite
    python3 run.py dvc ARGS...              any other dvc command inside the project's environment
    python3 run.py pull [TARGET ...]        dvc pull, with one clear message when the remote lacks the outputs
    python3 run.py infer ARGS...            python -m stages.infer (write a sentence for a table)
    python3 run.py score ARGS...            python -m stages.score (score a predictions file)

(On Windows: `py run.py ...` in PowerShell.) Each creates the virtual environment .venv from
requirements.txt on first use and reuses it afterwards; it re-installs only when requirements.txt, or the
torch build this machine needs, changes.

The torch build: PyPI's torch wheels for Linux x86_64 carry CUDA, but those for Windows are CPU-only. On
Windows with an NVIDIA GPU (found by nvidia-smi) the pinned torch is installed from PyTorch's own CUDA
wheel index instead, the newest CUDA build the driver supports; if there is none, set-up stops and says
what to do. TOTTO_TORCH_INDEX=<url> installs torch from that index instead; TOTTO_TORCH_INDEX=pypi keeps
PyPI's build (a CPU run on purpose).
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time
import venv
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"


def venv_paths(venv_dir: Path, os_name: str = os.name) -> tuple[Path, Path]:
    """(scripts folder, python) of a virtual environment: Scripts\\python.exe on Windows, bin/python elsewhere."""
    scripts = venv_dir / ("Scripts" if os_name == "nt" else "bin")
    return scripts, scripts / ("python.exe" if os_name == "nt" else "python")


BIN, PYTHON = venv_paths(VENV)
STAMP = VENV / ".requirements.sha256"
TORCH_INDEX = "https://download.pytorch.org/whl/"
# The CUDA builds PyTorch publishes for each pinned torch (https://pytorch.org/get-started/locally/, "Previous
# versions"), oldest first. Update with the pin: a pin missing here stops the Windows GPU set-up with a
# message rather than guessing an index.
CUDA_BUILDS = {"2.13.0": ("cu126", "cu128", "cu130")}


@dataclass(frozen=True)
class TorchPlan:
    """How to install torch: index=None means with requirements.txt from the default index (PyPI);
    `why` is printed; `stop` is a one-line instruction when no suitable build can be chosen."""

    index: str | None
    why: str
    stop: str | None = None


def torch_pin(requirements: str) -> str:
    match = re.search(r"^torch==([^\s#;]+)", requirements, re.M)
    if not match:
        raise ValueError("requirements.txt: no `torch==VERSION` line")
    return match.group(1)


def plan_torch(pin: str, platform: str, driver, override: str | None = None) -> TorchPlan:
    """Which torch build this machine needs. platform: sys.platform; driver: table2text.devices.nvidia.Driver or None."""
    if override == "pypi":
        return TorchPlan(None, "TOTTO_TORCH_INDEX=pypi: torch from PyPI as requirements.txt says")
    if override:
        return TorchPlan(override, f"TOTTO_TORCH_INDEX: torch=={pin} from {override}")
    if driver is None:
        return TorchPlan(None, "no NVIDIA GPU found (nvidia-smi): torch from PyPI, the pipeline runs on the CPU")
    if platform != "win32":
        # PyPI's Linux torch is the CUDA build; macOS has no CUDA at all.
        return TorchPlan(None, f"NVIDIA GPU found ({driver.found_by}): PyPI's torch for {platform} is used")
    instead = (f"install the newest NVIDIA driver and run again, or set TOTTO_TORCH_INDEX to a torch=={pin} "
               f"CUDA wheel index ({TORCH_INDEX}cuXXX), or TOTTO_TORCH_INDEX=pypi to run on the CPU")
    builds = CUDA_BUILDS.get(pin)
    if builds is None:
        return TorchPlan(None, "", stop=f"run.py: NVIDIA GPU found, but run.py does not know the CUDA builds of "
                                        f"torch=={pin} (CUDA_BUILDS in run.py): {instead}")
    if driver.cuda is None:
        return TorchPlan(None, "", stop=f"run.py: NVIDIA GPU found ({driver.found_by}) but nvidia-smi did not report "
                                        f"its CUDA version: {instead}")
    usable = [b for b in builds if (int(b[2:-1]), int(b[-1])) <= driver.cuda]
    if not usable:
        return TorchPlan(None, "", stop=f"run.py: the NVIDIA driver supports CUDA {driver.cuda[0]}.{driver.cuda[1]}, "
                                        f"older than every CUDA build of torch=={pin} ({', '.join(builds)}): {instead}")
    index = TORCH_INDEX + usable[-1]
    return TorchPlan(index, f"NVIDIA GPU found (driver supports CUDA {driver.cuda[0]}.{driver.cuda[1]}); PyPI has "
                            f"only CPU builds of torch for Windows: installing torch=={pin} from {index}")


def ensure_venv() -> None:
    from table2text.devices import nvidia  # standard library only, like this file

    requirements = (ROOT / "requirements.txt").read_text(encoding="utf-8")
    pin = torch_pin(requirements)
    plan = plan_torch(pin, sys.platform, nvidia.find_driver(), os.environ.get("TOTTO_TORCH_INDEX"))
    if plan.stop:
        raise SystemExit(plan.stop)
    wanted = hashlib.sha256((requirements + f"\ntorch index: {plan.index}").encode("utf-8")).hexdigest()
    if PYTHON.exists() and STAMP.exists() and STAMP.read_text(encoding="utf-8").strip() == wanted:
        return
    started = time.monotonic()
    if not PYTHON.exists():
        print(f"run.py: creating the virtual environment {VENV} (first run only)", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    print(f"run.py: {plan.why}", flush=True)
    pip = [str(PYTHON), "-m", "pip", "install", "-q"]
    if plan.index:
        # First, so that requirements.txt finds torch==pin satisfied (2.13.0+cu126 is a 2.13.0) and keeps
        # it; --force-reinstall replaces a CPU build installed earlier.
        print(f"run.py: installing torch=={pin} from {plan.index} (a download of a few GB)", flush=True)
        subprocess.run([*pip, "--force-reinstall", "--no-deps", f"torch=={pin}", "--index-url", plan.index],
                       check=True)
    pins = requirement_names(requirements)
    # pip -q prints nothing until it is done, so say what is coming and how long it takes
    print(f"run.py: installing {len(pins)} packages from requirements.txt into {VENV.name} ({', '.join(pins[:4])}, "
          f"...; with their dependencies; first run only, a few minutes: torch alone is a large download)",
          flush=True)
    subprocess.run([*pip, "-r", str(ROOT / "requirements.txt")], check=True)
    STAMP.write_text(wanted, encoding="utf-8")
    print(f"run.py: {VENV.name} ready in {time.monotonic() - started:.0f} s", flush=True)


def requirement_names(requirements: str) -> list[str]:
    """The packages requirements.txt pins, in its order (comments and options skipped)."""
    names = []
    for line in requirements.splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            names.append(re.split(r"[=<>!~\[;\s]", line, maxsplit=1)[0])
    return names


def project_modules(root: Path = ROOT) -> list[str]:
    """Module names of this project's Python files, as the warnings machinery sees them: stages.x,
    table2text.x.y and bench.x, the test modules by file name (pytest imports them so), and __main__ (a
    `python -m stages.x`)."""
    names = {"__main__", "run"}
    for package in ("stages", "table2text", "bench"):
        for p in (root / package).rglob("*.py"):
            parts = p.relative_to(root).with_suffix("").parts
            names.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    names.update(p.stem for p in (root / "tests").glob("*.py"))
    return sorted(names)


def encoding_warning_env(root: Path = ROOT) -> dict[str, str]:
    """Environment under which an open()/read_text()/write_text()/text-mode subprocess without an encoding
    in this project's code raises EncodingWarning as an error, in this process and every Python child
    (stages run by dvc, CLIs run by tests). Third-party code's own omissions stay ignored: the filters
    name the project's modules (Python's -W matches a module name exactly, so they are listed)."""
    filters = ["ignore::EncodingWarning"] + [f"error::EncodingWarning:{name}" for name in project_modules(root)]
    return {"PYTHONWARNDEFAULTENCODING": "1", "PYTHONWARNINGS": ",".join(filters)}


def test_command(rest: list[str]) -> list[str]:
    return [str(PYTHON), "-X", "warn_default_encoding", "-m", "pytest", "-q", *(rest or ["tests"])]


def main(argv: list[str]) -> int:
    # command -> what it runs inside .venv (the stages' modules import torch, dvc... from there)
    modules = {"pull": "stages.pull", "infer": "stages.infer", "score": "stages.score"}
    if not argv or argv[0] not in {"repro", "test", "dvc", *modules}:
        print(__doc__, file=sys.stderr)
        return 2
    ensure_venv()
    env = dict(os.environ)
    # Stages run as `python -m stages.<name>`: the environment's python must come first on PATH.
    env["PATH"] = str(BIN) + os.pathsep + env.get("PATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    # DVC's state database inside the project. Given here as an absolute path: DVC 3.67 resolves a relative
    # core.site_cache_dir against the current directory, which breaks `dvc exp run --queue/--temp` (they run
    # in .dvc/tmp/exps/...) and makes dvc in a subfolder start an empty one there.
    env.setdefault("DVC_SITE_CACHE_DIR", str(ROOT / ".dvc" / "site-cache"))
    command, rest = argv[0], argv[1:]
    if command == "repro":
        cmd = [str(PYTHON), "-m", "dvc", "repro", *rest]
    elif command == "dvc":
        cmd = [str(PYTHON), "-m", "dvc", *rest]
    elif command in modules:
        cmd = [str(PYTHON), "-m", modules[command], *rest]
    else:
        env.update(encoding_warning_env())
        cmd = test_command(rest)
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
