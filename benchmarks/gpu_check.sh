#!/usr/bin/env bash
# One prepared GPU check (< 5 minutes on an H100/H200, no network): install the package from
# this checkout, run the GPU tests, then the headline GPU benchmarks, and write the JSON,
# the Markdown report and the plots to $OUT (the device tool's output folder) or ./gpu_results.
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 CAAD_EXT_DIR="${CAAD_EXT_DIR:-/tmp/caad-ext}"
python3 -m pip install --no-build-isolation --no-deps -q -e . 2>&1 | tail -n 2
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$out/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)" \
  | tee -a "$out/device.txt"

# GPU tests first (the C++/CUDA build happens here, on first use). Left out: the compile-only
# checks (nvcc for sm_80/sm_90a, CMake + the CPU emulation, sanitized builds, the binding, a
# second JIT build, the ahead-of-time wheel), which CI runs and which would spend minutes of the
# device's time compiling.
timeout 240 python3 -m pytest -q --maxfail=25 -rf tests/test_gpu.py tests/test_native.py tests/test_ops.py \
  -k "not compile_with_nvcc and not cmake_build and not binding_compiles and not jit_build_is_cached \
      and not sanitizers and not ahead_of_time" \
  2>&1 | tee "$out/tests.log"
tests_rc=${PIPESTATUS[0]}

# Headline cases of ANCHORS.md: N=8192, V=151,936 and N=8192, V=32,000, bf16, fwd+bwd: our backends against
# the plain formula a user writes, eager and under torch.compile (benchmarks/implementations.py), TRL, Liger,
# torchtune. The F.kl_div spelling of the same formula is left to CPU runs (two more compilations here).
timeout 180 python3 -m pytest benchmarks/bench_contrastive_kd.py --benchmark-only -q \
  -k "fwd+bwd and (N8192-V151936 or N8192-V32000) and not kl_div" \
  --benchmark-json "$out/bench.json" 2>&1 | tee "$out/bench.log"
python3 -m benchmarks.report "$out/bench.json" --out "$out" 2>&1 | tail -n 1
exit "$tests_rc"
