#!/usr/bin/env bash
# The GPU checks in one run, each step under its own time limit: one log (gpu_check.log) and the JSONs in $OUT_DIR.
#   PY=python3 OUT_DIR=/tmp/gpu benchmarks/gpu_check.sh      (make gpu-check runs it with the project's venv)
# Steps: the machine and versions; the Triton cases on the GPU (bf16, fp32) against the torch reference; the Triton
# edge cases (tests/test_triton_edges.py: T = 1, k = E, duplicate ids, ragged H / I, bf16 ...) and the float64
# top-k sum a shard's partial sums need (tests/test_triton_combine.py), the experts' other activations and biases
# (tests/test_kernels_act.py: GPT-OSS, Gemma 4, Step-3.7); FP8 and
# staging on CUDA; the ahead-of-time compile check for this GPU's arch; the kernel benchmark, one JSON per model
# (a step that runs out of time loses only its own model); the serving benchmark without Ray Serve (LLM.generate,
# transformers and the gateway engine + 2 shard processes, all on the GPU; no Ray needed); with TUNE, tile tuning
# and the benchmark again on the tuned tables. Exit status: the number of failed steps.
set -u
PY=${PY:-python3}
OUT_DIR=${OUT_DIR:-benchmarks/results}
MODELS=${MODELS-"mixtral-8x7b qwen3-30b-a3b deepseek-v3-ep8 deepseek-v3-e256"}
SKIP=${SKIP:-}  # step names not to run, e.g. SKIP="triton-cases aot-check"
TUNE=${TUNE:-}  # models to tune (tune_moe.py --quick) and benchmark again with the tuned table, e.g. TUNE=mixtral-8x7b
BUDGET_S=${BUDGET_S:-100000}  # a step that could end past this many seconds is skipped (a leased GPU's time)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET ELASTICMOE_MOE_BACKEND
failed=0

LOG="$OUT_DIR/gpu_check.log"
step() {  # step NAME SECONDS COMMAND...: run, append its output to $LOG, count a failure
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    case " $SKIP " in *" $name "*) echo "=== $name: not asked for"; return ;; esac
    if [ $((SECONDS + limit)) -gt "$BUDGET_S" ]; then
        limit=$((BUDGET_S - SECONDS))
        [ "$limit" -ge 30 ] || { echo "=== $name: skipped (budget)"; failed=$((failed + 1)); return; }
    fi
    echo "=== $name (limit ${limit}s)"
    timeout --kill-after=5 "$limit" "$@" >"$OUT_DIR/.step.log" 2>&1
    rc=$?
    { echo "=== $name (rc=$rc)"; cat "$OUT_DIR/.step.log"; } >>"$LOG"
    tail -n 25 "$OUT_DIR/.step.log"
    rm -f "$OUT_DIR/.step.log"
    echo "=== $name: rc=$rc in $((SECONDS - t0))s"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

"$PY" - <<'EOF' || exit 99
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_check needs a CUDA GPU")
import triton
print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__,
      "gpu", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
EOF
mkdir -p "$OUT_DIR" && : >"$LOG"
ARCH=$("$PY" -c "import torch; print('%d%d' % torch.cuda.get_device_capability())")
step triton-cases 240 "$PY" -m pytest -q -ra -p no:cacheprovider tests/test_kernels_triton.py \
    -k "cuda or tensors_device or compile_for_sm90"
step triton-edges 180 "$PY" -m pytest -q -ra -p no:cacheprovider tests/test_triton_edges.py \
    tests/test_triton_combine.py tests/test_kernels_act.py -k cuda
step fp8-staging 120 "$PY" -m pytest -q -ra -p no:cacheprovider tests/test_triton_fp8.py tests/test_staging.py -k cuda
step aot-check 90 "$PY" -m elasticmoe.kernels.aot_check --arch "$ARCH"
for m in $MODELS; do
    step "bench-$m" 120 "$PY" benchmarks/kernels.py --models "$m" --out "$OUT_DIR/kernels-$m.json"
done
step serving-noserve 240 "$PY" benchmarks/serving.py --no-serve --device cuda --hidden 1024 --intermediate 2048 \
    --out "$OUT_DIR/serving-noserve-cuda.json"
for m in $TUNE; do
    step "tune-$m" 420 "$PY" benchmarks/tune_moe.py --model "$m" --quick --out-dir "$OUT_DIR/moe_configs"
    step "bench-tuned-$m" 120 env ELASTICMOE_MOE_CONFIG_DIR="$OUT_DIR/moe_configs" "$PY" benchmarks/kernels.py \
        --models "$m" --out "$OUT_DIR/kernels-tuned-$m.json"
done
echo "gpu_check: $failed failed step(s)"
exit "$failed"
