"""`dvc pull` that says plainly when the remote does not hold the committed outputs.

    python -m stages.pull [TARGET ...] [-r REMOTE]      (or: python3 run.py pull [TARGET ...])

On a fresh clone, `dvc pull` of outputs that were never pushed ends in DVC's list of missing cache files
and "Checkout failed". This first checks, for every cached output that dvc.lock records (or those under
the TARGETs, e.g. models/adapter), that the local cache or the remote holds that exact version. If one is
missing nowhere can it come from: one message naming the outputs and the remote and what to do (push
them from the machine that trained, or rebuild them with `python3 run.py repro`), exit status 2, nothing
pulled. Otherwise it runs `dvc pull` with the same arguments.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path


def wanted(path: str, targets: list[str]) -> bool:
    """Whether an output at `path` is one of the targets (or inside / around one); all when no targets."""
    if not targets:
        return True
    path = Path(path).as_posix().rstrip("/")
    for target in targets:
        target = Path(target).as_posix().rstrip("/")
        if path == target or path.startswith(target + "/") or target.startswith(path + "/"):
            return True
    return False


def missing_outputs(repo, targets: list[str], remote: str | None) -> tuple[list[str], list[str]]:
    """(outputs neither the local cache nor the remote holds, outputs dvc.lock records no version of)."""
    missing, unrecorded = [], []
    odbs = {}
    for out in repo.index.outs:
        if not out.use_cache or not wanted(str(out.def_path), targets):
            continue  # cache: false outputs live in git
        if not out.hash_info or not out.hash_info.value:
            unrecorded.append(str(out.def_path))
            continue
        value = out.hash_info.value
        if out.cache.exists(value):
            continue
        if out.hash_name not in odbs:
            odbs[out.hash_name] = repo.cloud.get_remote_odb(remote, "pull", hash_name=out.hash_name)
        if not odbs[out.hash_name].exists(value):
            missing.append(str(out.def_path))
    return missing, unrecorded


def remote_description(repo, remote: str | None) -> str:
    name = remote or repo.config["core"].get("remote")
    if not name:
        return "no default remote"
    url = repo.config.get("remote", {}).get(name, {}).get("url", "?")
    return f"remote '{name}' ({url})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 run.py pull", description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="*", help="outputs to pull (default: every output dvc.lock records)")
    parser.add_argument("-r", "--remote", help="remote to pull from (default: core.remote)")
    args = parser.parse_args(argv)

    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo() as repo:
            missing, unrecorded = missing_outputs(repo, args.targets, args.remote)
            where = remote_description(repo, args.remote)
    except DvcException as err:
        print(f"pull: error: {err}", file=sys.stderr)
        return 2
    if unrecorded:
        print(f"pull: dvc.lock records no version of {', '.join(unrecorded)}: nothing to pull; produce them with "
              "`python3 run.py repro`", file=sys.stderr)
        return 2
    if missing:
        it, was = ("it", "was") if len(missing) == 1 else ("they", "were")
        print(f"pull: the {where} does not hold the committed version of {', '.join(missing)} (nor does the "
              f"local cache): {it} {was} never pushed. On the machine that produced {'it' if it == 'it' else 'them'} "
              f"run `python3 run.py dvc push`; or rebuild {'it' if it == 'it' else 'them'} here with "
              "`python3 run.py repro`.", file=sys.stderr)
        return 2
    command = [sys.executable, "-m", "dvc", "pull", *(["-r", args.remote] if args.remote else []), *args.targets]
    return subprocess.run(command, env=dict(os.environ)).returncode


if __name__ == "__main__":
    sys.exit(main())
