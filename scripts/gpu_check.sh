#!/usr/bin/env bash
# One-command GPU check: build the CUDA extension, run the GPU tests, compute-sanitizer on the CUDA ops, the op
# microbenchmarks and the end-to-end benchmarks (generate, KV eviction, roofline on Qwen2.5 shapes); merge the
# benchmark JSON into <device>-<date>.json with a markdown table <device>-<date>.md.
#
#   usage: bash scripts/gpu_check.sh        (repo root or anywhere; a CUDA GPU and nvcc)
#
# Outputs go to $OUT when set, else benchmarks/results/. No step downloads: pip runs with --no-index, no build
# isolation and no dependencies; models are built from configs. The defaults fit ~10 minutes on one H100: the
# roofline benchmark stops starting cases after GPU_CHECK_ROOFLINE_BUDGET_S (compiled HF runs go last) and the
# eviction benchmark runs a subset. GPU_CHECK_FULL=1 runs every matrix in full (about half an hour) plus the
# CPU test suite with the GPU hidden; EFFDECODE_E2E_* variables (benchmarks/test_e2e_roofline.py) pass through.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
mkdir -p "$out"
full=${GPU_CHECK_FULL:-0}
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

if ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device visible to torch" >&2
  exit 2
fi
device=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
stamp=$(date -u +%Y-%m-%d)
log="$out/gpu-check-$device-$stamp.log"
parts=$(mktemp -d)
status=0
: >"$log"
step() { echo "== [$((SECONDS / 60))m$((SECONDS % 60))s] $*" | tee -a "$log"; }
# run LIMIT_S CMD...: run a step under a time limit, keep the tail of its output, record a failure.
run() {
  local limit=$1
  shift
  timeout --signal=INT --kill-after=30 "$limit" "$@" >"$parts/step.out" 2>&1
  local rc=$?
  tail -n 40 "$parts/step.out" | tee -a "$log"
  if [ $rc -ne 0 ]; then
    echo "-- failed (exit $rc): $*" | tee -a "$log"
    status=1
  fi
  return $rc
}
bench() {  # bench NAME LIMIT_S PYTEST_ARGS...: one benchmark file into $parts/NAME.json
  local name=$1 limit=$2
  shift 2
  run "$limit" python3 -m pytest -q -p no:cacheprovider --benchmark-enable --benchmark-json="$parts/$name.json" \
    --benchmark-columns=median,min,rounds "$@"
}

step "build (effdecode._C, no downloads)"
run 300 pip install -e . --no-deps --no-build-isolation --no-index -q || exit 1
run 60 python3 -c "import effdecode._C, torch; print('effdecode._C ok;', torch.cuda.get_device_name(), torch.__version__)"
python3 -c "import flash_attn" 2>/dev/null && echo "flash-attn installed" | tee -a "$log" \
  || echo "flash-attn not installed: its tests and benchmark modes skip" | tee -a "$log"

step "GPU tests"
run 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests
run 120 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_build.py
if [ "$full" = 1 ]; then
  step "CPU test suite (GPU hidden, as CI runs it)"
  CUDA_VISIBLE_DEVICES="" run 1800 python3 -m pytest -q -p no:cacheprovider tests
fi

step "compute-sanitizer (memcheck, racecheck) on the CUDA ops"
if command -v compute-sanitizer >/dev/null; then
  # No caching allocator: out-of-bounds accesses inside a cached block would go unseen.
  for tool in memcheck racecheck; do
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 run 180 compute-sanitizer --tool "$tool" --error-exitcode 3 \
      python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_verify.py
  done
else
  echo "compute-sanitizer not found (it ships with the CUDA toolkit)" | tee -a "$log"
  status=1
fi

step "op microbenchmarks"
bench ops 240 benchmarks/test_ops.py --benchmark-group-by=group

step "end-to-end: effdecode vs HF generate"
bench e2e-generate 180 benchmarks/test_e2e_generate.py --benchmark-group-by=param:batch_size

step "end-to-end: KV eviction"
if [ "$full" = 1 ]; then
  bench e2e-compression 1200 benchmarks/test_e2e_compression.py --benchmark-group-by=param
else
  bench e2e-compression 180 benchmarks/test_e2e_compression.py --benchmark-group-by=param \
    -k "(test_long_generation and (full or rkv)) or (test_eviction_share_of_decode and rkv)"
fi

if [ "$full" = 1 ]; then
  step "end-to-end: speculative decoding"
  bench e2e-speculative 900 benchmarks/test_e2e_speculative.py --benchmark-group-by=param
fi

step "end-to-end: roofline (Qwen2.5 shapes, random bf16 weights)"
if [ "$full" = 1 ]; then
  bench e2e-roofline 2400 benchmarks/test_e2e_roofline.py
else
  EFFDECODE_E2E_COMPILE_MODELS=${EFFDECODE_E2E_COMPILE_MODELS:-0.5B} \
    EFFDECODE_E2E_BUDGET_S=${EFFDECODE_E2E_BUDGET_S:-${GPU_CHECK_ROOFLINE_BUDGET_S:-200}} \
    bench e2e-roofline 420 benchmarks/test_e2e_roofline.py
fi

step "results"
jsons=$(ls "$parts"/*.json 2>/dev/null)
if [ -n "$jsons" ]; then
  # shellcheck disable=SC2086
  python3 benchmarks/results_table.py $jsons --merge "$out/$device-$stamp.json" -o "$out/$device-$stamp.md" \
    || status=1
  echo "wrote $out/$device-$stamp.json and $out/$device-$stamp.md" | tee -a "$log"
else
  echo "no benchmark produced a JSON file" | tee -a "$log"
  status=1
fi
rm -rf "$parts"
step "done: status $status (log $log)"
exit $status
