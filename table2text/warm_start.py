"""Warm start: the model stages' imports paid once per `dvc repro`, not once per stage.

DVC runs every stage as a new process, and each of train, merge and evaluate spends most of its fixed cost
importing torch and transformers' Gemma 3 model code before it does anything (BENCHMARKS.md, "Seventh
session": 14.9 s in a new process on an H200 host). Where the operating system can fork (Linux, macOS), the
first stage of a run starts a helper process that imports them once and then waits on a private socket;
each later stage hands its command line, folder, environment and terminal to it, and the helper forks a
child that runs the stage exactly as `python -m stages.<name>` would, with those imports already done. The
stage's own process relays signals and returns the child's exit status, so DVC, a terminal or a script
sees the same process behaviour and the same outputs (tests/test_warm_start.py runs stages both ways and
compares the files).

What a child inherits is only third-party code as imported: the project's modules (table2text, stages)
are imported afresh from disk in each child, CUDA is never touched in the helper (a child creates its own
context), and the helper is keyed by the interpreter, sys.path, the versions on disk of the libraries it
imports and the environment variables those libraries read at import time; a change to any of them starts
a new helper. The helper exits after TOTTO_WARM_START_IDLE seconds (default 300) without a stage.
TOTTO_WARM_START=0 turns all of this off; on Windows (no fork) every stage runs in its own process as
before. Only processes of the same user can connect: the socket lives in a folder of mode 0700 and the
helper checks the peer's uid.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import select
import signal
import socket
import sys
import threading
import time
from pathlib import Path

STAGES = ("preprocess", "train", "merge", "evaluate", "export")  # the DVC stages (user CLIs run as before)
PRELOAD = ("torch", "transformers", "transformers.models.gemma3.modeling_gemma3")
# Libraries whose import reads these variables (HF_HUB_OFFLINE, TORCH_HOME, CUDA_VISIBLE_DEVICES, ...):
# a helper imported under other values would not be the process the stage asked for.
ENV_PREFIXES = ("HF_", "HUGGINGFACE", "TRANSFORMERS", "TORCH", "PYTORCH", "CUDA", "NVIDIA", "TOKENIZERS",
                "OMP_", "MKL", "LD_", "PYTHON", "LANG", "LC_", "TOTTO_WARM")
DEFAULT_IDLE = 300.0
STARTING_WAIT = 60.0  # seconds a stage waits for a helper that is still importing
STARTED_ENV = "TOTTO_PROCESS_STARTED"  # the stage's own start, for phases' start-up time in a child
CHILD_ENV = "TOTTO_WARM_CHILD"  # set in a stage the helper runs: its helper's socket path
# Parsed tokenizer backends the helper holds for its children: file -> (its stat when read, Tokenizer).
_PRELOADED: dict[str, tuple[tuple, object]] = {}
_HELPER_STARTED: Path | None = None  # the socket of the helper this stage started (it runs here itself)


def enabled() -> bool:
    return hasattr(os, "fork") and hasattr(socket, "AF_UNIX") and hasattr(socket, "send_fds") \
        and os.environ.get("TOTTO_WARM_START", "1") != "0"


def idle_seconds() -> float:
    return float(os.environ.get("TOTTO_WARM_START_IDLE", DEFAULT_IDLE))


def key() -> str:
    """What the helper's imports depend on: interpreter, import path, the libraries' files, their env."""
    libraries = []
    for name in ("torch", "transformers", "tokenizers", "safetensors", "huggingface_hub"):
        spec = importlib.util.find_spec(name)  # locates without importing
        origin = spec.origin if spec and spec.origin else ""
        libraries.append((name, origin, os.stat(origin).st_mtime_ns if origin else 0))
    env = sorted((k, v) for k, v in os.environ.items() if k.startswith(ENV_PREFIXES))
    text = json.dumps([sys.executable, sys.version, sys.path, libraries, env])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def socket_dir() -> Path:
    # Short on purpose: a Unix socket's path is limited to about 100 bytes.
    base = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
    return Path(base) / f"totto-warm-{os.getuid()}"


def private_dir() -> Path:
    """The socket folder, created 0700; refused if another user owns it or others can enter it."""
    folder = socket_dir()
    folder.mkdir(mode=0o700, exist_ok=True)
    info = folder.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise PermissionError(f"{folder}: not a private folder of this user; warm start needs one")
    return folder


# ------------------------------------------------------------------------------------------ the stage's side
def stage_module(argv: list[str]) -> str | None:
    """`python -m stages.<stage> ...` -> 'stages.<stage>' for the DVC stages, else None."""
    for flag_at, word in enumerate(argv[:-1]):
        if word == "-m":
            module = argv[flag_at + 1]
            return module if module.split(".") == ["stages", module.split(".")[-1]] and \
                module.split(".")[-1] in STAGES else None
    return None


def handoff() -> None:
    """Called first by stages/__init__.py: run this stage in the warm helper and exit with its status; or,
    where there is none yet, start one for the next stages and return (this stage then runs here)."""
    module = stage_module(getattr(sys, "orig_argv", []))
    if module is None or not enabled() or os.environ.get(CHILD_ENV):
        return
    path = private_dir() / f"{key()}.sock"
    connection = _connect(path) or _wait_for_starting(path)
    if connection is None:
        _start_helper(path)
        return
    raise SystemExit(_run_there(connection, module))


def _connect(path: Path) -> socket.socket | None:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.connect(str(path))
    except OSError:  # no helper (yet), or one that has exited: this stage runs in its own process
        client.close()
        return None
    return client


def _wait_for_starting(path: Path) -> socket.socket | None:
    """A helper still importing: wait for it. It started before this process and imports the same
    libraries, so it is ready before this process's own imports would be. None: no helper is starting,
    or it died, or it took longer than STARTING_WAIT seconds."""
    starting = path.with_suffix(".starting")
    deadline = time.monotonic() + STARTING_WAIT
    while (pid := _starting_pid(starting)) is not None:
        if not _alive(pid) or time.monotonic() > deadline:
            return None
        time.sleep(0.05)
        connection = _connect(path)
        if connection is not None:
            return connection
    return _connect(path)  # the helper finished importing (or failed) just now


def _starting_pid(starting: Path) -> int | None:
    try:
        text = starting.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else 0  # 0: the starter is writing the pid right now


def _alive(pid: int) -> bool:
    if pid == 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _start_helper(path: Path) -> None:
    import subprocess

    global _HELPER_STARTED

    starting = path.with_suffix(".starting")
    for _ in range(2):  # one helper per key, also when two stages start together
        try:
            fd = os.open(starting, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            break
        except FileExistsError:  # left by a helper that died while importing (a live one was waited for)
            starting.unlink(missing_ok=True)
    else:
        return
    # The helper's log is appended to, not an output: no atomic write (table2text.io.atomic) is meant here.
    log = os.open(path.with_suffix(".log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    helper = subprocess.Popen([sys.executable, "-m", "table2text.warm_start", str(path)],
                              stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, close_fds=True)
    os.close(log)
    os.write(fd, str(helper.pid).encode("ascii"))
    os.close(fd)
    _HELPER_STARTED = path
    print(f"warm start: helper pid {helper.pid} imports torch and transformers once for the next stages; it exits "
          f"after {idle_seconds():.0f} s unused (TOTTO_WARM_START=0 turns this off)", file=sys.stderr)


def _run_there(connection: socket.socket, module: str) -> int:
    """Hand this process's command, folder, environment and stdio to the helper; relay signals; return
    the child's exit status as this process's own."""
    started = _own_start()
    request = {"module": module, "argv": sys.argv[1:],  # sys.argv[0] is "-m" while the package imports
               "orig_argv": sys.orig_argv, "cwd": os.getcwd(), "path0": sys.path[0],
               "env": {**os.environ, STARTED_ENV: repr(started)}}
    payload = json.dumps(request).encode("utf-8")
    socket.send_fds(connection, [len(payload).to_bytes(8, "big")], [0, 1, 2])
    connection.sendall(payload)
    reader = connection.makefile("r", encoding="utf-8")
    child = int(json.loads(reader.readline())["pid"])
    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, lambda sig, _frame: _forward(connection, sig))
    line = reader.readline()
    if not line:  # the helper died under the child; say so rather than guess an outcome
        print(f"warm start: the helper lost stage {module} (child pid {child}); run it with TOTTO_WARM_START=0",
              file=sys.stderr)
        return 1
    code = os.waitstatus_to_exitcode(int(json.loads(line)["wait_status"]))
    return code if code >= 0 else 128 - code  # killed by signal N: status 128 + N, as a shell reports it


def _forward(connection: socket.socket, number: int) -> None:
    connection.sendall((json.dumps({"signal": int(number)}) + "\n").encode("utf-8"))


def _own_start() -> float:
    return process_started() or time.time()  # no psutil: the start-up phase then begins at the hand-off


def process_started() -> float | None:
    """When this stage's process started (epoch seconds): under warm start the stage's own process, not
    the forked child; None where psutil is missing."""
    handed = os.environ.get(STARTED_ENV)
    if handed:
        return float(handed)
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().create_time()


# ------------------------------------------------------------------------- parsed tokenizers, kept warm
def note_tokenizer_backend(backend_file: Path) -> None:
    """A stage loaded this serialised tokenizer backend (table2text.model.tokenizer's cache): tell its
    helper, which parses it once and holds it for the stages it forks after (parsing Gemma's 262k-token
    backend costs about a second a stage). Only a hint, in a file beside the socket: nothing without a
    helper, and a failure to write it changes nothing but speed."""
    helper = os.environ.get(CHILD_ENV) or _HELPER_STARTED
    if not helper or not enabled():
        return
    hint = Path(helper).with_suffix(".preload")
    text = str(Path(backend_file).resolve())
    from table2text.io.atomic import write_atomic

    try:
        if not (hint.is_file() and hint.read_text(encoding="utf-8") == text):
            write_atomic(hint, text)  # the helper never reads half a hint
    except OSError:
        pass


def take_tokenizer_backend(backend_file: Path):
    """In a stage the helper forked: the helper's parsed tokenizers.Tokenizer of backend_file, if it holds
    one and the file is the one it read (same size, mtime, inode); else None (parse the file). Each is
    given out once, so two tokenizers of one stage never share a backend's padding and truncation state."""
    held = _PRELOADED.pop(str(Path(backend_file).resolve()), None)
    if held is None:
        return None
    signature, backend = held
    try:
        if _signature(Path(backend_file)) != signature:
            return None
    except OSError:
        return None
    helper = os.environ.get(CHILD_ENV)
    if helper:  # one line in the helper's log (appended to, not an output), so a run can be checked
        try:
            log = os.open(Path(helper).with_suffix(".log"), os.O_WRONLY | os.O_APPEND)
            os.write(log, _stamped(f"pid {os.getpid()}: tokenizer backend from the helper\n").encode("utf-8"))
            os.close(log)
        except OSError:
            pass
    return backend


def _signature(file: Path) -> tuple:
    info = os.stat(file)
    return info.st_size, info.st_mtime_ns, info.st_ino, info.st_dev


def _preload(hint: Path) -> None:
    """In the helper, between stages: parse the tokenizer backend the last stage named, once (a file that
    cannot be parsed is not tried again: its stages parse it themselves)."""
    try:
        name = hint.read_text(encoding="utf-8").strip()
    except OSError:
        return  # no hint yet
    if not name or name in _PRELOADED:
        return
    from tokenizers import Tokenizer

    _PRELOADED.clear()  # one model's tokenizer at a time: the one this project's stages load now
    try:
        signature = _signature(Path(name))  # before reading: a file replaced meanwhile will not match
        _PRELOADED[name] = (signature, Tokenizer.from_file(name))
        _log(f"tokenizer backend {name} parsed for the next stages")
    except Exception as error:  # a hint only
        _PRELOADED[name] = (None, None)  # matches no file: take_tokenizer_backend gives nothing
        _log(f"tokenizer backend {name} not parsed ({type(error).__name__}: {error})")


# ------------------------------------------------------------------------------------------ the helper's side
def serve(path: Path) -> None:
    """The helper: import PRELOAD, listen on `path`, fork a child per stage, exit when idle."""
    starting = path.with_suffix(".starting")
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"  # torch.cuda.is_available() without creating a context
    try:
        for name in PRELOAD:
            __import__(name)
        import torch

        if torch.cuda.is_initialized():  # a forked child could not use the GPU
            raise RuntimeError("CUDA was initialised while importing; warm start needs it untouched")
        listener, inode = _listen(path)
    finally:
        starting.unlink(missing_ok=True)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the per-stage watchers are reaped by the kernel
    _log(f"ready: pid {os.getpid()}, {', '.join(PRELOAD)} imported, threads {threading.active_count()}")
    last = time.monotonic()
    while time.monotonic() - last < idle_seconds() and _still_ours(path, inode):
        _preload(path.with_suffix(".preload"))  # while no stage waits: a stage in flight runs in its child
        ready, _, _ = select.select([listener], [], [], min(5.0, idle_seconds()))
        if not ready:
            continue
        connection, _ = listener.accept()
        if _peer_uid(connection) == os.getuid() and os.fork() == 0:
            listener.close()
            _watch(connection, path)  # never returns
        connection.close()
        last = time.monotonic()
    if _still_ours(path, inode):
        path.unlink(missing_ok=True)


def _listen(path: Path) -> tuple[socket.socket, int]:
    """Bind under a temporary name, then rename: a stage connects only to a helper that is ready."""
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    temporary.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(temporary))
    listener.listen(16)
    os.replace(temporary, path)
    return listener, os.stat(path).st_ino


def _still_ours(path: Path, inode: int) -> bool:
    """False once the socket file is removed or another helper's replaces it: then this one exits."""
    try:
        return os.stat(path).st_ino == inode
    except OSError:
        return False


def _peer_uid(connection: socket.socket) -> int | None:
    if hasattr(socket, "SO_PEERCRED"):  # Linux: (pid, uid, gid) of the process that connected
        import struct

        raw = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return struct.unpack("3i", raw)[1]
    return os.getuid()  # macOS: the 0700 folder is the check (getpeereid is not in Python's socket)


def _watch(connection: socket.socket, path: Path) -> None:
    """Per stage: receive the request, fork the child that runs it, relay signals, send its wait status."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    header, fds, _, _ = socket.recv_fds(connection, 8, 3)
    size, request = int.from_bytes(header, "big"), b""
    while len(request) < size:
        request += connection.recv(size - len(request))
    request = {**json.loads(request.decode("utf-8")), "socket": str(path)}
    child = os.fork()
    if child == 0:
        connection.close()
        _run_stage(request, fds)  # never returns
    for fd in fds:
        os.close(fd)
    _log(f"{request['module']} in {request['cwd']}: child pid {child}")
    connection.sendall((json.dumps({"pid": child}) + "\n").encode("utf-8"))
    reader = connection.makefile("r", encoding="utf-8")
    while True:
        done, status = os.waitpid(child, os.WNOHANG)
        if done:
            break
        ready, _, _ = select.select([connection], [], [], 0.05)
        if ready:
            line = reader.readline()
            if not line:  # the stage's process is gone (killed): its child must not run on unseen
                os.kill(child, signal.SIGTERM)
                continue
            os.kill(child, int(json.loads(line)["signal"]))
    _log(f"{request['module']}: child pid {child} exit status {os.waitstatus_to_exitcode(status)}")
    try:
        connection.sendall((json.dumps({"wait_status": status}) + "\n").encode("utf-8"))
    finally:
        os._exit(0)


def _log(message: str) -> None:
    """The helper's log (<key>.log beside its socket): which stages it ran and how they ended."""
    print(_stamped(message), flush=True)


def _stamped(message: str) -> str:
    return f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}"


def _run_stage(request: dict, fds: list[int]) -> None:
    """In the forked child: become `python -m <module> ...` in the stage's folder, environment and stdio."""
    import runpy

    status, interrupted = 1, False
    try:
        _become(request, fds)
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
        status = 0
    except SystemExit as stop:
        status = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else _say(stop.code))
    except BaseException as error:  # what the interpreter prints for an uncaught exception
        import traceback

        traceback.print_exc()
        interrupted = isinstance(error, KeyboardInterrupt)
    finally:
        import atexit

        atexit._run_exitfuncs()  # what a normal interpreter exit runs; then no teardown (phases.exit_process)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        if interrupted:  # as the interpreter does: end by SIGINT, so the caller sees status 130
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        os._exit(status)


def _become(request: dict, fds: list[int]) -> None:
    os.setsid()  # out of the helper's session: the stage's process relays signals to this one
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    os.environ[CHILD_ENV] = request["socket"]
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=stream.isatty())
    held = dict(_PRELOADED)
    for name in [m for m in sys.modules if m.split(".")[0] in ("table2text", "stages")]:
        del sys.modules[name]  # the project's code comes from disk, as in a new process
    sys.path[0] = request["path0"]
    import importlib

    # The stage imports this module first anyway (stages/__init__.py); from disk, it receives what the
    # helper parsed.
    importlib.import_module("table2text.warm_start")._PRELOADED.update(held)
    sys.argv = [request["module"], *request["argv"]]
    sys.orig_argv = request["orig_argv"]
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _say(message) -> int:
    print(message, file=sys.stderr)
    return 1


if __name__ == "__main__":
    serve(Path(sys.argv[1]))
