#!/usr/bin/env bash
# GPU check: Llama 3.2 1B at seq 4096 in bf16 with cuDNN attention on one H100 or H200; prints
# the MFU.
# Goal: MFU >= 55% (model FLOPs, trainer/flops.py, against the 989 TFLOP/s dense bf16 of both).
#
#   bash tests/gpu/check.sh            # from the repo root or anywhere; about 5-8 minutes
#
# It runs `python -m trainer.benchmark` for a few batch:remat settings (each under a timeout, so
# one that runs out of memory cannot eat the budget), shows each result, and ends with one line:
# the best MFU; it exits 1 if that is below GOAL (0.55) or a loss is not finite. First it checks
# the cuDNN attention kernel against the XLA reference. Knobs: RUNS="batch:remat ...", STEPS,
# CONFIG, SEQ, DTYPE, ATTENTION, EXTRA (more benchmark flags), GOAL, XLA_FLAGS. A dry run of the
# script's logic on CPU (no cuDNN check):
#   CONFIG=configs/bench.py SEQ=256 DTYPE=float32 ATTENTION=auto RUNS=8:none STEPS=2 GOAL=0 \
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
GOAL=${GOAL:-0.55} # The exit status is 1 when the best MFU is below it.
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

# The cuDNN kernel itself against the XLA reference (bf16; causal, two documents per row,
# GQA): outputs and gradients. CPU tests run only the same call through XLA.
"$PYTHON" - <<'PY'
import jax
import jax.numpy as jnp
import numpy as np

from model.attention import attention_mask, cudnn_attention, xla_attention

if jax.default_backend() != "gpu":
  raise SystemExit(print("no GPU: the cuDNN attention check is skipped (a dry run)"))
b, t, n, k, h = 2, 512, 8, 2, 128
rng = np.random.default_rng(0)
q, kk, v, w = (
  jnp.asarray(rng.standard_normal(s), jnp.bfloat16)
  for s in ((b, t, n, h), (b, t, k, h), (b, t, k, h), (b, t, n, h))
)
seg = np.ones((b, t), np.int32)
seg[0, 200:], seg[1, 37:] = 2, 2
seg = jnp.asarray(seg)
fns = {
  "cudnn": lambda q, k, v: cudnn_attention(q, k, v, seg),
  "xla": lambda q, k, v: xla_attention(q, k, v, attention_mask(seg, seg)),
}
out = {}
for name, f in fns.items():
  loss = lambda q, k, v, f=f: jnp.sum(w.astype(jnp.float32) * f(q, k, v).astype(jnp.float32))
  out[name] = (f(q, kk, v), *jax.jit(jax.grad(loss, (0, 1, 2)))(q, kk, v))
worst = 0.0
for label, got, want in zip(("out", "dq", "dk", "dv"), out["cudnn"], out["xla"]):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  err = float(np.abs(got - want).max() / np.abs(want).max())
  worst = max(worst, err)
  print(f"cuDNN vs XLA attention, {label}: max error {err:.2e} of the largest value")
if not worst < 3e-2:  # bf16 keeps 8 bits (3.9e-3); jax.nn through XLA is 9.2e-3 off.
  raise SystemExit(f"cuDNN attention differs from the XLA reference ({worst:.2e})")
PY

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

"$PYTHON" - "$results" "$GOAL" <<'PY'
import json
import math
import sys

rows = [json.loads(line) for line in open(sys.argv[1]) if line.startswith("{")]
if not rows:
  sys.exit("no setting finished")
best = max(rows, key=lambda r: r["mfu"])
goal = float(sys.argv[2])
print(
  f"BEST MFU {best['mfu']:.1%} (goal {goal:.0%}): {best['tokens_per_sec']:.0f} tokens/s, batch "
  f"{best['global_batch_size']} x {best['seq_len']}, remat {best['remat']}, {best['device']}, "
  f"peak memory {best['peak_memory_bytes'] / 2**30:.1f} GiB, attention {best['attention']}"
)
if not all(math.isfinite(r["loss"]) for r in rows):
  sys.exit("a setting's loss is not finite")
if best["mfu"] < goal:
  sys.exit(f"the best MFU is below the goal of {goal:.0%}")
PY
