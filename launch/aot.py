"""AOT compiles of the train step for TPU devices, and what the compiler says: HBM, FLOPs, bytes.

XLA's cost analysis counts a loop body once, so a scanned layer stack, the chunked loss and
gradient accumulation are all under-counted in the real step. `step_cost` therefore compiles two
loop-free cost probes (the step unscanned with 1 and 2 layers, the loss unchunked, one
microbatch) and extrapolates linearly in depth and microbatches.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import re
import time
from collections.abc import Iterator
from typing import Any
from unittest import mock

import jax
import jax.numpy as jnp

from model import Llama3
from trainer import optimizer
from trainer import state as state_lib
from trainer import step as step_lib
from trainer.checks import check_batch_fits_mesh, validate
from trainer.cli import progress
from trainer.mesh import create_mesh, mesh_context

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2}
_DTYPE_BYTES.update({"f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8})
_COLLECTIVE_OP = re.compile(
  r"\s(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(-start)?\("
)


@dataclasses.dataclass
class Compiled:
  """What one AOT compile of a train step says, per device."""

  fits: bool
  peak_bytes: int  # Peak HBM; a lower bound when the compiler ran out of memory.
  compile_s: float
  cost: dict[str, float] | None = None  # flops, bytes, seconds (optimal_seconds), ici_bytes.
  note: str = ""


def with_overrides(config: Any, **overrides: Any) -> Any:
  """A copy of `config` with dotted keys (as `model__remat`) set."""
  config = copy.deepcopy(config)
  for key, value in overrides.items():
    *parents, leaf = key.split("__")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def _array_bytes(type_text: str) -> list[int]:
  sizes = []
  for dtype, dims in re.findall(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]", type_text):
    n = math.prod(int(d) for d in dims.split(",") if d)
    sizes.append(n * _DTYPE_BYTES.get(dtype, 1 if dtype.startswith("f8") else 4))
  return sizes


def _group_size(line: str, default: int) -> int:
  if m := re.search(r"replica_groups=\{\{([0-9,]*)\}", line):
    return len(m.group(1).split(","))
  if m := re.search(r"replica_groups=\[\d+,(\d+)\]<=", line):
    return int(m.group(1))
  if m := re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", line):
    sizes = dict(re.findall(r"'(\w+)'=(\d+)", m.group(1)))
    return math.prod(int(sizes.get(a, 1)) for a in re.findall(r"'(\w+)'", m.group(2)))
  return default


def collective_bytes(hlo_text: str, num_devices: int) -> float:
  """Bytes one device sends over ICI per run of a loop-free compiled HLO module (ring model).

  A collective shows up once per fusion that uses a piece of it; its channel_id is counted once.
  """
  seen, total = set(), 0.0
  for line in hlo_text.splitlines():
    m = _COLLECTIVE_OP.search(line)
    if m is None or " = " not in line[: m.start() + 1]:
      continue
    channel = re.search(r"channel_id=(\d+)", line)
    if channel is not None:
      if channel.group(1) in seen:
        continue
      seen.add(channel.group(1))
    op, start = m.group(1), m.group(2)
    sizes = _array_bytes(line[line.index(" = ") + 3 : m.start()])
    if not sizes:
      continue
    # Async starts return (operand, result, scratch...): the largest array is the payload.
    size = max(sizes) if start and op != "all-reduce" else sum(sizes)
    n = _group_size(line, num_devices)
    if op == "collective-permute":
      total += size
    elif n > 1:
      scale = {"all-reduce": 2.0, "reduce-scatter": float(n)}.get(op, 1.0)
      total += scale * size * (n - 1) / n
  return total


def parse_oom(message: str, argument_bytes: int) -> int | None:
  """Peak HBM bytes (a lower bound) from libtpu's out-of-memory compile error, if it is one."""
  num = r"([0-9.]+)([KMGT]?)"
  if m := re.search(rf"HLO temporaries \({num}\) exceeds available HBM", message):
    return int(float(m.group(1)) * _UNITS[m.group(2)]) + argument_bytes
  if m := re.search(rf"Used {num} of {num} hbm", message):
    return int(float(m.group(1)) * _UNITS[m.group(2)])
  return None


def _abstract_batch(config: Any, mesh: Any) -> dict[str, jax.ShapeDtypeStruct]:
  shape = (config.global_batch_size, config.seq_len)
  return {
    key: jax.ShapeDtypeStruct(shape, jnp.float32 if key == "loss_mask" else jnp.int32, sharding=s)
    for key, s in step_lib.batch_shardings(mesh, state_lib.logical_rules(config)).items()
  }


def _shard_bytes(tree: Any) -> int:
  leaves = jax.tree.leaves(tree)
  return sum(
    math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize for x in leaves
  )


@contextlib.contextmanager
def traced_as(platform: str) -> Iterator[None]:
  """Model code picks kernels by `jax.default_backend()` (splash, and Pallas compiled rather than
  interpreted, on TPU); tracing here must make the choices the target platform's host makes."""
  with mock.patch.object(jax, "default_backend", lambda: platform):
    yield


def compile_step(config: Any, devices: list[Any], hbm_bytes: int, with_hlo: bool = False):
  """AOT-compiles the real train step for `config` on `devices`; returns (Compiled, hlo text)."""
  with traced_as(devices[0].platform):
    return _compile_step(config, devices, hbm_bytes, with_hlo)


def _compile_step(config: Any, devices: list[Any], hbm_bytes: int, with_hlo: bool):
  validate(config)
  mesh = create_mesh(config.mesh, devices)
  check_batch_fits_mesh(config, mesh)
  model = Llama3(state_lib.model_config(config))
  rules = state_lib.logical_rules(config)
  tx = optimizer.make_optimizer(config)
  shardings, state = state_lib.state_layout(model, tx, mesh, rules)
  batch = _abstract_batch(config, mesh)
  train_step = step_lib.jit_train_step(
    config, model, tx, optimizer.learning_rate_schedule(config), mesh, rules, shardings
  )
  m = config.model
  progress(
    f"compiling the train step for {len(devices)} {devices[0].platform} devices: mesh "
    f"{dict(mesh.shape)}, {m.num_layers} layers{' scanned' if m.scan_layers else ''}, remat "
    f"{m.remat}, batch {config.global_batch_size} x {config.seq_len}"
  )
  t0 = time.perf_counter()
  # A compile-only executable cannot be loaded back from the persistent cache: never write one.
  min_time = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float("inf"))
  try:
    with mesh_context(mesh):
      compiled = train_step.lower(state, batch).compile()
  except jax.errors.JaxRuntimeError as e:
    peak = parse_oom(str(e), _shard_bytes((state, batch)))
    if peak is None:
      raise
    progress(f"out of HBM after {time.perf_counter() - t0:.0f} s: {peak / 2**30:.2f} GiB needed")
    return Compiled(False, peak, time.perf_counter() - t0, note="compiler ran out of HBM"), ""
  finally:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_time)
  elapsed = time.perf_counter() - t0
  m = compiled.memory_analysis()
  # What the runtime allocates: live arguments, outputs that do not reuse a donated input, and the
  # temp buffer (as MaxText counts it); the heap simulator's own peak can come out lower.
  allocated = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
  peak = int(max(allocated + m.temp_size_in_bytes, getattr(m, "peak_memory_in_bytes", 0)))
  raw = compiled.cost_analysis()
  raw = raw[0] if isinstance(raw, list | tuple) else raw
  cost = {
    "flops": float(raw.get("flops", 0.0)),
    "bytes": float(raw.get("bytes accessed", 0.0)),
    "seconds": float(raw.get("optimal_seconds", -1.0)),
  }
  hlo = compiled.as_text() if with_hlo else ""
  progress(f"compiled in {elapsed:.0f} s: {peak / 2**30:.2f} GiB per device")
  return Compiled(peak <= hbm_bytes, peak, elapsed, cost), hlo


def step_cost(
  config: Any, devices: list[Any], hbm_bytes: int, full_depth: bool = False
) -> tuple[dict[str, float], float]:
  """Per-device cost of one whole step, from loop-free cost probes; returns (cost, probe seconds).

  cost(L layers) = probe(1) + (L - 1) * (probe(2) - probe(1)), times the microbatches (the
  optimizer update, a small elementwise part, is then counted once per microbatch). With
  `full_depth` the one probe has all L layers: slower to compile, nothing extrapolated.
  """
  accum = int(config.grad_accum_steps)
  layers = int(config.model.num_layers)
  base = dict(
    model__scan_layers=False,
    loss_chunk_size=0,
    grad_accum_steps=1,
    global_batch_size=config.global_batch_size // accum,
  )
  probes, seconds = [], 0.0
  depths = [layers] if full_depth else sorted({1, min(2, layers)})
  for i, depth in enumerate(depths):
    progress(f"cost probe {i + 1} of {len(depths)}: the step unscanned with {depth} layer(s)")
    probe, hlo = compile_step(
      with_overrides(config, model__num_layers=depth, **base), devices, hbm_bytes, with_hlo=True
    )
    seconds += probe.compile_s
    if probe.cost is None:
      raise RuntimeError(f"the {depth}-layer cost probe ran out of HBM ({probe.note})")
    probes.append({**probe.cost, "ici_bytes": collective_bytes(hlo, len(devices))})
  first, last = probes[0], probes[-1]
  extra = 0 if full_depth else layers - 1
  cost = {k: accum * (first[k] + extra * (last[k] - first[k])) for k in first}
  if min(p["seconds"] for p in probes) <= 0:
    # A negative step time (seen on v5e and v6e) must not turn positive by extrapolation.
    cost["seconds"] = min(p["seconds"] for p in probes)
  return cost, seconds


def needs_probes(config: Any) -> bool:
  """Whether XLA's cost of the real step misses loop trips (scan, chunked loss, accumulation)."""
  chunk, t = int(config.loss_chunk_size), int(config.seq_len)
  chunked = 0 < chunk < t
  return bool(config.model.scan_layers) or chunked or int(config.grad_accum_steps) > 1
