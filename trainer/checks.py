"""Checks of a run config shared by the trainer, the benchmark and the planner (no heavy imports:
the benchmark runs where CLU, grain and TensorFlow are not installed)."""

from __future__ import annotations

import math
from typing import Any


def validate(config: Any) -> None:
  """Raises ValueError with one sentence for config values that cannot work together."""
  accum = int(config.grad_accum_steps)
  if accum < 1:
    raise ValueError(f"grad_accum_steps={accum} must be at least 1 (1: no accumulation).")
  if config.global_batch_size % accum:
    raise ValueError(
      f"global_batch_size={config.global_batch_size} is not divisible by grad_accum_steps={accum}."
    )
  if config.seq_len > config.model.max_seq_len:
    raise ValueError(
      f"seq_len={config.seq_len} exceeds model.max_seq_len="
      f"{config.model.max_seq_len}; raise model.max_seq_len or shorten seq_len."
    )
  for key in ("steps", "global_batch_size", "seq_len", "log_every"):
    if int(config[key]) <= 0:
      raise ValueError(f"{key}={config[key]} must be positive.")
  for key in ("eval_every", "checkpoint_every", "sample_every"):
    if int(config[key]) < 0:
      raise ValueError(f"{key}={config[key]} must be positive, or 0 for never.")
  if config.eval_every and int(config.eval_steps) <= 0:
    raise ValueError(
      f"eval_steps={config.eval_steps} must be positive when eval_every={config.eval_every}; "
      "set eval_every=0 to never evaluate."
    )
  meaning_of_0 = {"max_to_keep": "keep all", "keep_period": "none", "watchdog_timeout_s": "off"}
  for key, zero in meaning_of_0.items():
    if config[key] < 0:
      raise ValueError(f"{key}={config[key]} must be positive, or 0 ({zero}).")
  opt = config.optimizer
  if not opt.learning_rate > 0:
    raise ValueError(f"optimizer.learning_rate={opt.learning_rate} must be positive.")
  for key in ("warmup_steps", "weight_decay", "grad_clip", "eps"):
    if not opt[key] >= 0:
      raise ValueError(f"optimizer.{key}={opt[key]} must be 0 or more.")
  for key in ("b1", "b2"):  # Adam's bias correction divides by 1 - b^t: b = 1 gives NaN.
    if not 0 <= opt[key] < 1:
      raise ValueError(f"optimizer.{key}={opt[key]} must be at least 0 and below 1.")
  if not 0 <= opt.end_lr_ratio <= 1:
    raise ValueError(f"optimizer.end_lr_ratio={opt.end_lr_ratio} must be between 0 and 1.")
  from data.batching import as_axes  # noqa: PLC0415
  from trainer.mesh import MESH_AXES  # noqa: PLC0415

  for name, axes in config.sharding_rules:
    for axis in as_axes(axes):
      if axis not in MESH_AXES:
        raise ValueError(
          f"sharding_rules maps {name!r} to {axis!r}, which is not a mesh axis; use "
          f"{', '.join(MESH_AXES)} or None."
        )


def batch_split(config: Any, mesh_shape: Any) -> tuple[int, str]:
  """(n, where): a microbatch's rows must be a multiple of n to split evenly over the mesh axes
  of both the 'batch' rule (the input rows) and 'activation_batch' (the model's activations;
  splash attention's shard_map takes whole rows only); `where` names those axes. Both are data x
  fsdp unless sharding_rules says otherwise."""
  from data.batching import batch_axes, batch_shards, rule_axes  # noqa: PLC0415

  rows = batch_axes(config.sharding_rules)
  acts = rule_axes(config.sharding_rules, "activation_batch") or ()
  n = math.lcm(
    batch_shards(config.sharding_rules, mesh_shape), math.prod(mesh_shape[a] for a in acts)
  )
  spell = lambda axes: " x ".join(axes) or "no axis"
  if set(acts) <= set(rows):
    return n, f"{spell(rows)} = {n} devices"
  return n, f"{spell(rows)} (batch) and {spell(acts)} (activation_batch): {n} rows"


def check_batch_fits_mesh(config: Any, mesh: Any) -> None:
  """Raises ValueError when a microbatch's rows do not split over the mesh (`batch_split`)."""
  n, where = batch_split(config, mesh.shape)
  micro = config.global_batch_size // config.grad_accum_steps
  if micro % n:
    raise ValueError(
      f"The batch of {micro} rows per microbatch does not split over {where}; make "
      f"global_batch_size / grad_accum_steps a multiple of {n}."
    )
