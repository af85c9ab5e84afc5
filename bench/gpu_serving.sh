#!/usr/bin/env bash
# Issue 10's engine goal on the GPU machine, prepared for a session that has one (run through the
# device tool from the repository root; about 8 minutes on an H200; it needs nothing beyond the
# machine's JAX, optax, torch and transformers, and installs .whl/ if carried):
#   bash bench/gpu_serving.sh
# 374m in bf16, 128-token prompts, 256 new tokens, a 1024-token cache, 1 and 64 concurrent
# requests: `many` (the engine: 32 decode steps per dispatch in a loop of fixed trip count,
# filled-span attention, the prompts prefilled and inserted in one call each), `kern` (the same
# with the decode step's cache write and attention in one Pallas/Triton kernel a layer,
# models/decode_attention.py), `exit` (`many` with the loop that stops early, which made the
# host wait for the device after every step) and HF `generate` side by side; then `many` and
# `kern` with cuBLAS GEMMs; then where a `kern` step's time goes,
# kernel by kernel (bench/decode_profile.py). `ours` (the engine before issue 10) and int8
# weights were measured on 2026-12-04 (bench/RESULTS.md) and are not rerun. Results go to
# $OUT/serving.txt; copy the tables into bench/RESULTS.md with the date and device.
set -uo pipefail
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
OUT=${OUT:-/tmp}
if [ -d .whl ]; then  # pure-Python wheels the machine lacks (grain, ml-collections, qwix, ...)
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
    export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/serving.txt"
COMMON=(--presets=374m --prompt=128 --new=256 --max_len=1024 --dtype=bfloat16 --concurrency=1,64
        --repeat=2 --copy_rate=4.3e12 --prefill_batch=64 --decode_steps=32)
timeout 330 python3 -m bench.serve_throughput "${COMMON[@]}" --sides=many,kern,exit,hf 2>&1 |
  tee -a "$OUT/serving.txt"
# The GEMM backend: cuBLAS instead of XLA's Triton GEMMs, which filled 48-88 of the 132
# multiprocessors in the one-request step (bench/RESULTS.md, 2026-12-04).
echo "XLA_FLAGS=--xla_gpu_enable_triton_gemm=false:" | tee -a "$OUT/serving.txt"
XLA_FLAGS=--xla_gpu_enable_triton_gemm=false timeout 130 python3 -m bench.serve_throughput \
  "${COMMON[@]}" --sides=many,kern 2>&1 | tee -a "$OUT/serving.txt"
timeout 90 python3 -m bench.decode_profile --preset=374m --dtype=bfloat16 --prompt=128 \
  --max_len=1024 --concurrency=1,64 --prefill_batch=64 --decode_steps=32 --chunks=2 \
  --decode_attention=pallas --out="$OUT" 2>&1 | grep -v -i warning | tee -a "$OUT/serving.txt"
