#!/usr/bin/env bash
# GPU check of the overhead benchmark (issue #7, acceptance 3), for a lent CUDA machine.
#
# Run from the repository root:  OUT=/some/dir bash benchmarks/gpu_check.sh
# (on the device machine $OUT is the folder that comes back). It
#   1. prints the GPU and the torch build,
#   2. runs the CUDA tests of the overhead benchmark (tests marked `gpu`),
#   3. runs `python -m benchmarks.overhead --device cuda` for all seven backbones at the paper's
#      window 100, batch 128, C = 55, 30 timed repeats after 5 warm-ups,
#   4. copies overhead.md to $OUT (commit it as docs/results/overhead-gpu.md).
# Budget: about 6 minutes on an H200 (the benchmark itself is capped at 300 s by `timeout`).
set -uo pipefail
OUT="${OUT:-/tmp/madcluster-gpu-check}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT/overhead-gpu"
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
status=0

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv || true
  "$PY" -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())'
} 2>&1 | tee "$OUT/gpu_env.txt"

echo "== CUDA tests" | tee "$OUT/gpu_tests.txt"
timeout 120 "$PY" -m pytest tests/benchmarks/test_overhead.py -m gpu -q -rs -p no:cacheprovider 2>&1 \
  | tee -a "$OUT/gpu_tests.txt" || status=1

echo "== benchmark" | tee "$OUT/overhead-gpu.log"
timeout 300 "$PY" -m benchmarks.overhead --device cuda --models all --channels 55 --window 100 \
  --batch 128 --repeats 30 --warmup 5 --out "$OUT/overhead-gpu" 2>&1 | tee -a "$OUT/overhead-gpu.log"
rc=${PIPESTATUS[0]}
[ "$rc" -eq 0 ] || status=1
if [ -f "$OUT/overhead-gpu/overhead.md" ]; then
  cp "$OUT/overhead-gpu/overhead.md" "$OUT/overhead.md"
fi
echo "gpu_check finished with status $status (benchmark exit $rc)" | tee -a "$OUT/overhead-gpu.log"
exit $status
