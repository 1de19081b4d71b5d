#!/usr/bin/env bash
# The GPU checks of issue #16, on a machine with torch and transformers but no network:
# benchmarks/sdpa_shapes.py (attention per backend, seen and new shapes), then
# benchmarks/generation.py and benchmarks/search.py on CUDA in bf16 (random models of SmolLM2's
# and Qwen2's architecture), then one short qstar iteration (cluster=local).
#
#   benchmarks/gpu_check.sh WHEELS_DIR OUT_DIR     # WHEELS_DIR: "-" when qstar's deps are there
#
# WHEELS_DIR holds the wheels of qstar's other dependencies (trl, datasets, hydra-core,
# omegaconf, antlr4-python3-runtime, accelerate, reasoning-gym, math-verify and theirs; at most
# 64 MiB in all; made where there is network with `pip download -d DIR --no-deps ...`). Ray's
# wheel and the 98 MB GGUF do not fit, so the models are randomly initialised ones built from a
# config (benchmarks/bench_models.py, benchmarks/random_model.py) and the run uses cluster=local.
# The benchmarks use SmolLM2's tokenizer where ~/.cache/qstar/tokenizers/smollm2-135m holds it
# (3.4 MB; it travels), else the tests' per-character one; the loop always uses the latter.
# Environment: DEVICE (cuda), DTYPE (bfloat16), LAYERS (30, the loop's model), BENCH_LAYERS (the
# benchmarks' random models; default the architecture's own: 30, 24), PYTHON (python3),
# BATCHES (1,8,32,64), ARCHS (smollm2,qwen2), SEARCH_PROBLEMS (64), SEARCH_SIMULATIONS (8),
# SEARCH_STREAMS (true,false: search.stream values, each a search_<arch>[_lockstep].json),
# SDPA_ROWS (32,160), SDPA_KV (256,1024), SDPA_CALLS (40).
# The tests run it with DEVICE=cpu DTYPE=float32 LAYERS=2 BENCH_LAYERS=2 and small sizes
# (tests/test_cluster.py).
set -euo pipefail
wheels=${1:?usage: gpu_check.sh WHEELS_DIR OUT_DIR}
out=${2:?usage: gpu_check.sh WHEELS_DIR OUT_DIR}
DEVICE=${DEVICE:-cuda} DTYPE=${DTYPE:-bfloat16} LAYERS=${LAYERS:-30} PYTHON=${PYTHON:-python3}
BATCHES=${BATCHES:-1,8,32,64} ARCHS=${ARCHS:-smollm2,qwen2}
SEARCH_PROBLEMS=${SEARCH_PROBLEMS:-64} SEARCH_SIMULATIONS=${SEARCH_SIMULATIONS:-8}
SEARCH_STREAMS=${SEARCH_STREAMS:-true,false} BENCH_LAYERS=${BENCH_LAYERS:-}
SDPA_ROWS=${SDPA_ROWS:-32,160} SDPA_KV=${SDPA_KV:-256,1024} SDPA_CALLS=${SDPA_CALLS:-40}
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

"$PYTHON" "$repo/benchmarks/sdpa_shapes.py" --device "$DEVICE" --dtype "$DTYPE" --rows "$SDPA_ROWS" \
  --kv "$SDPA_KV" --calls "$SDPA_CALLS" --output "$out/sdpa_shapes.json"
for arch in ${ARCHS//,/ }; do
  layers=${BENCH_LAYERS:+--layers=$BENCH_LAYERS}  # empty: the architecture's own layers
  "$PYTHON" "$repo/benchmarks/generation.py" --random-init "$arch" $layers --device "$DEVICE" \
    --dtype "$DTYPE" --batches "$BATCHES" --max-new-tokens 32 --repeats 1 \
    --out "$out/generation_$arch.json"
  for stream in ${SEARCH_STREAMS//,/ }; do  # streaming search, then lock-step rounds
    name=search_$arch$([ "$stream" = true ] || echo _lockstep)
    "$PYTHON" "$repo/benchmarks/search.py" --random-init "$arch" $layers --device "$DEVICE" \
      --dtype "$DTYPE" --problems "$SEARCH_PROBLEMS" --simulations "$SEARCH_SIMULATIONS" \
      --no-best-of-n --output "$out/$name.json" "search.stream=$stream" > "$out/$name.log"
    tail -n 1 "$out/$name.log"
  done
done

"$PYTHON" "$repo/benchmarks/random_model.py" "$out/model" --layers "$LAYERS"
start=$(date +%s)
"$PYTHON" -m pipeline.cli run debug=default "model=$out/model" "model.device=$DEVICE" \
  "model.dtype=$DTYPE" model.cache_dir="$out/cache" cluster=local iterations=1 \
  eval.decodes=[greedy] "hydra.run.dir=$out/run"
echo "{\"loop_seconds\": $(( $(date +%s) - start )), \"device\": \"$DEVICE\", \"dtype\": \"$DTYPE\", \"layers\": $LAYERS}" \
  > "$out/loop.json"
echo "gpu_check: ok ($out/run, $out/loop.json, $out/sdpa_shapes.json, $out/generation_*.json, $out/search_*.json)"
