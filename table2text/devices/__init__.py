"""Which device: NVIDIA driver detection (standard library only) and one-GPU-per-process claims."""
