#!/usr/bin/env bash
# Issue 10's engine goal on the GPU machine, prepared for a session that has one (run through the
# device tool from the repository root; about 9 minutes on an H200, carrying .whl with qwix):
#   bash bench/gpu_serving.sh
# 374m in bf16, 128-token prompts, 256 new tokens, a 1024-token cache; `ours` (the engine before
# issue 10), `many` (32 decode steps per dispatch, filled-span attention, the 64 prompts prefilled
# and inserted in one call each) and HF `generate` side by side at 1 and 64 concurrent requests,
# then `many` with int8 weights, then with cuBLAS GEMMs, then where a step's time goes, kernel by
# kernel (bench/decode_profile.py). Results go to $OUT/serving.txt; copy the tables into
# bench/RESULTS.md with the date and device.
set -uo pipefail
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
OUT=${OUT:-/tmp}
if [ -d .whl ]; then  # pure-Python wheels the machine lacks (grain, ml-collections, qwix, ...)
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
    export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/serving.txt"
timeout 420 python3 -m bench.serve_throughput --presets=374m --prompt=128 --new=256 \
  --max_len=1024 --dtype=bfloat16 --concurrency=1,64 --repeat=2 --copy_rate=4.3e12 \
  --sides=ours,many,hf --prefill_batch=64 --decode_steps=32 2>&1 | tee -a "$OUT/serving.txt"
timeout 150 python3 -m bench.serve_throughput --presets=374m --prompt=128 --new=256 \
  --max_len=1024 --dtype=bfloat16 --concurrency=1,64 --repeat=2 --copy_rate=4.3e12 \
  --sides=many --prefill_batch=64 --decode_steps=32 --quantize=int8 2>&1 | tee -a "$OUT/serving.txt"
# The GEMM backend: cuBLAS instead of XLA's Triton GEMMs, which filled 48-88 of the 132
# multiprocessors in the one-request step (bench/RESULTS.md, 2026-12-04).
echo "XLA_FLAGS=--xla_gpu_enable_triton_gemm=false:" | tee -a "$OUT/serving.txt"
XLA_FLAGS=--xla_gpu_enable_triton_gemm=false timeout 120 python3 -m bench.serve_throughput \
  --presets=374m --prompt=128 --new=256 --max_len=1024 --dtype=bfloat16 --concurrency=1,64 \
  --repeat=2 --copy_rate=4.3e12 --sides=many --prefill_batch=64 --decode_steps=32 2>&1 |
  tee -a "$OUT/serving.txt"
timeout 120 python3 -m bench.decode_profile --preset=374m --dtype=bfloat16 --prompt=128 \
  --max_len=1024 --concurrency=1,64 --prefill_batch=64 --decode_steps=32 --chunks=2 --out="$OUT" \
  2>&1 | grep -v -i warning | tee -a "$OUT/serving.txt"
