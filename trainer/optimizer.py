"""AdamW with linear warmup and cosine decay, global-norm clipping, and no decay on norms."""

from __future__ import annotations

from typing import Any

import jax
import optax


def learning_rate_schedule(config: Any) -> optax.Schedule:
  """Linear warmup to the peak, then cosine decay to `end_lr_ratio * peak`."""
  opt = config.optimizer
  decay_steps = config.steps if opt.decay_steps == -1 else opt.decay_steps
  warmup = min(opt.warmup_steps, max(decay_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=opt.learning_rate,
    warmup_steps=warmup,
    decay_steps=max(decay_steps, warmup + 1),
    end_value=opt.learning_rate * opt.end_lr_ratio,
  )


def decay_mask(params: Any) -> Any:
  """True for weights that get weight decay: every matrix, never a norm scale (1-D per layer)."""

  def is_decayed(path, _):
    names = [getattr(k, "key", getattr(k, "name", "")) for k in path]
    return names[-1] != "scale"

  return jax.tree_util.tree_map_with_path(is_decayed, params)


def make_optimizer(config: Any) -> optax.GradientTransformation:
  """The full update rule from `config.optimizer`."""
  opt = config.optimizer
  adamw = optax.adamw(
    learning_rate_schedule(config),
    b1=opt.b1,
    b2=opt.b2,
    eps=opt.eps,
    weight_decay=opt.weight_decay,
    mask=decay_mask,
  )
  if opt.grad_clip and opt.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(opt.grad_clip), adamw)
  return adamw
