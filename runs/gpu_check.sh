#!/usr/bin/env bash
# The device check, one command on a CUDA machine (make gpu-check): the CUDA tests, then the measurements of
# bench.py (GPT-2 124M training at 16 x 1024 in bf16 with torch.compile, and prefill/decode of bf16, int8 and int4
# weights, eager and compiled, all side by side with transformers' GPT2LMHeadModel), printed as one table with the
# targets, and written to a JSON file. About 8 minutes on an H100/H200; each stage has its own time limit.
#
#     make gpu-check                                        # or: bash runs/gpu_check.sh
#     GPU_CHECK_DIR=out-h100 TEST_TIMEOUT=300 bash runs/gpu_check.sh
#     PYTHON=python3 bash runs/gpu_check.sh                 # an offline GPU machine whose python3 has torch
#
# Without a CUDA device it stops at once with an error (the CUDA tests would only be skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
DIR=${GPU_CHECK_DIR:-out-gpu-check}     # pytest's log, bench.json, bench.txt
TEST_TIMEOUT=${TEST_TIMEOUT:-210}       # seconds for tests/test_cuda.py (most of it compiling tiny models)
BENCH_TIMEOUT=${BENCH_TIMEOUT:-270}     # seconds for bench.py; stopped early, it prints what it measured

# ---------------------------------------------------------------------------------------------
# the device: fail clearly, not by skipping every test
if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "ERROR: nvidia-smi not found: this machine has no NVIDIA driver, so there is nothing to check." >&2
    echo "HINT: run this on a CUDA machine; on a CPU, make test runs everything that can run here." >&2
    exit 1
fi
nvidia-smi --query-gpu=index,name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv
if ! timeout 60 "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    "$PYTHON" -c "import torch; print(f'ERROR: torch {torch.__version__} (built for CUDA {torch.version.cuda}) sees no CUDA device')" >&2 || true
    echo "HINT: install a CUDA build of torch (requirements.txt pins one; see the README) and check nvidia-smi" >&2
    exit 1
fi
"$PYTHON" -c "import torch; print(f'torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, {torch.cuda.device_count()} GPU(s): {torch.cuda.get_device_name(0)}')"
pinned=$(sed -n 's/^torch==//p' requirements.txt)
"$PYTHON" -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$pinned')" || \
    echo "WARNING: this torch is not the $pinned that requirements.txt pins: the figures are for the torch above"

# ---------------------------------------------------------------------------------------------
# 1. the CUDA tests. A failure is reported at the end: the measurements still run, they say what else broke
mkdir -p "$DIR"
start=$(date +%s)
tests=0
timeout --signal=TERM --kill-after=20 "$TEST_TIMEOUT" "$PYTHON" -m pytest tests/test_cuda.py -q -rs --durations=5 \
    2>&1 | tee "$DIR/test_cuda.txt" || tests=$?
echo "tests/test_cuda.py: exit status $tests in $(( $(date +%s) - start )) s"

# ---------------------------------------------------------------------------------------------
# 2. the measurements, one table (bench.py prints the targets under it)
start=$(date +%s)
bench=0
timeout --signal=TERM --kill-after=30 "$BENCH_TIMEOUT" "$PYTHON" bench.py --device=cuda --compare_hf=True \
    --compile=True --decode_compile=True --batch_size=16 --seq_len=1024 --prefill_len=256 --prompt_len=16 \
    --new_tokens=128 --repeats=3 --warmup=1 --json="$DIR/bench.json" 2>&1 | tee "$DIR/bench.txt" || bench=$?
echo "bench.py: exit status $bench in $(( $(date +%s) - start )) s; wrote $DIR/bench.json and $DIR/bench.txt"

if [ "$tests" -ne 0 ] || [ "$bench" -ne 0 ]; then
    [ "$tests" -eq 124 ] && echo "ERROR: tests/test_cuda.py ran out of its $TEST_TIMEOUT s (TEST_TIMEOUT)" >&2
    [ "$bench" -eq 124 ] && echo "ERROR: bench.py ran out of its $BENCH_TIMEOUT s (BENCH_TIMEOUT); the table above has the lines it finished" >&2
    echo "FAILED: tests exit $tests, bench exit $bench (logs in $DIR/)" >&2
    exit 1
fi
echo "gpu check passed: every CUDA test, and the table above ($DIR/bench.json)"
