"""Throughput of the real train step on synthetic data, optionally beside PyTorch on the same model.

  python -m trainer.benchmark --config=configs/bench.py [--steps=N] [--compare_torch]

Compiles the jitted, state-donating train step, runs warm-up steps, then times `--steps` steps in
`--rounds` rounds and reports the median round. Prints a table and, last, one JSON line with
tokens_per_sec, step_time_s, model_flops_per_token, mfu, compile_s, peak_memory_bytes and device.
On an accelerator the MFU is against the device's dense bf16 peak (trainer/flops.py); on CPU it is
against the host's fp32 matmul peak measured before every round (one independent matmul per core
at once; the best counts). On CPU the host is one JAX device by default: XLA:CPU's matmuls then
use every core, which measured faster on the bench model than one device per core with the batch
split over them (`--cpu_devices=0`). The next synthetic batch is built while the dispatched step
runs.

With --compare_torch, a child process trains `transformers.LlamaForCausalLM` with
`torch.optim.AdamW` (same shapes, batch, loss, clipping and weight-decay mask, as many threads as
the host has cores) in rounds alternating with JAX's, so both see the same machine load.

Imports only jax, flax, optax, ml_collections and numpy (torch only in that child): the GPU image
has no CLU, TensorFlow or grain.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import statistics
import sys
import time
from typing import Any

from trainer import tpu_flags

# Before jax loads: on a TPU VM, `import jax` itself sets LIBTPU_INIT_ARGS (a launch barrier flag).
tpu_flags.init_args()

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from data.batching import batch_sharding  # noqa: E402
from data.synthetic import SyntheticPipeline  # noqa: E402
from model import Llama3  # noqa: E402
from model.attention import describe_attention  # noqa: E402
from trainer import flops, optimizer  # noqa: E402
from trainer import state as state_lib  # noqa: E402
from trainer import step as step_lib  # noqa: E402
from trainer.checks import batch_split, check_batch_fits_mesh, validate  # noqa: E402
from trainer.cli import load_config, out_of_memory, parse_flags, progress  # noqa: E402
from trainer.mesh import (  # noqa: E402
  MESH_AXES,
  MeshError,
  create_mesh,
  mesh_context,
  resolve_shape,
)
from trainer.torch_reference import TorchRunner  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)
_STEPS = flags.DEFINE_integer(
  "steps", None, "Timed steps (default: the config's `steps`).", lower_bound=1
)
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compiling.", lower_bound=0)
_ROUNDS = flags.DEFINE_integer(
  "rounds", 4, "Timed steps are split into rounds; the median counts.", lower_bound=1
)
_TORCH = flags.DEFINE_bool("compare_torch", False, "Also time PyTorch transformers on this CPU.")
_CPU_DEVICES = flags.DEFINE_integer(
  "cpu_devices", 1, "JAX CPU devices unless XLA_FLAGS sets them (0: one per core)."
)
_PROFILE = flags.DEFINE_string("profile_dir", "", "Write a jax.profiler trace of one extra round.")
flags.mark_flags_as_required(["config"])


def cpu_device_count(config: Any, cores: int) -> int:
  """How many CPU devices to split the host into: one per core, as far as mesh and batch allow."""
  sizes = [int(config.mesh[a]) for a in MESH_AXES]
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 not in sizes:
    return fixed
  rows = config.global_batch_size // config.grad_accum_steps
  for n in range(cores, fixed - 1, -1):
    try:
      shape = dict(zip(MESH_AXES, resolve_shape(sizes, n, "mesh")))
    except MeshError:
      continue
    if rows % batch_split(config, shape)[0] == 0:
      return n
  return fixed


def peak_memory(compiled: Any, device: Any) -> tuple[int, str]:
  """Peak bytes on one device: the allocator's count where there is one, else XLA's estimate."""
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and stats.get("peak_bytes_in_use"):
    return int(stats["peak_bytes_in_use"]), "allocator"
  m = compiled.memory_analysis()
  total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
  return int(total + m.temp_size_in_bytes), "compiler estimate"


def benchmark(
  config: Any,
  *,
  steps: int,
  warmup: int = 2,
  rounds: int = 4,
  torch_runner: TorchRunner | None = None,
  profile_dir: str = "",
) -> dict[str, Any]:
  """Compiles and times the train step of `config` on all default devices; returns the results."""
  mcfg = state_lib.model_config(config)
  devices = jax.devices()
  mesh = create_mesh(config.mesh, devices)
  check_batch_fits_mesh(config, mesh)
  rules = state_lib.logical_rules(config)
  model = Llama3(mcfg)
  tx = optimizer.make_optimizer(config)
  state, shardings = state_lib.create_sharded_state(model, tx, mesh, rules, config.seed)
  step_fn = step_lib.jit_train_step(
    config, model, tx, optimizer.learning_rate_schedule(config), mesh, rules, shardings
  )
  pipeline = SyntheticPipeline(
    seed=config.seed,
    global_batch=config.global_batch_size,
    seq_len=config.seq_len,
    vocab_size=mcfg.vocab_size,
    sharding=batch_sharding(mesh, config.sharding_rules),
  )
  batches = pipeline.train_batches(0)
  batch = next(batches)
  on_cpu = devices[0].platform == "cpu"
  rounds = max(min(rounds, steps), 1)
  per_round = [steps // rounds + (r < steps % rounds) for r in range(rounds)]
  peaks, torch_times, torch_loss = [], [], float("nan")

  with mesh_context(mesh):
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
  progress(f"compiled the train step in {compile_s:.1f} s; {warmup} warm-up steps")
  # The AOT-compiled step needs no ambient mesh; the peak matmuls must not have one.
  done, metrics = 0, None
  for _ in range(warmup):
    # The next batch is built on the host while the dispatched step runs.
    state, metrics = compiled(state, batch)
    batch = next(batches)
    done += 1
  jax.block_until_ready((state, metrics))
  if torch_runner is not None:
    torch_runner.run(0, max(warmup, 1))
  times = []
  for n in per_round:
    if on_cpu:
      peaks.append(flops.cpu_matmul_peak(devices))
    t0 = time.perf_counter()
    for _ in range(n):
      state, metrics = compiled(state, batch)
      batch = next(batches)
    jax.block_until_ready((state, metrics))
    times.append((time.perf_counter() - t0) / n)
    progress(f"round {len(times)} of {rounds}: {n} steps at {times[-1]:.3f} s/step")
    if torch_runner is not None:
      seconds, torch_loss = torch_runner.run(done, n)
      torch_times.append(seconds / n)
    done += n
  if profile_dir:
    with jax.profiler.trace(profile_dir):
      for _ in range(per_round[0]):
        state, metrics = compiled(state, batch)
        batch = next(batches)
      jax.block_until_ready((state, metrics))

  tokens = config.global_batch_size * config.seq_len
  step_time = statistics.median(times)
  fpt = flops.model_flops_per_token(mcfg, config.seq_len)
  peak = max(peaks) if on_cpu else len(devices) * flops.device_peak_flops(devices[0])
  memory, memory_source = peak_memory(compiled, devices[0])
  result = {
    "tokens_per_sec": tokens / step_time,
    "step_time_s": step_time,
    "model_flops_per_token": fpt,
    "mfu": tokens / step_time * fpt / peak,
    "compile_s": compile_s,
    "peak_memory_bytes": memory,
    "device": f"{len(devices)} x {devices[0].device_kind}",
    "peak_flops": peak,
    "peak_flops_kind": "measured fp32 matmul, all cores" if on_cpu else "dense bf16 table",
    "peak_memory_source": memory_source,
    "step_times_s": times,
    "loss": float(metrics["loss"]),
    "attention": describe_attention(
      mcfg.attention, head_dim=mcfg.head_dim, seq_len=config.seq_len, dtype=mcfg.dtype
    ),
    "global_batch_size": config.global_batch_size,
    "seq_len": config.seq_len,
    "dtype": mcfg.dtype,
    "remat": mcfg.remat,
  }
  if not math.isfinite(result["loss"]):
    raise ValueError(
      f"The benchmark's loss is {result['loss']}, so its timings mean nothing; check "
      "model.dtype and optimizer.learning_rate."
    )
  if torch_runner is not None:
    torch_step = statistics.median(torch_times)
    torch_peak = torch_runner.matmul_peak()
    result.update(
      torch_tokens_per_sec=tokens / torch_step,
      torch_step_time_s=torch_step,
      torch_step_times_s=torch_times,
      torch_mfu=tokens / torch_step * fpt / peak,
      torch_matmul_peak_flops=torch_peak,
      torch_loss=torch_loss,
      speedup_vs_torch=torch_step / step_time,
    )
  return result


def table(result: dict[str, Any]) -> str:
  """The human-readable summary printed before the JSON line."""
  rows = [("JAX", result["tokens_per_sec"], result["step_time_s"], result["mfu"])]
  if "torch_tokens_per_sec" in result:
    rows.append(
      ("PyTorch", result["torch_tokens_per_sec"], result["torch_step_time_s"], result["torch_mfu"])
    )
  fpt = result["model_flops_per_token"]
  lines = [
    f"device {result['device']}, {result['dtype']}, batch {result['global_batch_size']} x "
    f"{result['seq_len']}, attention: {result['attention']}",
    f"model FLOPs/token {fpt:.4g}; peak {result['peak_flops'] / 1e12:.3f} TFLOP/s "
    f"({result['peak_flops_kind']}); compile {result['compile_s']:.1f} s; peak memory "
    f"{result['peak_memory_bytes'] / 2**20:.0f} MiB/device ({result['peak_memory_source']})",
    f"{'':8} {'tokens/s':>10} {'step ms':>9} {'TFLOP/s':>8} {'MFU':>6}",
  ]
  for name, tps, step, mfu in rows:
    lines.append(f"{name:8} {tps:10.0f} {step * 1e3:9.1f} {tps * fpt / 1e12:8.3f} {mfu:6.1%}")
  if "speedup_vs_torch" in result:
    lines.append(
      f"JAX / PyTorch tokens/s: {result['speedup_vs_torch']:.2f}x (PyTorch fp32 matmul peak "
      f"{result['torch_matmul_peak_flops'] / 1e12:.3f} TFLOP/s)"
    )
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  del argv
  try:
    config = load_config(_CONFIG)
    validate(config)  # The trainer's checks: one line, not a traceback from inside jit.
  except ValueError as e:
    sys.exit(f"error: {e}")
  if _CPU_DEVICES.value < 0:
    sys.exit(f"error: --cpu_devices={_CPU_DEVICES.value} must be 0 (one per core) or more.")
  cores = len(os.sched_getaffinity(0))
  if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    n = _CPU_DEVICES.value or cpu_device_count(config, cores)
    jax.config.update("jax_num_cpu_devices", n)  # Before any backend exists.
  runner = None
  if _TORCH.value:
    if jax.default_backend() != "cpu":
      sys.exit("error: --compare_torch compares on CPU; run with JAX_PLATFORMS=cpu.")
    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
      sys.exit(f"error: --compare_torch needs {' and '.join(missing)}: pip install -e '.[test]'.")
    runner = TorchRunner(config, threads=cores)
  try:
    result = benchmark(
      config,
      steps=_STEPS.value if _STEPS.value is not None else int(config.steps),
      warmup=_WARMUP.value,
      rounds=_ROUNDS.value,
      torch_runner=runner,
      profile_dir=_PROFILE.value,
    )
  except (ValueError, MeshError, jax.errors.JaxRuntimeError) as e:
    oom = out_of_memory(e)
    if os.environ.get("LLAMA_TRACEBACK") or (isinstance(e, RuntimeError) and not oom):
      raise
    sys.exit(f"error: {' '.join((oom or str(e)).split())}")
  finally:
    if runner is not None:
      runner.close()
  print(table(result), flush=True)
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
