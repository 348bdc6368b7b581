#!/usr/bin/env bash
# The GPU check, prepared to run in under 8 minutes on one H100 with the machine's own torch and transformers:
#
#   bash benchmarks/gpu_check.sh            # writes $OUT (or runs/gpu_check): cuda_tests.txt, bench_*/bench.{json,md}
#
# Wheels that the machine lacks (it has no network) may be put in wheels/ and are installed offline first,
# without touching torch. Then: the CUDA tests, and `cepe-rag bench` on LLaMA-2-7B shapes (random weights, bf16)
# for concat against precomputed/stored-style CEPE at k = 10, 50, 100, with the shipped-style cross-attention in
# 8 layers and in all 32. Every step is bounded by `timeout`, so a stuck step cannot eat the machine's time.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
{
  echo "started $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} | tee "$OUT/environment.txt"
if ls wheels/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps wheels/*.whl 2>&1 | tail -2
fi
"$PY" -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
timeout 120 "$PY" -m pytest -q tests/cepe/test_cuda.py tests/cepe/test_modeling.py 2>&1 | tail -20 | tee "$OUT/cuda_tests.txt"
for layers in 8 32; do
  timeout 150 "$PY" -m cepe_rag bench --model 7b --device cuda --dtype bfloat16 --cross-layers "$layers" \
      --methods concat,cepe-precomputed,cepe-absorbed --k 0,10,50,100 --out "$OUT/bench_7b_${layers}layers" \
      2>&1 | tee "$OUT/bench_7b_${layers}layers.txt"
done
echo "finished $(date -u +%FT%TZ)" | tee -a "$OUT/environment.txt"
