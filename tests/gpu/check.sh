#!/usr/bin/env bash
# GPU check: Llama 3.2 1B at seq 4096 in bf16 with cuDNN attention on one H100; prints the MFU.
# Goal: MFU >= 55% (model FLOPs, trainer/flops.py, against the H100's 989 TFLOP/s dense bf16).
#
#   bash tests/gpu/check.sh            # from the repo root or anywhere; about 5-8 minutes
#
# It runs `python -m trainer.benchmark` for a few batch:remat settings (each under a timeout, so
# one that runs out of memory cannot eat the budget), shows each result, and ends with one line:
# the best MFU. Knobs: RUNS="batch:remat ...", STEPS, CONFIG, SEQ, DTYPE, ATTENTION, EXTRA (more
# benchmark flags), XLA_FLAGS. A dry run of the script's logic on CPU:
#   CONFIG=configs/bench.py SEQ=256 DTYPE=float32 ATTENTION=auto RUNS=8:none STEPS=2 \
#     bash tests/gpu/check.sh
#
# The GPU image (jax 0.11 with CUDA, flax, optax, numpy; no network) has no ml_collections, which
# the config files need; trainer.benchmark imports nothing else missing there (no CLU, grain,
# TensorFlow). Carry it as a pure-Python wheel (~80 KB; it needs absl-py and PyYAML, which the
# image has): on a machine with network, from the repo root,
#   python -m pip download --no-deps --dest tests/gpu/wheels ml_collections
# then send tests/gpu/wheels along (untracked files travel with the working tree; if a
# .gitignore covers it, name it in the device tool's `carry`). When `import ml_collections`
# fails, this script installs the wheels found there into a temporary dir on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-python3}
STEPS=${STEPS:-10}
RUNS=${RUNS:-"8:none 8:dots_no_batch 16:full"}
CONFIG=${CONFIG:-configs/llama3_2_1b.py}
SEQ=${SEQ:-4096}
DTYPE=${DTYPE:-bfloat16}
ATTENTION=${ATTENTION:-cudnn}
EXTRA=${EXTRA:-}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-3}

if ! "$PYTHON" -c "import ml_collections" 2>/dev/null; then
  shopt -s nullglob
  wheels=(tests/gpu/wheels/*.whl)
  if ((${#wheels[@]} == 0)); then
    echo "error: ml_collections is not installed and tests/gpu/wheels/ has no wheel (see the" \
      "comment at the top of $0)." >&2
    exit 2
  fi
  site=$(mktemp -d)
  "$PYTHON" -m pip install --quiet --no-index --no-deps --target "$site" "${wheels[@]}"
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

"$PYTHON" -c 'import jax; print("jax", jax.__version__, jax.devices())'

results=$(mktemp)
for run in $RUNS; do
  batch=${run%%:*}
  remat=${run##*:}
  echo "=== batch $batch x $SEQ, remat $remat ==="
  log=$(mktemp)
  # shellcheck disable=SC2086  # EXTRA is a list of flags.
  if timeout 420 "$PYTHON" -m trainer.benchmark --config="$CONFIG" \
    --config.seq_len="$SEQ" --config.global_batch_size="$batch" \
    --config.model.dtype="$DTYPE" --config.model.attention="$ATTENTION" \
    --config.model.remat="$remat" --steps="$STEPS" --warmup=2 --rounds=2 $EXTRA >"$log" 2>&1; then
    tail -n 6 "$log"
    tail -n 1 "$log" >>"$results"
  else
    tail -n 25 "$log"
    echo "(batch $batch, remat $remat failed or timed out)"
  fi
done

"$PYTHON" - "$results" <<'PY'
import json
import sys

rows = [json.loads(line) for line in open(sys.argv[1]) if line.startswith("{")]
if not rows:
  sys.exit("no setting finished")
best = max(rows, key=lambda r: r["mfu"])
print(
  f"BEST MFU {best['mfu']:.1%} (goal 55%): {best['tokens_per_sec']:.0f} tokens/s, batch "
  f"{best['global_batch_size']} x {best['seq_len']}, remat {best['remat']}, {best['device']}, "
  f"peak memory {best['peak_memory_bytes'] / 2**30:.1f} GiB, attention {best['attention']}"
)
PY
