"""The Windows laptop the recipe was written for (issue 19), simulated on Linux: no fcntl, os.name 'nt' and
sys.platform 'win32' code paths, a model folder whose path has non-ASCII letters and spaces, Windows paths
in params.yaml, and the POSIX-only tests skipped there with their reason. Nothing here ran on Windows
itself (README, "Windows")."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path, PureWindowsPath

import pytest
import torch

import conftest
import run
from table2text.training import distributed
from table2text.devices import gpu_slots
from table2text.model import sources as model_sources
from table2text.devices import nvidia
from stages import train as train_stage
from table2text.config import ConfigError
from table2text.errors import run_cli
from table2text.params import load_params
from table2text.io.readers import read_processed
from table2text.training import checkpoints, loop, memory
from table2text.training.loop import train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _two_threads():
    torch.set_num_threads(2)  # the CPU is shared


class WindowsSys:
    """sys as table2text.model.sources sees it on Windows (only there: libraries imported meanwhile, such as
    filelock, must keep their Linux code paths, which they choose from the real sys.platform)."""

    platform = "win32"

    def __getattr__(self, name):
        return getattr(sys, name)


# --------------------------------------------------------------------------------------- no fcntl
def test_no_project_module_imports_a_posix_only_module():
    posix_only = {"fcntl", "resource", "termios", "pwd", "grp", "posix"}
    found = []
    for path in sorted([REPO / "run.py", *REPO.glob("stages/*.py"), *REPO.glob("table2text/**/*.py"), *REPO.glob("bench/*.py")]):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                if name and name.split(".")[0] in posix_only:
                    # allowed only inside a try whose except handles its absence (memory.peak_memory_gb)
                    found.append(f"{path.relative_to(REPO).as_posix()}: {name}")
    assert found == ["table2text/training/memory.py: resource"], found


def test_the_stages_import_and_claim_gpus_without_fcntl(tmp_path):
    """In a fresh interpreter where `import fcntl` fails (as on Windows), the modules import, and the GPU
    claim takes whatever lock filelock provides there (its Windows lock is msvcrt.locking; here a fake of
    it: one holder per file, a Timeout for anyone else)."""
    code = f"""
import sys
sys.modules["fcntl"] = None  # import fcntl now raises ImportError, as on Windows
import filelock
held = set()
class MsvcrtLikeLock:
    def __init__(self, path, **kwargs):
        self.path = str(path)
    def acquire(self, timeout):
        if self.path in held:
            raise filelock.Timeout(self.path)
        held.add(self.path)
filelock.FileLock = MsvcrtLikeLock
held.add({str(tmp_path / "gpu-0.lock")!r})  # another run holds GPU 0
from table2text.devices import gpu_slots
from table2text.model import sources as model_sources
from stages import train
from table2text.training import distributed
print(gpu_slots.claim(["0", "1"], {str(tmp_path)!r}), gpu_slots.claim(["0", "1"], {str(tmp_path)!r}))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, encoding="utf-8", timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "1"]


def test_the_gpu_lock_is_the_operating_systems_with_no_soft_fallback(tmp_path, monkeypatch):
    import filelock

    made = []

    class Recording(filelock.FileLock):
        def __init__(self, path, **kwargs):
            made.append(kwargs)
            super().__init__(path, **kwargs)

    monkeypatch.setattr(filelock, "FileLock", Recording)
    monkeypatch.setattr(gpu_slots, "_held", {})
    assert gpu_slots.claim(["0"], tmp_path) == 0
    # a soft lock (a file that exists) would outlive a crash; the claim must die with its process
    assert len(made) == 1 and made[0]["fallback_to_soft"] is False and made[0]["thread_local"] is False


def test_without_resource_the_cpu_peak_is_reported_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "resource", None)
    peak, kind = memory.peak_memory_gb(torch.device("cpu"))
    assert kind == "unavailable" and peak != peak  # NaN, not a made-up number


# ------------------------------------------------------------------------------ os.name 'nt' paths
def test_run_py_uses_the_windows_virtual_environment_layout():
    venv = Path("proj") / ".venv"
    assert run.venv_paths(venv, "nt") == (venv / "Scripts", venv / "Scripts" / "python.exe")
    assert run.venv_paths(venv, "posix") == (venv / "bin", venv / "bin" / "python")


def test_run_py_on_windows_with_the_laptop_gpu_installs_cuda_torch():
    smi = "Driver Version: 566.03      CUDA Version: 12.7"
    driver = nvidia.find_driver(run=lambda cmd, **kw: subprocess.CompletedProcess(cmd, 0, smi, ""),
                                which=lambda name: None, environ={"SystemRoot": r"C:\WINDOWS"},
                                is_file=lambda p: p.name == "nvidia-smi.exe")
    plan = run.plan_torch(run.torch_pin((REPO / "requirements.txt").read_text(encoding="utf-8")), "win32", driver)
    assert plan.index == "https://download.pytorch.org/whl/cu126" and plan.stop is None


def test_compile_layers_is_refused_on_windows_before_any_model_loads(monkeypatch, tmp_path, tiny_model_dir):
    monkeypatch.setattr(model_sources, "sys", WindowsSys())
    params = load_params(REPO / "params.yaml")
    params["train"].update(device="cpu", compile_layers=True)
    # loading the weights is made to fail: the refusal must come before it (only config.json is read)
    monkeypatch.setattr(model_sources, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    params["lora"]["target_modules"] = ["q_proj"]
    with pytest.raises(model_sources.DeviceError, match="^train.compile_layers: torch.compile is not supported here on Windows"):
        train(params, [{"prompt": "p", "completion": "c"}], None, checkpoint_dir=None, metrics_dir=None,
              model_dir=tiny_model_dir, progress=False)


def test_compiled_decoding_is_refused_on_windows_and_on_gpus_without_triton(monkeypatch):
    from table2text.generation import generate

    assert model_sources.compile_problem("x", torch.device("cuda"), platform="linux", has_triton=False) == \
        "x: torch.compile on a GPU needs Triton, which this environment lacks; set it to false"
    assert model_sources.compile_problem("x", torch.device("cuda"), platform="linux", has_triton=True) is None
    assert model_sources.compile_problem("x", torch.device("cpu"), platform="linux", has_triton=False) is None
    monkeypatch.setattr(model_sources, "sys", WindowsSys())
    with pytest.raises(ValueError, match="compile_decoding: torch.compile is not supported here on Windows"):
        generate(None, None, ["p"], 4, 1, device="cpu", cache="static", compile_decoding=True)


def test_without_nccl_the_process_group_is_gloo():
    assert distributed.backend(torch.device("cuda", 0), nccl_available=False) == "gloo"
    assert distributed.backend(torch.device("cuda", 0), nccl_available=True) == "nccl"
    assert distributed.backend(torch.device("cpu"), nccl_available=True) == "gloo"


def test_the_multi_gpu_relaunch_is_a_child_whose_exit_status_train_returns(monkeypatch, tmp_path):
    """os.execve on Windows starts a new process and returns at once, so dvc would see the stage end
    before training did; a child process is waited for, and its status is the stage's."""
    seen = []

    def child_command(num_procs, module, argv):
        seen.append((num_procs, module, argv))
        return [sys.executable, "-c", "import sys; print('ranks ran'); sys.exit(3)"]

    monkeypatch.setattr(distributed, "launch_command", child_command)
    assert distributed.relaunch(2, "stages.train", ["--params", "p.yaml"]) == 3
    params = load_params(REPO / "params.yaml")
    params["train"].update(num_gpus=2, device="cpu")
    (tmp_path / "p.yaml").write_text(json.dumps(params), encoding="utf-8")  # JSON is YAML
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(SystemExit) as stop:
        train_stage.main(["--params", str(tmp_path / "p.yaml")])
    assert stop.value.code == 3
    assert seen[-1] == (2, "stages.train", ["--params", str(tmp_path / "p.yaml")])


def test_auto_with_a_gpu_present_but_a_cpu_torch_is_refused_in_one_line(monkeypatch, capsys):
    """PyPI's Windows torch has no CUDA: the laptop's GPU would sit idle while training ran on the CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    laptop = lambda: nvidia.Driver(found_by=r"C:\WINDOWS\System32\nvidia-smi.exe", cuda=(12, 7))  # noqa: E731
    with pytest.raises(model_sources.DeviceError) as err:
        model_sources.pick_device("auto", find_driver=laptop)
    message = str(err.value)
    assert "\n" not in message and message.startswith("device auto: an NVIDIA GPU is present")
    assert "CPU-only build" in message and "py run.py repro" in message and "device: cpu" in message
    with pytest.raises(model_sources.DeviceError, match="^device cuda: an NVIDIA GPU is present"):
        model_sources.pick_device("cuda", find_driver=laptop)
    # no GPU at all: the CPU, said once on stderr
    monkeypatch.setattr(model_sources, "_SAID_DEVICE", set())
    assert model_sources.pick_device("auto", find_driver=lambda: None) == torch.device("cpu")
    assert model_sources.pick_device("auto", find_driver=lambda: None) == torch.device("cpu")
    assert capsys.readouterr().err.count("device: cpu (device auto: no NVIDIA GPU on this machine)") == 1


def test_posix_only_tests_are_skipped_on_windows_with_their_reason():
    class Item:
        def __init__(self, marker):
            self.marker, self.added = marker, []

        def get_closest_marker(self, name):
            return self.marker if name == "posix_only" else None

        def add_marker(self, mark):
            self.added.append(mark)

    items = [Item(pytest.mark.posix_only("SIGKILL").mark), Item(None)]
    assert conftest.skip_posix_only(items, os_name="posix") == 0 and not items[0].added
    assert conftest.skip_posix_only(items, os_name="nt") == 1
    assert items[0].added[0].kwargs["reason"] == "POSIX only: SIGKILL" and not items[1].added


def test_every_test_that_sends_sigkill_is_marked_posix_only():
    unmarked = []
    for path in sorted(REPO.glob("tests/test_*.py")):
        if path.name == "test_windows.py":  # this file only names them
            continue
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                kills = "signal.SIGKILL" in ast.unparse(node) or "pipeline_run" in [a.arg for a in node.args.args]
                marked = any("posix_only" in ast.unparse(d) for d in node.decorator_list)
                if kills and not marked:
                    unmarked.append(f"{path.name}::{node.name}")
    assert not unmarked, unmarked


# ------------------------------------------------------------- a model path with non-ASCII and spaces
def test_a_model_folder_named_with_non_ascii_letters_and_spaces_trains_and_is_recorded(
        tiny_model_dir, processed_dir, tmp_path):
    folder = tmp_path / "Александр José" / "m"
    shutil.copytree(tiny_model_dir, folder)
    params = load_params(REPO / "params.yaml")
    params["model"]["name"] = str(folder)
    params["train"].update(quantization="none", effective_batch=2, max_steps=1, device="cpu",
                           cpu_micro_batch_tokens=128, micro_batch_tokens=128)
    # written and read back as a user's params.yaml would be
    (tmp_path / "params.yaml").write_text(
        (REPO / "params.yaml").read_text(encoding="utf-8").replace("name: packaged", f"name: '{folder}'"),
        encoding="utf-8")
    assert load_params(tmp_path / "params.yaml")["model"]["name"] == str(folder)
    records = read_processed(processed_dir / "train.jsonl")[:2]
    train(params, records, tmp_path / "adapter", checkpoint_dir=tmp_path / "ckpt", metrics_dir=None,
          dvclive=False, progress=False)
    info = json.loads((tmp_path / "adapter" / "training_info.json").read_text(encoding="utf-8"))
    assert info["base_model"]["name"] == str(folder)
    key = checkpoints.run_key(params, model_sources.weights_sha256(folder), loop.records_sha256(records))
    assert checkpoints.find_checkpoint(tmp_path / "ckpt", key) is not None  # a resume point a rerun would take


# ------------------------------------------------------------------------- Windows paths in params
def test_windows_paths_in_params_are_read_verbatim_or_named_with_the_fix(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("model:\n  name: C:\\Users\\José\\models\\gemma\ndata:\n  path: 'D:\\data\\totto'\n",
                    encoding="utf-8")
    params = load_params(path)
    assert params["model"]["name"] == r"C:\Users\José\models\gemma"  # plain and single-quoted: verbatim
    assert PureWindowsPath(params["data"]["path"]).parts == ("D:\\", "data", "totto")
    path.write_text('model:\n  name: "C:\\Users\\José\\models"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_params(path)
    message = str(err.value)
    assert message.startswith(f"{path.as_posix()}:2:") and "\n" not in message
    assert "write it with / or in single quotes" in message


def test_train_names_a_bad_params_file_in_one_line(tmp_path, capsys):
    path = tmp_path / "params.yaml"
    path.write_text('model:\n  name: "C:\\Users\\x"\n', encoding="utf-8")
    assert run_cli(train_stage.main, "train", ["--params", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"train: error: {path.as_posix()}:2:") and err.count("\n") == 1
