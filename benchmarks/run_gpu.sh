#!/usr/bin/env bash
# One call on a lent GPU machine: build the CUDA extension, run the cuda-marked tests
# and the GPU benchmarks, leave logs and results under $OUT (or ./gpu-out).
# Usage: bash benchmarks/run_gpu.sh [bench args...]   (wheels for missing packages in .whl/)
# ATTENTION_ONLY=1: block-sparse attention alone (Triton and Gluon kernels: the extension is built
# without its CUDA sources, in seconds instead of minutes), to fit a short lease.
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
start=$(date +%s)
attention_only=${ATTENTION_ONLY:-0}
STEPFUSE_CUDA=$([ "$attention_only" = 1 ] && echo OFF || echo ON) STEPFUSE_CUDA_ARCHITECTURES=${STEPFUSE_CUDA_ARCHITECTURES:-90-real} \
  python3 -m pip install -q --no-build-isolation --no-deps . > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s"
repo=$PWD
cd /tmp
python3 -m stepfuse.cli info | tee "$OUT/info.txt"
# Block-sparse attention first: the Triton kernels against the references (compiling every tile
# configuration takes minutes in one process; pytest-xdist spreads it over the cores), then timings.
# (bounded in time: a kernel that deadlocks on its barriers must not take the whole call with it)
parallel=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
# The Gluon kernels (Hopper only) are tried alone first, every configuration against the reference:
# should one fail or hang there, their tests and benchmark columns are left out and the rest still runs.
skip=(); nogluon=()
timeout 120 python3 -c "
import sys, torch
sys.path.insert(0, '$repo/tests')
import test_attention_triton as t
if torch.cuda.get_device_capability()[0] == 9:
    for choice in t._gluon_choices():
        t._compare(2, 3, 777, 1290, 128, 128, 0.6, torch.bfloat16, 'bshd', device='cuda',
                   attention=t._gluon_attention(choice), empty_rows=True)
        print('gluon', choice, 'matches the reference', flush=True)
" > "$OUT/gluon_smoke.log" 2>&1
gluon_rc=$?
tail -6 "$OUT/gluon_smoke.log"
if [ $gluon_rc -ne 0 ]; then
  skip=(-k "not gluon"); nogluon=(--no-gluon)
  echo "Gluon smoke check failed (exit $gluon_rc): Gluon tests and columns left out"
fi
timeout 300 python3 -m pytest "$repo/tests/test_attention_triton.py" "$repo/tests/test_attention_ops.py" \
  "$repo/tests/test_attention_integration.py" -q -m cuda $parallel -p no:cacheprovider "${skip[@]}" 2>&1 \
  | tee "$OUT/pytest_attention.log" | tail -5
python3 "$repo/benchmarks/bench_attention.py" --device cuda --out "$OUT/results" "${nogluon[@]}" 2>&1 \
  | tee "$OUT/bench_attention.log" | tail -60
if [ $gluon_rc -eq 0 ]; then
  # the library's dispatch with the Gluon kernels enabled: its measured choice per shape
  STEPFUSE_ATTENTION_GLUON=1 python3 "$repo/benchmarks/bench_attention.py" --device cuda --parts kernels \
    --head-dims 128 --out "$OUT/results-gluon-dispatch" 2>&1 | tee "$OUT/bench_attention_gluon.log" | tail -30
fi
[ "$attention_only" = 1 ] && exit 0
python3 -m pytest "$repo/tests" -q -x -m cuda -p no:cacheprovider 2>&1 | tee "$OUT/pytest_cuda.log" | tail -5
python3 -X faulthandler -m pytest "$repo/tests/test_solver_step.py" "$repo/tests/test_no_sync.py" -v -p no:cacheprovider \
  > "$OUT/pytest_op.log" 2>&1; echo "op tests exit $?"; grep -E "passed|failed|Fatal|FAILED" "$OUT/pytest_op.log" | tail -5
python3 "$repo/benchmarks/bench_solver_step.py" --device cuda --out "$OUT/results" "$@" 2>&1 | tee "$OUT/bench_solver_step.log" | tail -45
python3 "$repo/benchmarks/bench_guidance.py" --device cuda --out "$OUT/results" 2>&1 | tee "$OUT/bench_guidance.log" | tail -45
