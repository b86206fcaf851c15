#!/usr/bin/env bash
# Wheels for bench/unsloth_baseline.py on the GPU host (no network, Python 3.12, torch 2.11 cu130), into
# .gpu/unsloth (git-ignored; ~50 MB: carried in one call beside the working tree, under its 64 MiB).
#
#   bash bench/unsloth_wheelhouse.sh [DEST]
#
# Only what the host's image lacks or holds in another version (device KINDS.md lists its packages:
# torch, torchvision 0.26, triton 3.6, accelerate, huggingface_hub 1.33, tokenizers 0.23, sentencepiece,
# protobuf, einops, httpx, pyarrow are there): Unsloth and unsloth_zoo, the transformers (<= 5.17) and
# trl (<= 1.15) they pin, datasets < 5 (Unsloth's pin; the project carries 5.2), torchao (unsloth_zoo
# imports it), cut_cross_entropy (its fused loss) and hf_transfer (a declared dependency). No torch,
# nvidia-*, triton, xformers (Unsloth runs without it: SDPA) or bitsandbytes (the project's wheel).
# Why not ../shared/tools/offline-wheelhouse: it adds transformers 5.24 and the model chunks to DEST,
# and two transformers versions in one --target install stop it.
set -euo pipefail
dest=${1:-.gpu/unsloth}
mkdir -p "$dest"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dest" \
  unsloth==2026.10.9 unsloth_zoo==2026.10.9 transformers==5.17.0 trl==1.15.0 datasets==4.8.4 \
  torchao==0.18.0 cut_cross_entropy==25.1.1 hf_transfer==0.1.9
du -sh "$dest"
