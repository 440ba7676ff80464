"""Model FLOPs, device peaks and MFU: one documented definition used everywhere."""

from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp

from model import ModelConfig

# Dense bf16 peak FLOP/s per JAX device (a TPU v4/v5p megacore chip is one device).
PEAK_FLOPS = (
  ("v6 lite", 918e12),  # TPU v6e (Trillium)
  ("v6e", 918e12),
  ("v5 lite", 197e12),  # TPU v5e
  ("v5e", 197e12),
  ("v5p", 459e12),
  ("v5", 459e12),  # 'TPU v5' is v5p
  ("v4", 275e12),
  ("h200", 989e12),
  ("h100", 989e12),  # SXM, dense
  ("a100", 312e12),
)
# HBM per chip in bytes that libtpu 0.0.42.1 lets a program use ("exceeds available HBM" in its
# out-of-memory error), for planning; the spec pages round them to 32, 16, 95 and 32 GiB.
HBM_BYTES = {
  "v4": int(30.75 * 2**30),
  "v5e": int(15.75 * 2**30),
  "v5p": int(95.74 * 2**30),
  "v6e": int(31.25 * 2**30),
}
# HBM bandwidth per chip in bytes/s (Cloud TPU spec pages), for the planner's roofline.
HBM_BANDWIDTH = {"v4": 1200e9, "v5e": 819e9, "v5p": 2765e9, "v6e": 1638e9}
# Bidirectional ICI bandwidth per chip in bytes/s, all links together (Cloud TPU spec pages; v4
# from its paper: six links of 50 GB/s each way).
ICI_BANDWIDTH = {"v4": 600e9, "v5e": 400e9, "v5p": 1200e9, "v6e": 800e9}


def model_flops_per_token(config: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token: 6 x matmul parameters + causal attention.

  Matmul parameters are every weight except the input-embedding lookup and norm scales; the
  output head counts once, tied or not. Attention adds, per layer, QK^T and PV (2 matmuls x
  2 FLOPs x N*H x T/2 keys on average under the causal mask), times 3 for forward + backward:
  6 * L * N * H * T.
  """
  norms = config.embed_dim * (2 * config.num_layers + 1)
  matmul_params = config.num_params(embeddings=False) - norms + config.vocab_size * config.embed_dim
  attention = 6 * config.num_layers * config.num_heads * config.head_dim * seq_len
  return 6.0 * matmul_params + attention


def cpu_matmul_peak(
  devices: list[jax.Device], sizes: tuple[int, ...] = (1024, 2048), repeats: int = 3
) -> float:
  """fp32 matmul FLOP/s of the whole host, best of `repeats`: one independent matmul per core at
  once (the honest peak on CPU, where there is no spec sheet).

  Independent matmuls in one program run side by side, and so do programs on different CPU
  devices.
  """
  cores = len(os.sched_getaffinity(0))
  devices = devices[:cores]  # Fake CPU devices beyond the cores would only queue for them.
  per_device = max(cores // len(devices), 1)
  matmuls = jax.jit(lambda xs: [x @ x for x in xs])
  best = 0.0
  for n in sizes:
    xs = [
      [jax.device_put(jnp.full((n, n), i + 1.0, jnp.float32), d) for i in range(per_device)]
      for d in devices
    ]
    jax.block_until_ready([matmuls(x) for x in xs])
    for _ in range(repeats):
      t0 = time.perf_counter()
      jax.block_until_ready([matmuls(x) for x in xs])
      flop = len(devices) * per_device * 2 * n**3
      best = max(best, flop / (time.perf_counter() - t0))
  return best


@functools.cache
def _cpu_host_peak() -> float:
  # 1024 only: the trainer measures at start-up, and 2048 adds seconds with many fake devices.
  return cpu_matmul_peak(jax.local_devices(), sizes=(1024,), repeats=5)


def device_peak_flops(device: jax.Device | None = None) -> float:
  """Peak FLOP/s of one device: the table for accelerators, a measurement on CPU."""
  device = device or jax.devices()[0]
  if device.platform == "cpu":
    # Fake CPU devices share the host's cores; the host peak is split among them.
    return _cpu_host_peak() / max(jax.local_device_count(), 1)
  kind = device.device_kind.lower()
  for key, peak in PEAK_FLOPS:
    if key in kind:
      return peak
  raise ValueError(
    f"No peak FLOP/s known for device kind {device.device_kind!r}; add it to "
    "trainer/flops.py PEAK_FLOPS."
  )


def mfu(
  tokens_per_sec: float, config: ModelConfig, seq_len: int, num_devices: int, peak_per_device: float
) -> float:
  """Model FLOPs utilization: achieved model FLOP/s over the devices' summed peak."""
  return tokens_per_sec * model_flops_per_token(config, seq_len) / (num_devices * peak_per_device)
