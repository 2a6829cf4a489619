#!/usr/bin/env bash
# One-command GPU check: build the extension, run the GPU tests, compute-sanitizer on the CUDA ops, and the
# micro + end-to-end benchmarks. Writes everything under ${OUT:-benchmarks/results}. No step downloads.
#   usage: scripts/gpu_check.sh            (on a machine with a CUDA GPU and nvcc)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
mkdir -p "$out"
device=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
stamp=$(date -u +%Y-%m-%d)
log="$out/gpu-check-$device-$stamp.log"
export PYTHONUNBUFFERED=1
status=0
step() { echo "== $*" | tee -a "$log"; }

step "build"
pip install -e . --no-deps --no-build-isolation -q 2>&1 | tee -a "$log" || exit 1
python3 -c "import effdecode._C, torch; print('effdecode._C ok;', torch.cuda.get_device_name())" | tee -a "$log"

step "tests (GPU ones included)"
pytest -q -p no:cacheprovider -x 2>&1 | tail -n 30 | tee -a "$log" || status=1

step "compute-sanitizer on the CUDA and Triton ops"
if command -v compute-sanitizer >/dev/null; then
  compute-sanitizer --tool memcheck --error-exitcode 3 \
    pytest -q -p no:cacheprovider -m gpu tests/test_verify.py 2>&1 | tail -n 15 | tee -a "$log" || status=1
else
  echo "compute-sanitizer not found" | tee -a "$log"
fi

step "op microbenchmarks"
pytest -q -p no:cacheprovider benchmarks/test_ops.py --benchmark-enable --benchmark-group-by=group \
  --benchmark-columns=median,min,rounds --benchmark-json="$out/$device-ops-$stamp.json" 2>&1 \
  | tail -n 60 | tee -a "$log" || status=1

step "end-to-end benchmark"
pytest -q -p no:cacheprovider benchmarks/test_e2e_generate.py --benchmark-enable \
  --benchmark-group-by=param:batch_size --benchmark-json="$out/$device-e2e-$stamp.json" 2>&1 \
  | tail -n 30 | tee -a "$log" || status=1

echo "results: $out (log $log); status $status"
exit $status
