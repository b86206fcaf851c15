"""Data-parallel training on the GPUs of one host: the torchrun launch and the few collectives the train
loop needs (torch.distributed; NCCL on CUDA where this torch has it, else gloo: Windows builds have
no NCCL).

`python -m stages.train` with train.num_gpus = N > 1 runs, as a child process, and waits for,
`python -m torch.distributed.run --standalone --nproc_per_node N -m stages.train <same arguments>`;
each of the N processes trains on its share of every effective batch, on cuda:LOCAL_RANK.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import torch
import torch.distributed as dist

# NVLink multicast (NVLS) off in NCCL, PyTorch and NVSHMEM: on shared multi-GPU hosts a program using it
# can put the GPUs out of service. Set in the launched processes' environment and again before NCCL starts.
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def launched() -> bool:
    """True inside a process started by torchrun (or `accelerate launch`), which set these variables."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def device_problem(num_procs: int, requested: str) -> str | None:
    """Why `num_procs` processes cannot run on train.device=`requested`, or None if they can."""
    if requested == "cpu":
        return None  # N CPU processes over gloo: how the tests run the multi-GPU code without GPUs
    if requested not in ("auto", "cuda"):
        return (f"train.num_gpus={num_procs} runs one process per GPU (cuda:LOCAL_RANK); "
                f"train.device must be auto, cuda or cpu, not {requested!r}")
    found = torch.cuda.device_count()
    if found < num_procs:
        return (f"train.num_gpus={num_procs} but {found} CUDA GPU(s) are visible "
                "(train.device=cpu runs that many CPU processes instead, for tests)")
    return None


def launch_command(num_procs: int, module: str, argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={num_procs}",
            "-m", module, *argv]


def relaunch(num_procs: int, module: str, argv: list[str]) -> int:
    """Run torchrun with `python -m module argv` in `num_procs` processes; returns its exit status
    (non-zero if any rank failed), which the caller exits with so that dvc sees it.

    A child process, not os.execve: on Windows execve starts a new process and returns at once, and dvc
    would see the stage end before training did. A SIGTERM/SIGINT to this process is passed on to
    torchrun, which stops every rank, and this process still waits for it."""
    cmd = launch_command(num_procs, module, argv)
    print("$", " ".join(cmd), flush=True)
    sys.stderr.flush()
    child = subprocess.Popen(cmd, env={**os.environ, **MULTICAST_OFF})

    def forward(signum, _frame):
        child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def backend(device: torch.device, nccl_available: bool | None = None) -> str:
    """NCCL for GPUs where this torch build has it (Linux CUDA builds), gloo otherwise (CPU; Windows)."""
    if nccl_available is None:
        nccl_available = dist.is_nccl_available()
    return "nccl" if device.type == "cuda" and nccl_available else "gloo"


def init(device: torch.device) -> None:
    """Join the process group of a torchrun launch (nothing to do for a single process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 or dist.is_initialized():
        return
    os.environ.update(MULTICAST_OFF)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # object collectives and NCCL use the current device
    if backend(device) == "nccl":
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")


def _through_cpu(tensor: torch.Tensor) -> bool:
    """gloo takes CUDA tensors only in Linux builds: elsewhere (Windows) a GPU tensor goes through the CPU."""
    return tensor.is_cuda and dist.get_backend() == "gloo" and not sys.platform.startswith("linux")


def _all_reduce(tensor: torch.Tensor, op) -> None:
    if _through_cpu(tensor):
        host = tensor.cpu()
        dist.all_reduce(host, op=op)
        tensor.copy_(host)
    else:
        dist.all_reduce(tensor, op=op)


def _broadcast(tensor: torch.Tensor) -> None:
    if _through_cpu(tensor):
        host = tensor.cpu()
        dist.broadcast(host, src=0)
        tensor.copy_(host)
    else:
        dist.broadcast(tensor, src=0)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_and_world() -> tuple[int, int]:
    """(rank, number of processes); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(lengths: list[int], rank: int, world: int) -> list[int]:
    """Positions (ascending) of the effective batch that `rank` of `world` processes computes.

    The examples are dealt longest first in a snake (ranks 0..w-1, then w-1..0, ...), so every rank
    gets the same number of examples (±1) and about the same tokens: a step lasts as long as its
    slowest rank. Together the ranks cover every position exactly once."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    mine = []
    for k, i in enumerate(order):
        round_, seat = divmod(k, world)
        if (seat if round_ % 2 == 0 else world - 1 - seat) == rank:
            mine.append(i)
    return sorted(mine)


def sum_gradients(params: list[torch.Tensor], loss: float) -> float:
    """Sum every rank's gradients of `params`, and its part of the step loss, into every rank with one
    all-reduce; returns the summed loss.

    Why not DistributedDataParallel: its gradient hooks are armed by the wrapper's forward, but the loop
    calls the decoder and a loss of its own on the vocabulary head, not a wrapped model; and ranks hold
    different numbers of micro-batches (none at all at an epoch's short last step), which DDP's
    no_sync accumulation cannot express without dummy forwards. The gradients are LoRA's only (1.9 M
    fp32 values, 7.6 MB, for Gemma 3 270M at r=8): one all-reduce per optimiser step takes well under a
    millisecond on NVLink against a step of hundreds, so overlapping it with backward (DDP's gain)
    would buy nothing. A sum, not a mean: each rank's loss is already divided by the label tokens of
    the whole effective batch, so the sum is exactly the one-process gradient."""
    device = params[0].device
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params]
                     + [torch.tensor([loss], dtype=torch.float32, device=device)])
    _all_reduce(flat, dist.ReduceOp.SUM)
    offset = 0
    for p in params:
        summed = flat[offset : offset + p.numel()].view_as(p).to(p.dtype)
        if p.grad is None:  # this rank had no example this step
            p.grad = summed.clone()
        else:
            p.grad.copy_(summed)
        offset += p.numel()
    return flat[-1].item()


@torch.no_grad()
def broadcast_parameters(params: list[torch.Tensor]) -> None:
    """Every rank takes rank 0's values: identical starting weights, whatever the initialisation did."""
    flat = torch.cat([p.reshape(-1) for p in params])
    _broadcast(flat)
    offset = 0
    for p in params:
        p.copy_(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()


@torch.no_grad()
def check_in_sync(params: list[torch.Tensor]) -> None:
    """Raise unless every rank holds exactly rank 0's parameters (identical gradients and optimiser
    steps keep them so; a difference means the ranks trained different models)."""
    mine = torch.cat([p.reshape(-1).float() for p in params])
    reference = mine.clone()
    _broadcast(reference)
    diff = (mine - reference).abs().max().reshape(1)
    _all_reduce(diff, dist.ReduceOp.MAX)
    if diff.item() != 0:
        raise RuntimeError(f"data-parallel ranks diverged: trainable parameters differ by up to {diff.item():.3g}")


def broadcast_object(obj):
    """Rank 0's `obj` on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def max_over_ranks(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    _all_reduce(t, dist.ReduceOp.MAX)
    return t.item()


def barrier() -> None:
    dist.barrier()
