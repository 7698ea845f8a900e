#!/usr/bin/env bash
# Issue 14's GPU checks for a lent GPU machine (bare, no package index; 10 minutes a command, 15 a session), in parts
# of about 5 minutes, one device call each (timeout_s 420), most important first: a session of 15 minutes, a minute
# or two of it starting the machine, runs `tests` and `bench`; `fp32` is for the next one.
#
#     bash scripts/gpu_run.sh tests [OUT]   # tests/test_gpu.py: every CUDA path against the fp32 eager reference
#     bash scripts/gpu_run.sh bench [OUT]   # hf-posenc bench: the bf16 attention table at 1k-32k (forward and
#                                           # forward+backward), then whole-model training steps (bf16 autocast,
#                                           # AdamW, every bias scheme) and training memory at 16k
#     bash scripts/gpu_run.sh fp32 [OUT]    # the fp32 attention table and the rotary step
#
# OUT: where logs and results go (default: $OUT, else gpu_out). Parts are stopped with SIGINT at their limit: pytest
# still writes its JUnit report, and the bench writes the lengths and sections it finished (marked interrupted). Exits
# with the worst part's status. Wheels in .whl/ (transformers 5.2x; any package the machine lacks) are installed
# first, as the device README says: carry .whl. Copy OUT's bench_gpu_*.{json,md} to examples/results/ afterwards.
set -uo pipefail
what=${1:-}
if [[ ! $what =~ ^(tests|bench|fp32)$ ]]; then
    echo "usage: gpu_run.sh tests|bench|fp32 [OUT] (got '$what')" >&2
    exit 2
fi
out=${2:-${OUT:-gpu_out}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH="/tmp/site:$PWD"
fi
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA')" | tee "$out/versions.txt"
if [[ ${HF_POSENC_TEST_DEVICE:-} != cpu ]]; then  # (HF_POSENC_TEST_DEVICE=cpu: a dry run of the tests part)
    python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" || exit 1
fi

worst=0
part() {  # part NAME SECONDS COMMAND...: run with a limit, log to OUT/NAME.log, go on whatever it returns
    local name=$1 seconds=$2 status
    shift 2
    echo "== $name (at most ${seconds}s)"
    timeout -s INT -k 20 "$seconds" "$@" 2>&1 | tee "$out/$name.log"
    status=${PIPESTATUS[0]}
    echo "== $name: exit $status"
    if ((status > worst)); then worst=$status; fi
}
bench=(python3 -m hf_posenc.cli bench --heads 16 --head-dim 64 --repeats 5 --dense-max 4096)
case $what in
tests)
    part gpu_tests 300 python3 -m pytest -q -n 0 -m gpu -p no:cacheprovider tests/test_gpu.py --durations 15 \
        --junitxml "$out/gpu_tests.xml"
    ;;
bench)
    part bench_attention_bf16 180 "${bench[@]}" --sections attention --dtypes bfloat16 \
        --lengths 1024,2048,4096,8192,16384,32768 --backward-max 32768 --out "$out/bench_gpu_attention_bf16.json"
    part bench_models 120 "${bench[@]}" --sections models,memory --model-length 1024 --memory-length 16384 \
        --out "$out/bench_gpu_models.json"
    ;;
fp32)
    part bench_attention_fp32 240 "${bench[@]}" --sections attention,rotary --dtypes float32 \
        --lengths 1024,4096,8192,16384 --backward-max 16384 --out "$out/bench_gpu_attention_fp32.json"
    ;;
esac
exit $worst
