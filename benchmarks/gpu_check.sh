#!/usr/bin/env bash
# One short qstar iteration in bf16 on CUDA (cluster=local), then benchmarks/generation.py on
# CUDA, on a machine with torch and transformers but no network.
#
#   benchmarks/gpu_check.sh WHEELS_DIR OUT_DIR     # WHEELS_DIR: "-" when qstar's deps are there
#
# WHEELS_DIR holds the wheels of qstar's other dependencies (trl, datasets, hydra-core,
# omegaconf, antlr4-python3-runtime, accelerate, reasoning-gym, math-verify and theirs; at most
# 64 MiB in all; made where there is network with `pip download -d DIR --no-deps ...`). Ray's
# wheel and the 98 MB GGUF do not fit, so the model is a randomly initialised one of SmolLM2-135M's
# architecture (benchmarks/random_model.py) and the run uses cluster=local.
# Environment: DEVICE (cuda), DTYPE (bfloat16), LAYERS (30), PYTHON (python3), BATCHES (1,8,32,64).
# The tests run it with DEVICE=cpu DTYPE=float32 LAYERS=2 (tests/test_cluster.py).
set -euo pipefail
wheels=${1:?usage: gpu_check.sh WHEELS_DIR OUT_DIR}
out=${2:?usage: gpu_check.sh WHEELS_DIR OUT_DIR}
DEVICE=${DEVICE:-cuda} DTYPE=${DTYPE:-bfloat16} LAYERS=${LAYERS:-30} PYTHON=${PYTHON:-python3}
BATCHES=${BATCHES:-1,8,32,64}
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"

if [ "$wheels" != "-" ]; then
  size=$(du -sb "$wheels" | cut -f1)
  if [ "$size" -gt $((64 * 1024 * 1024)) ]; then
    echo "error: $wheels holds $size bytes; at most 64 MiB" >&2; exit 2
  fi
  "$PYTHON" -m pip install --quiet --no-index --find-links "$wheels" "$wheels"/*.whl
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"  # qstar itself from this checkout
"$PYTHON" -c "import torch, transformers, trl, datasets, hydra, reasoning_gym, math_verify"
"$PYTHON" -c "import torch, sys; d = sys.argv[1]; \
  sys.exit(0 if d == 'cpu' or torch.cuda.is_available() else 'error: DEVICE=cuda but torch sees no GPU')" "$DEVICE"

export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error QSTAR_PROGRESS=0 WANDB_MODE=disabled
"$PYTHON" "$repo/benchmarks/random_model.py" "$out/model" --layers "$LAYERS"
start=$(date +%s)
"$PYTHON" -m pipeline.cli run debug=default "model=$out/model" "model.device=$DEVICE" \
  "model.dtype=$DTYPE" model.cache_dir="$out/cache" cluster=local iterations=1 \
  eval.decodes=[greedy] "hydra.run.dir=$out/run"
echo "{\"loop_seconds\": $(( $(date +%s) - start )), \"device\": \"$DEVICE\", \"dtype\": \"$DTYPE\", \"layers\": $LAYERS}" \
  > "$out/loop.json"
"$PYTHON" "$repo/benchmarks/generation.py" --model "$out/model" --device "$DEVICE" \
  --dtype "$DTYPE" --batches "$BATCHES" --max-new-tokens 32 --repeats 1 --out "$out/generation.json"
echo "gpu_check: ok ($out/run, $out/loop.json, $out/generation.json)"
