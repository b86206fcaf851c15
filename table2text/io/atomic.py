"""Atomic outputs: every file or folder a stage writes is written to a hidden temp next to it, then
renamed into place, so an interrupted or failed stage never leaves a truncated file that DVC would
record, and (with `staged_outputs`) a stage's outputs change together or not at all.

  * `write_atomic` / `write_json` / `write_jsonl`  one file;
  * `staged_outputs()`  several files and folders: all are written to temps first (where a full disk or
    a read-only folder shows), then all renamed; any error removes the temps and leaves the previous set;
  * `staged_dir(target)`  one folder (a model, an adapter) built in a temp folder, renamed into place;
  * `clean_leftovers(folder, prefix)`  temps of interrupted runs (their process is gone) removed by the
    next run; the temp names carry the writer's process id, so another live run's temps are kept;
  * `check_writable(folder)` / `check_free_space(folder, needed)`  checked before long work;
  * OS errors while writing (disk full, read-only file system, permission denied, a directory where a
    file should be) become one `OutputError` line naming the path and what to do.

Files get the permissions a plain open() would give them (0666 less the umask, 0644 typically) and
folders those of a plain mkdir (0777 less the umask), not mkstemp's / mkdtemp's private 0600 / 0700.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from table2text.errors import UserError


class OutputError(UserError, OSError):
    """An output that cannot be written; the message is one line naming the path and what to do."""


# errno -> what to do about it
_ADVICE = {
    errno.ENOSPC: "no space left on the device: free some space or write elsewhere",
    errno.EDQUOT: "disk quota exceeded: free some space or write elsewhere",
    errno.EROFS: "read-only file system: write to a writable folder (or remount it read-write)",
    errno.EACCES: "permission denied: make the folder writable for this user, or write elsewhere",
    errno.EPERM: "operation not permitted: make the folder writable for this user, or write elsewhere",
    errno.EISDIR: "a directory is in the way of a file: remove or rename it",
    errno.ENOTDIR: "a file is in the way of a folder on this path: remove or rename it",
    errno.EEXIST: "a file is in the way of a folder on this path: remove or rename it",
    errno.ENAMETOOLONG: "the path is too long: use a shorter one",
}
# The same faults as libraries word them when they wrap the OSError (safetensors: "SafetensorError:
# Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })").
_MESSAGES = {os.strerror(code): code for code in _ADVICE}


def output_error(err: BaseException, path: str | Path, what: str = "") -> BaseException:
    """`err` as an OutputError naming `path` when it is an OS fault (an OSError, or a library error
    that wraps one); any other error is returned as it is."""
    code = getattr(err, "errno", None) if isinstance(err, OSError) else None
    if isinstance(err, OutputError):
        return err
    if code is None:
        text = str(err)
        code = next((c for message, c in _MESSAGES.items() if message in text), None)
        if code is None and not isinstance(err, OSError):
            return err
    advice = _ADVICE.get(code, "check the path and the disk")
    reason = (err.strerror if isinstance(err, OSError) and err.strerror else os.strerror(code) if code else str(err))
    label = f" ({what})" if what else ""
    out = OutputError(f"{Path(path).as_posix()}{label}: cannot write: {reason}: {advice}")
    out.errno = code
    return out


def current_umask() -> int:
    """The process umask. Linux shows it in /proc; elsewhere it can only be read by setting it (and
    setting it back at once)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    return 0o777 & ~current_umask()


def fix_permissions(folder: Path) -> None:
    """Give `folder`, its sub-folders and files the modes of a plain mkdir / open() (mkdtemp makes 0700,
    and libraries that write through a temp file leave 0600)."""
    folder = Path(folder)
    os.chmod(folder, dir_mode())
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), dir_mode())
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, file_mode())


# --------------------------------------------------------------------------------------------------
# Temp names and leftovers


def temp_prefix(name: str, sep: str = "-") -> str:
    """Hidden prefix of this process's temps for output `name`: ".NAME-PID-" (folders) or ".NAME.PID-"
    (files, sep "."); the process id tells a later run whether the writer is still alive."""
    return f".{name}{sep}{os.getpid()}-"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        import psutil

        return psutil.pid_exists(pid)
    except ImportError:  # pragma: no cover - psutil is pinned; os.kill(pid, 0) would kill on Windows
        return os.name == "posix" and _posix_alive(pid)


def _posix_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


_PID = re.compile(r"(\d+)-")


def clean_leftovers(folder: str | Path, prefix: str) -> list[str]:
    """Remove the entries of `folder` named `prefix`... (e.g. ".merged-", ".train.jsonl.") that an
    interrupted run left: those whose writer process (the number after the prefix) is gone, and those
    without a process id (written by older versions). Returns the names removed."""
    folder = Path(folder)
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:  # no folder yet: nothing left over
        return removed
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        match = _PID.match(entry.name[len(prefix):])
        if match and _alive(int(match.group(1))):
            continue  # a live run's temp (a parallel experiment): not ours to remove
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry.name)
    return removed


def clean_output_leftovers(path: str | Path) -> list[str]:
    """The leftovers of every kind of temp this module makes for output `path` (file or folder)."""
    path = Path(path)
    removed = []
    for prefix in (f".{path.name}.", f".{path.name}-"):
        removed += clean_leftovers(path.parent, prefix)
    return removed


# --------------------------------------------------------------------------------------------------
# Up-front checks


def check_writable(folder: str | Path, what: str = "output folder") -> Path:
    """Prove a file can be created in `folder` (or, while it does not exist yet, in the folder that will
    hold it: nothing is created); an OutputError otherwise (a read-only file system, no permission, a
    file in the way). Call it before long work."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{folder.as_posix()} ({what}): cannot write: {existing.as_posix()} is a file, not a "
                          "folder: remove or rename it")
    try:
        fd, probe = tempfile.mkstemp(prefix=temp_prefix("write-test", "."), suffix=".tmp", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise output_error(err, folder, what) from None
    return folder


def check_free_space(folder: str | Path, needed: int, what: str = "the output") -> None:
    """Refuse to start writing what the disk cannot hold: a half-written output is only lost time."""
    folder = Path(folder)
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise OutputError(f"{folder.as_posix()}: not enough disk space for {what}: needs about {needed:,} bytes "
                          f"({needed / 2**30:.2f} GiB), {free:,} bytes free ({free / 2**30:.2f} GiB): free some "
                          "space or write elsewhere")


# --------------------------------------------------------------------------------------------------
# Writing


def _write_temp(path: Path, text: str) -> Path:
    """`text` in a hidden temp file next to `path`, on disk, with a plain file's permissions."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name, "."), suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise output_error(err, path) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())  # data on disk before the rename: a power cut cannot leave an empty file
        os.chmod(tmp, file_mode())
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise output_error(err, path) from err
        raise
    return Path(tmp)


def _rename(tmp: Path, path: Path) -> None:
    try:
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise output_error(err, path) from err


def write_atomic(path: Path, text: str) -> None:
    path = Path(path)
    clean_leftovers(path.parent, f".{path.name}.")
    _rename(_write_temp(path, text), path)


def json_text(obj, *, sort_keys: bool = False) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=sort_keys) + "\n"


def jsonl_text(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_json(path: Path, obj, *, sort_keys: bool = False) -> None:
    write_atomic(path, json_text(obj, sort_keys=sort_keys))


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_atomic(path, jsonl_text(rows))


def replace_dir(tmp: Path, target: Path) -> None:
    """Put the finished folder `tmp` at `target`; a reader never sees a half-written `target`. The
    folder gets a plain mkdir's permissions first (mkdtemp's are 0700), and once it is in place the
    temps that interrupted earlier runs left next to it (".NAME-*", ".NAME.*") are removed."""
    tmp, target = Path(tmp), Path(target)
    try:
        fix_permissions(tmp)
    except OSError as err:
        raise output_error(err, target) from err
    old = None
    try:
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}-")
            os.replace(target, old)
        os.replace(tmp, target)
    except OSError as err:
        if old is not None and not target.exists():
            os.replace(old, target)  # put the previous folder back
        raise output_error(err, target) from err
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    clean_output_leftovers(target)


def _new_temp_dir(target: Path) -> Path:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        clean_output_leftovers(target)
        return Path(tempfile.mkdtemp(prefix=temp_prefix(target.name), dir=target.parent))
    except OSError as err:
        raise output_error(err, target) from None


def _finish_dir(tmp: Path, target: Path) -> None:
    replace_dir(tmp, target)


@contextlib.contextmanager
def staged_dir(target: str | Path) -> Iterator[Path]:
    """A temp folder next to `target` to fill; on success it gets a plain mkdir's permissions and
    replaces `target` whole; on any error (a disk-full OSError or a library's error wrapping one
    becomes an OutputError naming `target`) it is removed and `target` is left as it was. Temps of
    interrupted earlier runs are removed first."""
    target = Path(target)
    tmp = _new_temp_dir(target)
    try:
        yield tmp
        _finish_dir(tmp, target)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        converted = output_error(err, target) if isinstance(err, Exception) else err
        if converted is not err:
            raise converted from err
        raise


class StagedOutputs:
    """The outputs of one stage, written to temps and renamed together by `staged_outputs()`."""

    def __init__(self) -> None:
        self._files: list[tuple[Path, Path]] = []
        self._dirs: list[tuple[Path, Path]] = []
        self.last: Path | None = None  # the output being written: the one an OS fault is reported for

    def write(self, path: str | Path, text: str) -> None:
        """A text file (UTF-8, newline line ends) at `path`, put in place with the rest."""
        path = self.last = Path(path)
        clean_leftovers(path.parent, f".{path.name}.")
        self._files.append((_write_temp(path, text), path))

    def write_json(self, path: str | Path, obj, *, sort_keys: bool = False) -> None:
        self.write(path, json_text(obj, sort_keys=sort_keys))

    def write_jsonl(self, path: str | Path, rows: list[dict]) -> None:
        self.write(path, jsonl_text(rows))

    def folder(self, target: str | Path) -> Path:
        """A temp folder to fill, put at `target` with the rest."""
        target = self.last = Path(target)
        tmp = _new_temp_dir(target)
        self._dirs.append((tmp, target))
        return tmp

    def _commit(self) -> None:
        for tmp, target in self._dirs:
            _finish_dir(tmp, target)
        for tmp, path in self._files:
            _rename(tmp, path)
        self._files, self._dirs = [], []

    def _discard(self) -> None:
        for tmp, _ in self._files:
            tmp.unlink(missing_ok=True)
        for tmp, _ in self._dirs:
            shutil.rmtree(tmp, ignore_errors=True)
        self._files, self._dirs = [], []


@contextlib.contextmanager
def staged_outputs() -> Iterator[StagedOutputs]:
    """All-or-nothing outputs: everything written through the yielded object goes to temps; when the
    block ends without error they are renamed into place (renames do not need disk space, so a full
    disk shows while writing the temps, before any output changed); on an error they are removed and
    every previous output stays as it was."""
    stage = StagedOutputs()
    try:
        yield stage
    except BaseException as err:
        stage._discard()
        converted = output_error(err, stage.last) if isinstance(err, Exception) and stage.last else err
        if converted is not err:  # e.g. safetensors' "No space left on device" while filling a folder
            raise converted from err
        raise
    try:
        stage._commit()
    except BaseException:
        stage._discard()
        raise
