"""The metrics of the steps between two log lines: collected from the device, checked for a
loss that is not finite, then written (TensorBoard, metrics.jsonl) and printed with speed, ETA."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import jax
import numpy as np

from trainer import flops


class TrainingError(RuntimeError):
  """Training cannot go on (a NaN loss, say); the message says where and why."""


class LogWindow:
  """The metrics of the steps since the last log line, and the training time they took."""

  def __init__(self, config: Any, mcfg: Any, num_devices: int, peak: float, writer: Any):
    """`peak`: FLOP/s of one device, for MFU; `writer`: where the metrics go."""
    self.config, self.mcfg, self.writer = config, mcfg, writer
    self.num_devices, self.peak = num_devices, peak
    self._reset()

  def _reset(self) -> None:
    self.values = {k: [] for k in ("loss", "z_loss", "grad_norm", "learning_rate", "num_tokens")}
    self.start = time.perf_counter()
    self.paused = 0.0  # Seconds spent evaluating, sampling and saving, not training.

  def collect(self, step: int, metrics: dict[str, jax.Array]) -> None:
    """Adds step `step`'s metrics (waiting for the device); a loss that is not finite stops the
    run with a TrainingError naming the step."""
    values = jax.device_get(metrics)
    loss = float(values["loss"])
    if not math.isfinite(loss):
      raise TrainingError(
        f"The loss became {loss} at step {step}; lower "
        "optimizer.learning_rate, raise optimizer.warmup_steps, or set z_loss, "
        "then rerun (it resumes from the last good checkpoint)."
      )
    for k, v in self.values.items():
      v.append(float(values[k]))

  def log(self, step: int) -> dict[str, float]:
    """Writes and prints the metrics of the window (ending at `step`), returns them, and starts
    the next window."""
    config = self.config
    window, elapsed = self.values, time.perf_counter() - self.start - self.paused
    n = len(window["loss"])
    tokens = sum(window["num_tokens"]) and config.global_batch_size * config.seq_len * n
    metrics = {
      "loss": float(np.mean(window["loss"])),
      "learning_rate": window["learning_rate"][-1],
      "grad_norm": float(np.mean(window["grad_norm"])),
      "tokens_per_sec": tokens / elapsed,
      "mfu": flops.mfu(tokens / elapsed, self.mcfg, config.seq_len, self.num_devices, self.peak),
    }
    if config.z_loss:
      metrics["z_loss"] = float(np.mean(window["z_loss"]))
    self.writer.write_scalars(step, dict(metrics))  # The async writer reads it later.
    _log_progress(step, config.steps, metrics, elapsed / max(n, 1))
    self._reset()
    return metrics


def _log_progress(step: int, steps: int, metrics: dict[str, float], step_s: float) -> None:
  """One console line per logged step: loss, speed, and the time left at this speed."""
  eta = int(round((steps - step) * step_s))
  logging.info(
    "step %d/%d: loss %.4f, %s tokens/s, MFU %.1f%%, %.3f s/step, ETA %d:%02d:%02d",
    step,
    steps,
    metrics["loss"],
    f"{metrics['tokens_per_sec']:,.0f}",
    100 * metrics["mfu"],
    step_s,
    eta // 3600,
    eta // 60 % 60,
    eta % 60,
  )
