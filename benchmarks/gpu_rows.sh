#!/usr/bin/env bash
# Every GPU row of the deployment report, one group per process, then the gpu tests; prints markdown tables.
#
#   benchmarks/gpu_rows.sh                 # about 5-8 min on one GPU (each group capped at GROUP_TIMEOUT s)
#   DEPLOY_GROUPS="lite0 unet" benchmarks/gpu_rows.sh --rounds 5
#
# Rows (benchmarks/bench_deploy.py --device cuda): the timm peer in channels_last fp32 (reference, A/A copy),
# our eager fp32, fast mode (BN folded, channels_last) in fp32 and under AMP fp16/bf16, torch.compile of it
# (fp32 and AMP fp16), torch-tensorrt fp16, ONNX Runtime CUDA fp32 and TensorRT fp16/int8 (where
# torch-tensorrt / onnxruntime-gpu are installed: otherwise those rows say why they are missing), and the
# pruned model under AMP fp16; accuracy of each against fp32 as on the CPU. Extra arguments go to every run.
# Data: $EFFBACKBONE_TEST_DATA (default ../shared/data) with raccoon/ and isbi2012_membrane/; without it the
# rows run on random images and report agreement with fp32 only.
set -uo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "no CUDA GPU here (torch.cuda.is_available() is False): nothing to run" >&2
  exit 1
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
DATA="${EFFBACKBONE_TEST_DATA:-../shared/data}"
OUT="${OUT:-benchmarks/results}"
GROUP_TIMEOUT="${GROUP_TIMEOUT:-95}"
mkdir -p "$OUT"
runs=()
for group in ${DEPLOY_GROUPS:-lite0 b0 unet det}; do
  echo "== $group (at most ${GROUP_TIMEOUT} s)"
  json="$OUT/deploy-cuda-$group.json"
  rm -f "$json"
  timeout "$GROUP_TIMEOUT" python3 benchmarks/bench_deploy.py --device cuda --groups "$group" --compile \
    --threads 4 --rounds 10 --data "$DATA" --out "$json" "$@" > "$OUT/deploy-cuda-$group.log" 2>&1
  status=$?
  tail -n 25 "$OUT/deploy-cuda-$group.log"
  if [ -f "$json" ]; then runs+=("$json"); else echo "[group $group: no result (exit $status; see $OUT/deploy-cuda-$group.log)]"; fi
done
echo "== gpu tests"
timeout 90 python3 -m pytest -q -m gpu -p no:cacheprovider tests/effbackbone/test_gpu_deploy.py 2>&1 | tail -n 15
echo "== markdown"
if [ ${#runs[@]} -gt 0 ]; then python3 benchmarks/deploy_docs.py "${runs[@]}"; fi
