"""Several GPUs without GPUs: the data-parallel train stage as 2 CPU processes over gloo (the same code the
GPUs run over NCCL), its batch arithmetic, and the one-experiment-per-GPU device claims."""

from __future__ import annotations

import concurrent.futures
import copy
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from table2text.training import distributed
from table2text.devices import gpu_slots
from stages import train as train_stage
from table2text.training.batching import encode_record
from table2text.training.packed_forward import PackedDecoder
from table2text.params import load_params
from table2text.training.loop import accumulate_gradients, train
from table2text.model.lora import build_model
from table2text.io.readers import read_processed
from table2text.training import checkpoints

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _two_threads():
    torch.set_num_threads(2)  # the CPU is shared


# ------------------------------------------------------------------------------- batch arithmetic
@pytest.mark.parametrize("n, world", [(16, 2), (5, 2), (7, 3), (1, 2), (3, 4)])
def test_rank_shares_cover_the_effective_batch_exactly_once(n, world):
    lengths = [(37 * i) % 11 + 1 for i in range(n)]
    shares = [distributed.shard(lengths, rank, world) for rank in range(world)]
    assert sorted(i for share in shares for i in share) == list(range(n))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1  # 5 over 2 ranks: 3 and 2; 1 over 2: 1 and 0


def test_shares_are_dealt_longest_first_so_the_ranks_get_about_the_same_tokens():
    lengths = [100, 90, 10, 5]
    assert distributed.shard(lengths, 0, 2) == [0, 3]  # 100 + 5
    assert distributed.shard(lengths, 1, 2) == [1, 2]  # 90 + 10
    assert distributed.shard(lengths, 0, 1) == [0, 1, 2, 3]  # one process: the whole batch, in order


def test_the_ranks_gradients_sum_to_the_one_process_gradient(tiny_model_dir, real_tokenizer, processed_dir):
    params = copy.deepcopy(load_params(REPO / "params.yaml"))
    params["train"]["quantization"] = "none"
    params["lora"]["dropout"] = 0.0
    examples = [encode_record(real_tokenizer, r) for r in read_processed(processed_dir / "train.jsonl")[:5]]
    torch.manual_seed(0)
    model = build_model(params, tiny_model_dir, torch.device("cpu"), torch.float32)
    for name, p in model.named_parameters():  # LoRA B starts at zero; make the test see all gradients
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    base = model.get_base_model()
    trainable = [p for p in model.parameters() if p.requires_grad]
    label_tokens = sum(len(ids) - p for ids, p in examples)

    def gradients(part):
        model.zero_grad(set_to_none=True)
        loss = accumulate_gradients(PackedDecoder(base.get_decoder()), base.lm_head.weight, part, 64, 1, 0,
                                    torch.device("cpu"), label_tokens=label_tokens)
        return loss, [p.grad.clone() for p in trainable]

    whole_loss, whole = gradients(examples)
    lengths = [len(ids) for ids, _ in examples]
    parts = [gradients([examples[i] for i in distributed.shard(lengths, rank, 2)]) for rank in range(2)]
    assert parts[0][0] + parts[1][0] == pytest.approx(whole_loss, rel=1e-5)
    for a, b, w in zip(parts[0][1], parts[1][1], whole):
        torch.testing.assert_close(a + b, w, rtol=1e-4, atol=1e-5 * float(w.abs().max()))


# ---------------------------------------------------------------------------------- the launch
@pytest.mark.parametrize("device, visible, message", [
    ("auto", 1, "train.num_gpus=2 but 1 CUDA GPU(s) are visible"),
    ("cuda:1", 4, "train.device must be auto, cuda or cpu, not 'cuda:1'"),
])
def test_more_gpus_than_the_host_has_is_a_clear_error(tmp_path, monkeypatch, capsys, device, visible, message):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    params = load_params(REPO / "params.yaml")
    params["train"].update(num_gpus=2, device=device)
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    with pytest.raises(SystemExit) as exit_:
        train_stage.main(["--params", str(tmp_path / "p.yaml")])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


# Installed (as sitecustomize) into the stage's processes: a torchrun worker of rank > 0 that creates,
# writes, renames or deletes anything inside the working folder records it and fails.
RANK_GUARD = '''
import os, sys
if os.environ.get("RANK", "0") != "0":
    _root, _log = os.getcwd() + os.sep, os.environ["WRITES_LOG"]
    _write = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    _changes = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate"}

    def _guard(event, args):
        if event == "open":
            writing = isinstance(args[2], int) and args[2] & _write
        else:
            writing = event in _changes
        path = args[0] if args else None
        if writing and isinstance(path, (str, os.PathLike)) and os.path.abspath(path).startswith(_root):
            with open(_log, "a") as fh:
                fh.write(f"rank {os.environ['RANK']}: {event} {path}\\n")
            raise PermissionError(f"rank {os.environ['RANK']} must not write {path}")

    sys.addaudithook(_guard)
'''


def stage_folder(tmp_path: Path, model_dir: Path, processed_dir: Path, **train_overrides) -> Path:
    """A working folder as `dvc repro` sees it: params.yaml and data/processed/train.jsonl (11 records)."""
    work = tmp_path / "work"
    (work / "data" / "processed").mkdir(parents=True)
    lines = (processed_dir / "train.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)[:11]
    (work / "data" / "processed" / "train.jsonl").write_text("".join(lines), encoding="utf-8")
    params = copy.deepcopy(load_params(REPO / "params.yaml"))
    params["model"]["name"] = str(model_dir)
    params["lora"]["dropout"] = 0.0  # no dropout: the ranks' masks differ from one process's
    params["train"].update(
        quantization="none", effective_batch=5, max_steps=5, save_steps=2, logging_steps=1, learning_rate=1e-3,
        warmup_ratio=0.0, device="cpu", micro_batch_tokens=128, cpu_micro_batch_tokens=128, num_gpus=2,
        # fp32 adapter matmuls: with bf16 ones (the default on this bf16 model) two ranks' sums round apart
        # from one process's by ~2e-3, which would blur the comparison this file makes
        lora_compute_dtype="float32",
    )
    params["train"].update(train_overrides)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    return work


def run_train_stage(work: Path, guard_dir: Path) -> subprocess.CompletedProcess:
    """`python -m stages.train` in `work`, exactly as dvc.yaml runs it."""
    guard_dir.mkdir(exist_ok=True)
    (guard_dir / "sitecustomize.py").write_text(RANK_GUARD, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(guard_dir), str(REPO)]),
           "WRITES_LOG": str(guard_dir / "writes.log")}
    result = subprocess.run([sys.executable, "-m", "stages.train", "--params", "params.yaml"], cwd=work, env=env,
                            capture_output=True, text=True, timeout=600, encoding="utf-8")
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def curve(metrics_dir: Path, name: str = "loss") -> list[tuple[int, float]]:
    with open(metrics_dir / "train" / "plots" / "metrics" / f"{name}.tsv", newline="", encoding="utf-8") as fh:
        return [(int(r["step"]), float(r[name])) for r in csv.DictReader(fh, delimiter="\t")]


def test_two_processes_train_what_one_does_rank_0_writes_and_a_resume_continues(
    tiny_model_dir, real_tokenizer, processed_dir, tmp_path
):
    # 11 records, effective batch 5: steps of 5, 5, 1 (rank 1 computes nothing), then 5, 5 (next epoch)
    work = stage_folder(tmp_path, tiny_model_dir, processed_dir)
    result = run_train_stage(work, tmp_path / "guard")
    assert "torch.distributed.run --standalone --nproc_per_node=2 -m stages.train" in result.stdout

    # (a) only rank 0 wrote: rank 1 ran under a guard that refuses and logs any write in the folder
    assert not (tmp_path / "guard" / "writes.log").exists()
    adapter = {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "training_info.json", "README.md"}
    checkpoint = {"adapter.safetensors", "optimizer.pt", "scheduler.pt", "state.json", "rng.pt", "rng-rank1.pt"}
    assert files_under(work / "models") == {f"adapter/{f}" for f in adapter}
    assert files_under(work / "checkpoints") == {f"step-00000{s}/{f}" for s in (4, 5) for f in checkpoint}
    stats = json.loads((work / "metrics" / "train.json").read_text(encoding="utf-8"))
    runtime = json.loads((work / "metrics" / "runtime" / "train.json").read_text(encoding="utf-8"))  # how it ran: not DVC-tracked
    assert runtime["world_size"] == 2 and stats["steps"] == 5 and stats["samples"] == 5 + 5 + 1 + 5 + 5

    # (b) the same adapter and loss curve as one process with the same effective batch and seed
    params = load_params(work / "params.yaml")
    one = train(params, read_processed(work / "data" / "processed" / "train.jsonl"), tmp_path / "one" / "adapter",
                checkpoint_dir=None, metrics_dir=tmp_path / "one" / "metrics", model_dir=tiny_model_dir,
                tokenizer=real_tokenizer, progress=False)
    assert one["world_size"] == 1 and one["samples"] == stats["samples"] and one["tokens"] == stats["tokens"]
    two_adapter = load_file(work / "models" / "adapter" / "adapter_model.safetensors")
    one_adapter = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    assert two_adapter.keys() == one_adapter.keys()
    # The two runs pack their rows differently, so their sums differ in fp32 rounding, and Adam turns a
    # rounding-level gradient of either sign into a full-size step: measured, the adapters differ by 1.5-2%
    # of the trained (lora_B) weights' norm, as do one-process runs with other micro-batch sizes. A lost or
    # doubled share of the batch would differ by tens of percent; the loss and gradient-norm curves below
    # are checked to 1e-4 and 1e-3.
    trained = [k for k in one_adapter if "lora_B" in k]
    diff = sum(float((two_adapter[k] - one_adapter[k]).norm() ** 2) for k in trained) ** 0.5
    size = sum(float(one_adapter[k].norm() ** 2) for k in trained) ** 0.5
    assert diff / size < 0.05
    for k in one_adapter:
        if k not in trained:  # lora_A: moved by the same updates from the same seeded start
            torch.testing.assert_close(two_adapter[k], one_adapter[k], rtol=0, atol=5e-3)
    two_curve, one_curve = curve(work / "metrics"), curve(tmp_path / "one" / "metrics")
    assert [s for s, _ in two_curve] == [1, 2, 3, 4, 5]
    assert [v for _, v in two_curve] == pytest.approx([v for _, v in one_curve], rel=1e-4)
    # the gradient norm before clipping: the ranks' gradients were summed, not averaged (Adam and clipping
    # would hide a factor in the adapter)
    assert [v for _, v in curve(work / "metrics", "grad_norm")] == pytest.approx(
        [v for _, v in curve(tmp_path / "one" / "metrics", "grad_norm")], rel=1e-3)

    # (c) a crash during step 5 (its checkpoint never written; dvc deletes the outputs) resumes at step 4
    shutil.copytree(work / "models" / "adapter", tmp_path / "uninterrupted")
    shutil.rmtree(work / "checkpoints" / "step-000005")
    shutil.rmtree(work / "models")
    shutil.rmtree(work / "metrics")
    result = run_train_stage(work, tmp_path / "guard")
    assert "resuming from checkpoints/step-000004 (step 4 of 5, 2 process(es))" in result.stdout + result.stderr
    assert not (tmp_path / "guard" / "writes.log").exists()
    resumed = json.loads((work / "metrics" / "runtime" / "train.json").read_text(encoding="utf-8"))
    assert resumed["resumed_from_step"] == 4 and resumed["samples"] == stats["samples"]
    assert json.loads((work / "metrics" / "train.json").read_text(encoding="utf-8")) == stats  # the same tracked metrics
    a = load_file(tmp_path / "uninterrupted" / "adapter_model.safetensors")
    b = load_file(work / "models" / "adapter" / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0)
    assert curve(work / "metrics") == two_curve


def test_each_rank_resumes_its_own_dropout_random_state(tiny_model_dir, tmp_path):
    params = copy.deepcopy(load_params(REPO / "params.yaml"))
    params["train"]["quantization"] = "none"
    cpu = torch.device("cpu")
    model = build_model(params, tiny_model_dir, cpu, torch.float32)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    states = []
    for rank in range(2):
        torch.manual_seed(100 + rank)
        states.append(checkpoints.rng_state(cpu))
    checkpoints.save_checkpoint(tmp_path, 3, "key", model, optimizer, scheduler, {"world_size": 2}, states)

    def next_draw(rank):
        state = checkpoints.load_checkpoint(tmp_path / "step-000003", model, optimizer, scheduler, cpu, rank)
        return state["rng_restored"], torch.rand(4)

    restored, draw = next_draw(1)
    torch.manual_seed(101)
    assert restored and torch.equal(draw, torch.rand(4))
    restored, draw = next_draw(0)
    torch.manual_seed(100)
    assert restored and torch.equal(draw, torch.rand(4))
    assert next_draw(2)[0] is False  # a third process has no state of its own in a 2-process checkpoint


# --------------------------------------------------------------------------- one experiment per GPU
CLAIMER = """
import sys
from pathlib import Path
from table2text.devices import gpu_slots
gpus, folder = sys.argv[1].split(","), Path(sys.argv[2])
print(gpu_slots.claim(gpus, folder, poll_seconds=0.05), gpu_slots.claim(gpus, folder), flush=True)
sys.stdin.read()  # hold the GPU until the test closes stdin (or kills this process)
"""


def start_claimer(gpus: str, folder: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CLAIMER, gpus, str(folder)], cwd=REPO, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, encoding="utf-8")


def read_line(stream, timeout: float = 60) -> str:
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(stream.readline).result(timeout=timeout).strip()


def test_concurrent_runs_claim_distinct_gpus_and_a_crashed_runs_gpu_is_free_again(tmp_path):
    holders = [start_claimer("0,1,2", tmp_path) for _ in range(3)]  # 3 experiments on a simulated 3-GPU host
    try:
        claimed = [read_line(p.stdout) for p in holders]
        assert sorted(claimed) == ["0 0", "1 1", "2 2"]  # distinct GPUs; a second call keeps the same one
        fourth = start_claimer("0,1,2", tmp_path)
        holders.append(fourth)
        assert "all 3 GPUs are claimed by other runs" in read_line(fourth.stderr)
        crashed = holders[claimed.index("1 1")]
        crashed.kill()  # no clean-up runs: the kernel releases its lock
        crashed.wait()
        assert read_line(fourth.stdout) == "1 1"
    finally:
        for p in holders:
            if p.poll() is None:
                p.stdin.close()
                p.wait(timeout=60)


def test_gpus_are_named_by_cuda_visible_devices(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert gpu_slots.visible_gpus(2) == ["0", "1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3, GPU-8f2a")
    assert gpu_slots.visible_gpus(2) == ["3", "GPU-8f2a"]  # the same lock files whatever a process's indices
