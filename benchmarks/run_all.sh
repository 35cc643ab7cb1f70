#!/usr/bin/env bash
# Every benchmark in sequence; JSON lands in benchmarks/results/. Extra flags go to every script:
#   benchmarks/run_all.sh --quick           # development check (~10-15 min on 2 quiet cores)
#   benchmarks/run_all.sh                   # the full set (~45 min)
#   benchmarks/run_all.sh --stock-malloc    # the same with glibc's default malloc settings
set -euo pipefail
cd "$(dirname "$0")/.."
for bench in bench_encoder bench_scaling bench_unet_train bench_effdet bench_data; do
  echo "=== $bench $*"
  python3 "benchmarks/$bench.py" "$@"
done
echo "=== bench_memory $*"
python3 benchmarks/bench_memory.py "$@"
