#!/usr/bin/env bash
# Issue 14's GPU checks as one command for a lent GPU machine (bare, no package index, 10 minutes a command):
#
#     bash scripts/gpu_run.sh [OUT]          # OUT: where the logs and results go (default: $OUT, else gpu_out)
#
# 1. the GPU tests (tests/test_gpu.py: every CUDA path against the fp32 eager reference), with a JUnit report;
# 2. `hf-posenc bench` in parts, each written as soon as it ends (a part cut short loses only itself): the bf16
#    attention table at 1k-32k with forward+backward throughout, the whole-model training steps (bf16 autocast,
#    AdamW, every bias scheme, ratios to NoPE and stock), then the fp32 attention table;
# The parts' limits add up to 9 minutes, inside one call's 10 (scripts/gpu_smoke.py, nine architectures, is a call
# of its own).
# Wheels in .whl/ (transformers 5.2x, and any package the machine lacks) are installed first, as the device README
# says; carry .whl. Copy OUT's bench_gpu_*.{json,md} to examples/results/ afterwards.
set -uo pipefail
out=${1:-${OUT:-gpu_out}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH="/tmp/site:$PWD"
fi
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA')" | tee "$out/versions.txt"
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" || exit 1

part() {  # part NAME SECONDS COMMAND...: run with a limit, log to OUT/NAME.log, go on whatever it returns
    local name=$1 seconds=$2
    shift 2
    echo "== $name (at most ${seconds}s)"
    timeout "$seconds" "$@" 2>&1 | tee "$out/$name.log"
    echo "== $name: exit ${PIPESTATUS[0]}"
}
bench=(python3 -m hf_posenc.cli bench --heads 16 --head-dim 64 --repeats 5 --dense-max 4096)
part gpu_tests 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py --junitxml "$out/gpu_tests.xml"
part bench_attention_bf16 140 "${bench[@]}" --sections attention --dtypes bfloat16 \
    --lengths 1024,2048,4096,8192,16384,32768 --backward-max 32768 --out "$out/bench_gpu_attention_bf16.json"
part bench_models 110 "${bench[@]}" --sections models,memory --model-length 1024 --memory-length 16384 \
    --out "$out/bench_gpu_models.json"
part bench_attention_fp32 90 "${bench[@]}" --sections attention,rotary --dtypes float32 \
    --lengths 1024,4096,8192,16384 --backward-max 16384 --out "$out/bench_gpu_attention_fp32.json"
