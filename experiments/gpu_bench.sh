#!/usr/bin/env bash
# One short run on a lent GPU (H100 / H200), installing nothing: correctness on the GPU first, then the
# figures the issues name. Designed to finish in ~7 minutes of device time, so it can be rerun once.
#
#   bash experiments/gpu_bench.sh [OUT_DIR]      (through the device tool: OUT is set; logs land under it)
#
# 1. correctness: model parity with transformers (float32) and cuDNN attention vs the XLA path, on the GPU
# 2. training:    MFU of a Llama 3.2 1B-shape bfloat16 train step                (issue 6; target >= 50%)
# 3. decoding:    batch-1 decode of the 8B shapes, bf16 and int8, vs the HBM bound (issue 7; >= 85%, int8 >= 1.7x);
#                 again with XLA's dynamic-slice fusion (does the layer scan's weight slice cost bandwidth?)
# 4. comparison:  the same probe on CPU and GPU of one checkpoint, then `llama.compare diff`     (issue 8)
# 5. long context: fused attention (cuDNN) against "flash" at 4K, the attention tests on the GPU, and Llama 3.1
#                 8B-shape bf16 prefill at 32K and 128K: time, attention TFLOP/s, peak memory    (issue 13)
# Record the printed table in docs/benchmarks.md with the date and the card.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-${1:-/tmp/gpu_bench}}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
status=0
step() { echo; echo "=== $1"; shift; "$@" 2>&1 | tee -a "$OUT/gpu_bench.log"; local rc=${PIPESTATUS[0]}; [ "$rc" = 0 ] || { echo "FAILED ($rc): $*"; status=1; }; }

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
$PY -c "import jax; print('jax', jax.__version__, jax.devices())"

step "1. correctness on the GPU" env JAX_PLATFORMS=cuda timeout 240 $PY -m pytest -q -p no:cacheprovider \
  tests/test_model.py tests/test_config.py
step "2. train step MFU (Llama 3.2 1B shapes, bf16)" timeout 180 $PY -m experiments.bench_train --gpu --steps 5
step "3. decode, 8B shapes, bf16 and int8" timeout 180 $PY -m experiments.bench_decode --gpu \
  --json "$OUT/decode_8b.json"
# The layer scan slices each layer's weights out of the stacked [L, ...] arrays; on the CPU that slice is a
# copy (docs/benchmarks.md "Decoding"). This rerun lets XLA feed the slice to cuBLAS in place instead: if it is
# much faster, the copy is what stands between step 3 and the HBM bound.
step "3b. decode as 3, with XLA's dynamic-slice fusion" env XLA_FLAGS="--xla_gpu_enable_dynamic_slice_fusion=true" \
  timeout 180 $PY -m experiments.bench_decode --gpu --json "$OUT/decode_8b_dsfusion.json"
P=$OUT/probe
step "4a. probe on the CPU" env JAX_PLATFORMS=cpu timeout 120 $PY -m llama.compare run --init tiny --out "$P/cpu_f32"
step "4b. probe on the GPU (float32, highest matmul precision)" timeout 120 $PY -m llama.compare run --init tiny \
  --out "$P/gpu_f32" --matmul-precision highest
step "4c. probe on the GPU (default precision: TF32 matmuls)" timeout 120 $PY -m llama.compare run --init tiny \
  --out "$P/gpu_f32_default"
step "4d. diff CPU vs GPU" $PY -m llama.compare diff "$P/cpu_f32" "$P/gpu_f32" --out "$P/diff_cpu_gpu_f32"
step "4e. diff CPU vs GPU (TF32)" $PY -m llama.compare diff "$P/cpu_f32" "$P/gpu_f32_default" --out "$P/diff_cpu_gpu_tf32"
step "5a. attention parity on the GPU" env JAX_PLATFORMS=cuda timeout 240 $PY -m pytest -q -p no:cacheprovider \
  tests/test_attention.py -k "not tpu_topology and not splash"
step "5b. fused attention vs flash at 4K; 8B-shape bf16 prefill at 32K and 128K" timeout 420 $PY -m \
  experiments.bench_long_context --gpu
echo; echo "=== summary"; cat "$OUT"/*.json 2>/dev/null; cat "$P"/diff_*/diff.md 2>/dev/null
exit $status
