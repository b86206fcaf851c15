"""table2text.io.atomic: all-or-nothing outputs, leftovers of interrupted runs, OS faults as one line,
permissions. Tests run as root, where chmod does not stop a write: read-only folders, permission
denied and full disks are simulated by making the OS calls raise what the OS would."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path

import pytest

from table2text.io import atomic as atomic_io
from table2text.io.atomic import OutputError, check_free_space, check_writable, clean_leftovers, staged_dir, staged_outputs

DEAD_PID = 2**22 + 12345  # above Linux's pid_max default: never a live process


def previous_set(folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {"train.jsonl": "old train\n", "validation.jsonl": "old validation\n", "preprocess.json": "{}\n"}
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
    return files


def contents(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in folder.iterdir()}


def fail_on_call(n: int, exc: BaseException):
    """A stand-in for os.fsync that raises `exc` on its n-th call (1-based) and syncs otherwise."""
    real, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == n:
            raise exc
        real(fd)

    return fsync


# ------------------------------------------------------------------------------------------ all or nothing


def test_staged_outputs_change_together(tmp_path):
    previous_set(tmp_path)
    with staged_outputs() as stage:
        stage.write_jsonl(tmp_path / "train.jsonl", [{"a": 1}])
        stage.write_jsonl(tmp_path / "validation.jsonl", [{"b": 2}])
        stage.write_json(tmp_path / "preprocess.json", {"ok": True})
        assert contents(tmp_path)["train.jsonl"] == "old train\n"  # nothing renamed before the block ends
    assert contents(tmp_path) == {"train.jsonl": '{"a": 1}\n', "validation.jsonl": '{"b": 2}\n',
                                  "preprocess.json": '{\n  "ok": true\n}\n'}


@pytest.mark.parametrize("failing_write", [1, 2, 3])
def test_a_full_disk_at_any_output_leaves_the_previous_set(tmp_path, monkeypatch, failing_write):
    before = previous_set(tmp_path)
    monkeypatch.setattr(atomic_io.os, "fsync", fail_on_call(failing_write, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    names = ["train.jsonl", "validation.jsonl", "preprocess.json"]
    with pytest.raises(OutputError) as err:
        with staged_outputs() as stage:
            for name in names:
                stage.write(tmp_path / name, "new\n")
    assert str(err.value) == (f"{(tmp_path / names[failing_write - 1]).as_posix()}: cannot write: No space left on "
                              "device: no space left on the device: free some space or write elsewhere")
    assert contents(tmp_path) == before  # no temp file left either


def test_an_error_after_some_outputs_are_staged_leaves_the_previous_set(tmp_path):
    before = previous_set(tmp_path)
    with pytest.raises(ValueError, match="a bad validation record"):
        with staged_outputs() as stage:
            stage.write(tmp_path / "train.jsonl", "new\n")
            raise ValueError("a bad validation record")
    assert contents(tmp_path) == before


def test_a_directory_where_an_output_file_goes_is_named(tmp_path):
    (tmp_path / "eval.json").mkdir()
    with pytest.raises(OutputError, match=r"eval.json: cannot write: Is a directory: a directory is in the way of "
                                          r"a file: remove or rename it$"):
        atomic_io.write_json(tmp_path / "eval.json", {})
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]


# ------------------------------------------------------------------------------------------ up-front checks


@pytest.mark.parametrize("code, advice", [
    (errno.EROFS, "Read-only file system: read-only file system: write to a writable folder"),
    (errno.EACCES, "Permission denied: permission denied: make the folder writable for this user"),
])
def test_an_unwritable_folder_is_named_before_any_work(tmp_path, monkeypatch, code, advice):
    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(atomic_io.tempfile, "mkstemp", refuse)  # as the OS refuses a new file there
    with pytest.raises(OutputError) as err:
        check_writable(tmp_path / "models", "models folder")
    assert str(err.value).startswith(f"{(tmp_path / 'models').as_posix()} (models folder): cannot write: {advice}")
    assert "\n" not in str(err.value)


def test_a_writable_folder_passes_and_is_left_clean(tmp_path):
    assert check_writable(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert list(tmp_path.iterdir()) == []  # nothing created: the folder that would hold it takes files
    (tmp_path / "file").write_text("x", encoding="utf-8")
    with pytest.raises(OutputError, match=r"file/sub \(output folder\): cannot write: \S+/file is a file, not a "
                                          r"folder: remove or rename it$"):
        check_writable(tmp_path / "file" / "sub")


def test_too_little_free_space_is_refused_with_both_numbers(tmp_path, monkeypatch):
    usage = type("usage", (), {"free": 1000})
    monkeypatch.setattr(atomic_io.shutil, "disk_usage", lambda path: usage)
    with pytest.raises(OutputError, match=r"not enough disk space for the merged model: needs about 2,000 bytes .* "
                                          r"1,000 bytes free"):
        check_free_space(tmp_path, 2000, "the merged model")
    check_free_space(tmp_path, 1000, "the merged model")


# ------------------------------------------------------------------------------------------ folders


def test_a_library_error_wrapping_a_full_disk_names_the_folder_and_keeps_the_previous(tmp_path):
    target = tmp_path / "merged"
    target.mkdir()
    (target / "model.safetensors").write_text("previous", encoding="utf-8")
    # safetensors words ENOSPC this way (SafetensorError is no OSError)
    wrapped = RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                           '"No space left on device" })')
    with pytest.raises(OutputError, match=r"merged: cannot write: No space left on device: no space left"):
        with staged_dir(target) as tmp:
            (tmp / "model.safetensors").write_text("half", encoding="utf-8")
            raise wrapped
    assert contents(target) == {"model.safetensors": "previous"} and sorted(os.listdir(tmp_path)) == ["merged"]


def test_an_error_that_is_no_os_fault_passes_unchanged(tmp_path):
    with pytest.raises(KeyError):
        with staged_dir(tmp_path / "adapter"):
            raise KeyError("a bug")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775),
                                                       (0o077, 0o600, 0o700)])
def test_a_staged_folder_gets_the_permissions_of_a_plain_mkdir(tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        with staged_dir(tmp_path / "adapter") as tmp:
            fd = os.open(tmp / "adapter_model.safetensors", os.O_CREAT | os.O_WRONLY, 0o600)  # as safetensors does
            os.close(fd)
            (tmp / "sub").mkdir(mode=0o700)
            (tmp / "sub" / "x.json").write_text("{}", encoding="utf-8")
    finally:
        os.umask(old)
    folder = tmp_path / "adapter"
    assert folder.stat().st_mode & 0o777 == dir_mode == (folder / "sub").stat().st_mode & 0o777
    for file in (folder / "adapter_model.safetensors", folder / "sub" / "x.json"):
        assert file.stat().st_mode & 0o777 == file_mode, file


# ------------------------------------------------------------------------------------------ leftovers


def test_leftovers_of_dead_runs_are_removed_and_a_live_runs_kept(tmp_path):
    dead = tmp_path / f".merged-{DEAD_PID}-abc"
    live = tmp_path / f".merged-{os.getpid()}-def"
    legacy = tmp_path / ".merged-k2j3h4"  # written before temps carried a pid
    for folder in (dead, live, legacy):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x" * 100)
    (tmp_path / "merged").mkdir()
    assert sorted(clean_leftovers(tmp_path, ".merged-")) == sorted([dead.name, legacy.name])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "merged"])


def test_the_next_run_removes_every_kind_of_leftover(tmp_path):
    """Leftovers of a killed write (a hidden temp file, a temp folder, an old folder set aside) go when the
    stage next writes that output."""
    for name in (f".eval.json.{DEAD_PID}-x.tmp", ".eval.json.abc.tmp", f".adapter-{DEAD_PID}-q", ".adapter-k2j3",
                 f".adapter.old-{DEAD_PID}-"):
        (tmp_path / name).mkdir() if "adapter" in name else (tmp_path / name).write_text("half", encoding="utf-8")
    atomic_io.write_json(tmp_path / "eval.json", {})
    with staged_dir(tmp_path / "adapter") as tmp:
        (tmp / "adapter_config.json").write_text("{}", encoding="utf-8")
    assert sorted(os.listdir(tmp_path)) == ["adapter", "eval.json"]


def test_replace_dir_gives_plain_permissions_and_removes_leftovers(tmp_path):
    """A stage builds its folder with tempfile.mkdtemp and atomic_io.replace_dir."""
    from table2text.io.atomic import replace_dir

    (tmp_path / ".merged-oldrun").mkdir()
    tmp = Path(tempfile.mkdtemp(prefix=".merged-", dir=tmp_path))
    (tmp / "config.json").write_text(json.dumps({}), encoding="utf-8")
    os.chmod(tmp / "config.json", 0o600)
    replace_dir(tmp, tmp_path / "merged")
    assert os.listdir(tmp_path) == ["merged"]
    umask = atomic_io.current_umask()
    assert (tmp_path / "merged").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "merged" / "config.json").stat().st_mode & 0o777 == 0o666 & ~umask
