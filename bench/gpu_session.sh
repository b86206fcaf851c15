#!/usr/bin/env bash
# The measurements of issues #20 and #23 in one GPU call, after bench/gpu_setup.sh (BENCHMARKS.md "How the
# GPU runs were made"): the four stages as dvc runs them, decoding, training throughput beside its peers,
# and the full fine-tuning and ToTTo dev55 rows. Results go to $1 (default bench/results/session), one
# folder per bench; a bench that fails is reported and the next one still runs.
#
#     bash bench/gpu_session.sh OUT [SECTION ...]     # sections: phases reference startup decode train unsloth
#                                                   compile fullft fullpipe (default: phases startup decode train)
set -u
out=${1:-bench/results/session}
shift || true
sections=${*:-phases startup decode train}
data=.gpu/data
logs=$(mktemp -d)  # the side-by-side rows' logs, outside $out: a GPU call brings back few files
mkdir -p "$out"
run() {  # run NAME CMD...: time one bench, keep going if it fails
  local name=$1; shift
  local start=$SECONDS
  echo "== $name: $*"
  "$@" || echo "== $name FAILED (exit $?)"
  echo "== $name took $((SECONDS - start)) s"
}
for section in $sections; do
  case $section in
    phases)  # the recipe (NF4 r=8, lr 2e-4, 1 epoch), base comparison on, eval batch 500:
      # each stage in its own process (TOTTO_WARM_START=0), then with the warm-start helper (the default)
      for mode in cold warm; do
        run phases-$mode env TOTTO_WARM_START=$([ $mode = cold ] && echo 0 || echo 1) python -m bench.run_recipe \
          --name fetaqa-phases-$mode --set data.source=fetaqa --set data.path=$data/fetaqa \
          --set train.learning_rate=2e-4 --set eval.batch_size=500 --set merge.device=cuda --out "$out/phases"
      done
      cat /tmp/totto-warm-$(id -u)/*.log 2>/dev/null | tail -n 20 ;;
    reference)  # the 504-step reference recipe's train stage (lr 5e-5, warm-up 6%, 4 epochs of FeTaQA train)
      run reference python -m bench.run_recipe --name fetaqa-reference-504 --stages preprocess train \
        --set data.source=fetaqa --set data.path=$data/fetaqa --set train.learning_rate=5e-5 \
        --set train.warmup_ratio=0.06 --set train.epochs=4 --out "$out/phases" ;;
    decode)  # needs data/processed/validation.jsonl (the phases section writes it)
      run decode python -m bench.decode_bench --data data/processed/validation.jsonl \
        --decoders generate graph --sequential 80 --prefill-chunks 2048 4096 --out "$out/decode"
      run decode-profile python -m bench.decode_profile --data data/processed/validation.jsonl --out "$out/decode" ;;
    imports)  # where the model code's import time goes on this host, and which optional packages it pulls in
      python3 -X importtime -c "from transformers.models.gemma3 import modeling_gemma3" 2> "$out/importtime.txt"
      sort -t'|' -k2 -n "$out/importtime.txt" | tail -n 30
      python3 -c "import sys, time; t = time.perf_counter(); from transformers.models.gemma3 import modeling_gemma3; \
print(round(time.perf_counter() - t, 2), 's;', sorted(m for m in ('sklearn', 'scipy', 'torchvision', 'torchaudio', \
'PIL', 'pandas', 'kernels', 'timm', 'jax', 'cv2', 'matplotlib', 'numba', 'torch._dynamo', 'triton') if m in sys.modules))" ;;
    startup)  # what a stage's fixed costs are made of, each probe in a new process
      run startup python -m bench.startup_probe --out "$out/startup" ;;
    train)  # the defaults (fused bf16 adapters, CUDA graphs), compiled layers, and the peers at batch 16 and 64
      run train python -m bench.train_bench --data data/processed/train.jsonl --steps 6 --check-graphs \
        --only project_nf4 project_nf4_compiled original_recipe trl_liger_b16 \
        trl_liger_bf16_b16 trl_liger_b64 --out "$out/train" ;;
    unsloth)  # its own package folder and process: it pins transformers <= 5.17 and trl <= 1.15
      [ -d /root/unsloth-pkgs/unsloth ] || python3 -m pip install -q --no-deps --target /root/unsloth-pkgs .gpu/unsloth/*.whl
      model=$(python3 -c "from table2text.model.sources import resolve_model; print(resolve_model('packaged'))")
      run unsloth timeout "${UNSLOTH_TIMEOUT:-500}" env PYTHONPATH=/root/unsloth-pkgs python3 -m bench.unsloth_baseline \
        --model-dir "$model" --data data/processed/train.jsonl --steps 6 --warmup 2 --out "$out/train" ;;
    compile)  # compiled layers twice, each a new process: into an empty compile cache, then from it
      run compile-cache python -m bench.compile_cache_bench --data data/processed/train.jsonl --steps 12 \
        --out "$out/train" ;;
    fullft)  # quality rows, side by side on one GPU (their times are not measurements)
      run fullft-nq python -m bench.full_finetune --fetaqa $data/fetaqa --totto $data/totto --out "$out/fullft" \
        > "$logs/fullft-nq.log" 2>&1 &
      run fullft-q python -m bench.full_finetune --fetaqa $data/fetaqa --set data.include_question=true \
        --out "$out/fullft" > "$logs/fullft-q.log" 2>&1 &
      run row-totto python -m bench.run_rows --only recipe-nq-r8-2ep-beam4 --fetaqa $data/fetaqa \
        --totto $data/totto --out "$out/rows" --gpus 0 > "$logs/rows.log" 2>&1 &
      wait
      tail -n 12 "$logs"/*.log ;;
    fullpipe)  # full fine-tuning through the pipeline's own stages (train.method full): the shipped models
      run fullpipe python -m bench.run_rows --only full-nq-3ep-beam4 full-q-3ep-beam4 --fetaqa $data/fetaqa \
        --totto $data/totto --out "$out" --gpus 0 0 ;;
    *) echo "unknown section $section"; exit 2 ;;
  esac
done
