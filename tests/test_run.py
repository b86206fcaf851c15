"""run.py's set-up decisions, with fakes for nvidia-smi and the platform (no network, no GPU needed):
which torch build a machine gets, and when set-up stops with an instruction instead."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

import run
from table2text.devices import nvidia

SMI_HEADER = """\
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 561.09                 Driver Version: 561.09         CUDA Version: 12.6     |
|-----------------------------------------+------------------------+----------------------+
|   0  NVIDIA GeForce RTX 4050 ...  WDDM  |   00000000:01:00.0  On |                  N/A |
"""


def fake_run(stdout: str, returncode: int = 0):
    calls = []

    def _run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, returncode, stdout=stdout, stderr="")

    _run.calls = calls
    return _run


def test_nvidia_smi_on_path_gives_the_driver_cuda_version():
    run_ = fake_run(SMI_HEADER)
    driver = nvidia.find_driver(run=run_, which=lambda name: "/usr/bin/nvidia-smi", environ={})
    assert driver == nvidia.Driver(found_by="/usr/bin/nvidia-smi", cuda=(12, 6))
    assert run_.calls == [["/usr/bin/nvidia-smi"]]


def test_on_windows_nvidia_smi_is_found_in_system32_when_not_on_path():
    wanted = Path(r"C:\Windows") / "System32" / "nvidia-smi.exe"
    driver = nvidia.find_driver(run=fake_run(SMI_HEADER), which=lambda name: None,
                                environ={"SystemRoot": r"C:\Windows"}, is_file=lambda p: p == wanted)
    assert driver is not None and driver.found_by == str(wanted) and driver.cuda == (12, 6)


def test_no_nvidia_smi_and_no_driver_means_no_gpu():
    assert nvidia.find_driver(run=fake_run(""), which=lambda name: None, environ={}, is_file=lambda p: False) is None


def test_a_failing_nvidia_smi_means_no_usable_gpu():
    assert nvidia.find_driver(run=fake_run("No devices were found", 6), which=lambda n: "nvidia-smi", environ={}) is None


def test_linux_kernel_module_without_nvidia_smi_is_a_gpu_of_unknown_cuda():
    proc = Path("/proc/driver/nvidia/version")
    driver = nvidia.find_driver(run=fake_run(""), which=lambda n: None, environ={}, is_file=lambda p: p == proc)
    assert driver == nvidia.Driver(found_by=str(proc), cuda=None)


def test_the_pin_is_read_from_requirements():
    assert run.torch_pin((run.ROOT / "requirements.txt").read_text(encoding="utf-8")) in run.CUDA_BUILDS
    with pytest.raises(ValueError, match="torch=="):
        run.torch_pin("numpy==2.0\n")


WINDOWS_GPU = nvidia.Driver("nvidia-smi", (12, 6))


def test_windows_with_a_gpu_installs_the_newest_cuda_build_the_driver_supports():
    plan = run.plan_torch("2.13.0", "win32", nvidia.Driver("nvidia-smi", (12, 9)))
    assert plan.stop is None and plan.index == "https://download.pytorch.org/whl/cu128"
    assert "installing torch==2.13.0 from https://download.pytorch.org/whl/cu128" in plan.why
    assert run.plan_torch("2.13.0", "win32", WINDOWS_GPU).index.endswith("/cu126")
    assert run.plan_torch("2.13.0", "win32", nvidia.Driver("nvidia-smi", (13, 1))).index.endswith("/cu130")


@pytest.mark.parametrize("driver, pin, says", [
    (nvidia.Driver("nvidia-smi", (11, 8)), "2.13.0", "supports CUDA 11.8, older than every CUDA build"),
    (nvidia.Driver("nvidia-smi", None), "2.13.0", "did not report its CUDA version"),
    (WINDOWS_GPU, "9.9.9", "does not know the CUDA builds of torch==9.9.9"),
])
def test_windows_with_a_gpu_and_no_suitable_build_stops_with_one_line(driver, pin, says):
    plan = run.plan_torch(pin, "win32", driver)
    assert plan.index is None and says in plan.stop and "\n" not in plan.stop
    assert "TOTTO_TORCH_INDEX" in plan.stop  # says what to do


@pytest.mark.parametrize("platform, driver", [("linux", WINDOWS_GPU), ("win32", None), ("darwin", None), ("linux", None)])
def test_elsewhere_torch_comes_from_pypi(platform, driver):
    plan = run.plan_torch("2.13.0", platform, driver)
    assert plan.index is None and plan.stop is None and plan.why


def test_the_index_can_be_overridden_or_pypi_kept_on_purpose():
    assert run.plan_torch("2.13.0", "win32", WINDOWS_GPU, "https://example.org/whl/cu999").index == \
        "https://example.org/whl/cu999"
    assert run.plan_torch("2.13.0", "win32", nvidia.Driver("nvidia-smi", (11, 0)), "pypi").index is None


def test_ensure_venv_installs_the_cuda_build_first_then_requirements(tmp_path, monkeypatch):
    python = tmp_path / "venv" / "python"
    python.parent.mkdir()
    python.write_text("", encoding="utf-8")
    monkeypatch.setattr(run, "PYTHON", python)
    monkeypatch.setattr(run, "STAMP", tmp_path / "venv" / "stamp")
    monkeypatch.setattr(run.sys, "platform", "win32")
    monkeypatch.setattr(nvidia, "find_driver", lambda: WINDOWS_GPU)
    monkeypatch.delenv("TOTTO_TORCH_INDEX", raising=False)
    commands = []
    monkeypatch.setattr(run.subprocess, "run", lambda cmd, **kw: commands.append(cmd))
    run.ensure_venv()
    assert commands[0][-4:] == ["--no-deps", "torch==2.13.0", "--index-url", "https://download.pytorch.org/whl/cu126"]
    assert commands[1][-2] == "-r"
    run.ensure_venv()  # the stamp now matches: nothing reinstalled
    assert len(commands) == 2
    monkeypatch.setattr(nvidia, "find_driver", lambda: None)  # same requirements, other torch build wanted
    run.ensure_venv()
    assert len(commands) == 3 and commands[2][-2] == "-r"


def test_a_first_install_says_what_it_is_doing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(run, "VENV", tmp_path / ".venv")
    monkeypatch.setattr(run, "PYTHON", tmp_path / ".venv" / "python")  # missing: the venv is created
    monkeypatch.setattr(run, "STAMP", tmp_path / "stamp")
    monkeypatch.setattr(run.venv, "EnvBuilder", lambda **kw: type("B", (), {"create": lambda self, d: None})())
    monkeypatch.setattr(nvidia, "find_driver", lambda: None)
    monkeypatch.delenv("TOTTO_TORCH_INDEX", raising=False)
    monkeypatch.setattr(run.subprocess, "run", lambda cmd, **kw: None)
    run.ensure_venv()
    lines = capsys.readouterr().out.splitlines()
    pins = run.requirement_names((run.ROOT / "requirements.txt").read_text(encoding="utf-8"))
    assert pins[:2] == ["torch", "transformers"] and "pytest" in pins and len(pins) > 10
    assert lines[0].startswith("run.py: creating the virtual environment")
    assert any(f"installing {len(pins)} packages from requirements.txt" in line for line in lines)
    assert lines[-1].startswith("run.py: .venv ready in ")


def test_requirement_names_skip_comments_options_and_markers():
    assert run.requirement_names("# c\n--index-url x\na==1  # why\nb[extra]>=2; sys_platform == 'win32'\n\nc\n") == \
        ["a", "b", "c"]


def test_ensure_venv_stops_with_the_instruction(monkeypatch):
    monkeypatch.setattr(run.sys, "platform", "win32")
    monkeypatch.setattr(nvidia, "find_driver", lambda: nvidia.Driver("nvidia-smi", (11, 8)))
    monkeypatch.delenv("TOTTO_TORCH_INDEX", raising=False)
    with pytest.raises(SystemExit, match="older than every CUDA build"):
        run.ensure_venv()
