"""How much memory training may take: train.max_memory_gb resolved to a cap in GiB, and the peak a run took."""

from __future__ import annotations

import sys

import torch

# train.max_memory_gb: auto caps peak memory at the GPU's free memory (measured when the stage starts,
# before the model loads) less this margin: 10% of it and 0.5 GiB more. The cap bounds what PyTorch
# allocates; the margin leaves room for what it does not count (the caching allocator's fragmentation,
# memory another program such as Windows' desktop takes meanwhile).
AUTO_MEMORY_MARGIN = (0.10, 0.5)


def memory_cap_setting(value) -> float | str:
    """train.max_memory_gb checked: "auto" or a number of GiB >= 0 (0 = no cap)."""
    if value == "auto" or (isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0):
        return value
    raise ValueError(f"train.max_memory_gb must be auto or a number of GiB >= 0 (0 = no cap), got {value!r}")


def auto_memory_cap_gb(free_bytes: int) -> float:
    """The cap of max_memory_gb: auto on a GPU with `free_bytes` free (see AUTO_MEMORY_MARGIN)."""
    share, reserve_gb = AUTO_MEMORY_MARGIN
    return max(0.0, free_bytes * (1 - share) / 2**30 - reserve_gb)


def memory_cap(value, device: torch.device, mem_get_info=None) -> tuple[float, str]:
    """(cap in GiB, 0 = none; how it was chosen) for train.max_memory_gb=`value` on `device`."""
    value = memory_cap_setting(value)
    if value != "auto":
        return float(value), f"max_memory_gb={value}"
    if device.type != "cuda":
        return 0.0, "max_memory_gb=auto: no cap off a GPU"
    free, total = (mem_get_info or torch.cuda.mem_get_info)(device)
    cap = auto_memory_cap_gb(free)
    share, reserve_gb = AUTO_MEMORY_MARGIN
    return cap, (f"max_memory_gb=auto: {free / 2**30:.2f} GiB of {total / 2**30:.2f} GiB free on {device}, "
                 f"less {share:.0%} and {reserve_gb} GiB")


def peak_memory_gb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda_max_allocated"
    try:
        import resource  # not on Windows
    except ImportError:
        return float("nan"), "unavailable"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**30 if sys.platform == "darwin" else 2**20), "cpu_max_rss"


