"""Cross-entropy over a large vocabulary, C tokens at a time, never with [B, T, V] fp32 logits.

Training uses `head_loss`: the output head and the loss in one function whose forward pass
also computes the head's gradients, chunk by chunk, so the backward pass recomputes nothing.
Evaluation uses `token_cross_entropy`, which keeps the per-token values.

Dimension key: B batch, T length, D embed_dim, V vocab, N chunks, C chunk length.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.matmul import dense

_LOGITS_AXES = ("activation_batch", "activation_length", "activation_vocab")


def _logits(h_BxCxD: jax.Array, kernel_DxV: jax.Array) -> jax.Array:
  """fp32 logits from hidden states and a kernel, both in the compute dtype."""
  logits_BxCxV = dense(h_BxCxD, kernel_DxV, 1, jnp.float32)
  return nn.with_logical_constraint(logits_BxCxV, _LOGITS_AXES)


def _num_chunks(t: int, chunk: int) -> int:
  """How many chunks of `chunk` tokens cover a length-`t` sequence (1: no chunking); when
  `chunk` does not divide `t`, the last chunk is padded."""
  return -(-t // chunk) if 0 < chunk < t else 1


def _split(x_BxT: jax.Array, n: int) -> jax.Array:
  """[B, T, ...] -> [N, B, C, ...] with C = ceil(T / N), zero-padding the end of T to N * C."""
  b, t = x_BxT.shape[:2]
  c = -(-t // n)
  if n * c != t:
    x_BxT = jnp.pad(x_BxT, [(0, 0), (0, n * c - t)] + [(0, 0)] * (x_BxT.ndim - 2))
  return x_BxT.reshape(b, n, c, *x_BxT.shape[2:]).swapaxes(0, 1)


def _merge(x_NxBxC: jax.Array, t: int) -> jax.Array:
  """[N, B, C, ...] -> [B, T, ...], the inverse of `_split` (dropping the padding)."""
  n, b, c = x_NxBxC.shape[:3]
  return x_NxBxC.swapaxes(0, 1).reshape(b, n * c, *x_NxBxC.shape[3:])[:, :t]


@jax.custom_vjp
def cross_entropy_and_lse(
  logits_BxCxV: jax.Array, targets_BxC: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """(cross-entropy, log-partition) per token, with a one-pass gradient.

  Autodiff of `take_along_axis` scatters the targets' one-hot into a fresh [B, C, V] array and
  adds it to the softmax gradient: two extra logits-sized passes (64 MB each on the benchmark).
  """
  return _cross_entropy_fwd(logits_BxCxV, targets_BxC)[0]


def _cross_entropy_fwd(logits_BxCxV, targets_BxC):
  lse_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
  target_BxC = jnp.take_along_axis(logits_BxCxV, targets_BxC[..., None], axis=-1)[..., 0]
  return (lse_BxC - target_BxC, lse_BxC), (logits_BxCxV, targets_BxC, lse_BxC)


def _cross_entropy_bwd(residuals, cotangents):
  logits_BxCxV, targets_BxC, lse_BxC = residuals
  d_ce_BxC, d_lse_BxC = cotangents
  probs_BxCxV = jnp.exp(logits_BxCxV - lse_BxC[..., None])
  vocab_V = jax.lax.broadcasted_iota(targets_BxC.dtype, logits_BxCxV.shape, 2)
  onehot_BxCxV = vocab_V == targets_BxC[..., None]
  d_logits_BxCxV = probs_BxCxV * (d_ce_BxC + d_lse_BxC)[..., None] - jnp.where(
    onehot_BxCxV, d_ce_BxC[..., None], 0.0
  )
  return d_logits_BxCxV.astype(logits_BxCxV.dtype), None


cross_entropy_and_lse.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


def token_cross_entropy(
  hidden_BxTxD: jax.Array, kernel_DxV: jax.Array, targets_BxT: jax.Array, chunk: int
) -> tuple[jax.Array, jax.Array]:
  """Per-token cross-entropy and log-partition [B, T], computing logits C tokens at a time.

  Differentiable (each chunk is rematerialized in the backward pass), but training uses
  `head_loss`, which needs no second pass over the head.
  """
  kernel_DxV = kernel_DxV.astype(hidden_BxTxD.dtype)  # Once, not per chunk.
  n = _num_chunks(hidden_BxTxD.shape[1], chunk)
  if n == 1:
    return cross_entropy_and_lse(_logits(hidden_BxTxD, kernel_DxV), targets_BxT)

  def body(_, xs):
    h_BxCxD, tgt_BxC = xs
    return None, jax.checkpoint(lambda h, t: cross_entropy_and_lse(_logits(h, kernel_DxV), t))(
      h_BxCxD, tgt_BxC
    )

  _, (ce_NxBxC, lse_NxBxC) = jax.lax.scan(
    body, None, (_split(hidden_BxTxD, n), _split(targets_BxT, n))
  )
  t = hidden_BxTxD.shape[1]
  return _merge(ce_NxBxC, t), _merge(lse_NxBxC, t)


def head_loss(
  hidden_BxTxD: jax.Array,
  kernel_DxV: jax.Array,
  targets_BxT: jax.Array,
  weights_BxT: jax.Array,
  chunk: int,
  z_loss: float,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  """(objective, (cross-entropy sum, z-loss sum)) of the output head, weighted per token.

  The objective is sum(w * ce) + z_loss * sum(w * lse^2). Its gradient with respect to the
  hidden states, the kernel and the weights is computed in the forward pass, C tokens at a time:
  the backward pass only scales it, so no chunk's logits are computed twice (the rematerialized
  `token_cross_entropy` computes each chunk's head matmul twice, a third more head FLOPs). The
  logits and softmax are fp32; the gradient matmuls run in the compute dtype, and the kernel's
  gradient is summed over chunks in fp32. The two sums are metrics and carry no gradient.
  """
  objective, sums = _head_loss(hidden_BxTxD, kernel_DxV, targets_BxT, weights_BxT, chunk, z_loss)
  return objective, jax.lax.stop_gradient(sums)


def _weighted_sums(ce_BxT, lse_BxT, weights_BxT, z_loss):
  ce_sum = jnp.sum(ce_BxT * weights_BxT)
  z_sum = jnp.sum(jnp.square(lse_BxT) * weights_BxT)
  return ce_sum + z_loss * z_sum, (ce_sum, z_sum)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _head_loss(hidden_BxTxD, kernel_DxV, targets_BxT, weights_BxT, chunk, z_loss):
  ce_BxT, lse_BxT = token_cross_entropy(hidden_BxTxD, kernel_DxV, targets_BxT, chunk)
  return _weighted_sums(ce_BxT, lse_BxT, weights_BxT, z_loss)


def _chunk_value_and_grads(h_BxCxD, kernel_DxV, tgt_BxC, w_BxC, z_loss):
  """(ce, lse, d hidden, d kernel) of one chunk; the kernel and both gradients in h's dtype.

  The backward matmuls take the logits' gradient in the compute dtype, as every other layer's
  do, so under FSDP each device's partial kernel gradient (the whole [D, V] before the
  cross-device sum) is bf16 in a bf16 model: 1 GiB for Llama 3's head rather than 2.
  """
  logits_BxCxV = _logits(h_BxCxD, kernel_DxV)
  (ce_BxC, lse_BxC), residuals = _cross_entropy_fwd(logits_BxCxV, tgt_BxC)
  # The objective's terms w * ce + z * w * lse^2 give cotangents w and 2 z w lse.
  d_logits_BxCxV, _ = _cross_entropy_bwd(residuals, (w_BxC, 2.0 * z_loss * w_BxC * lse_BxC))
  # The primal of this vjp is never used; XLA drops it.
  _, vjp = jax.vjp(lambda h, k: dense(h, k), h_BxCxD, kernel_DxV)
  dh_BxCxD, dk_DxV = vjp(d_logits_BxCxV.astype(h_BxCxD.dtype))
  return ce_BxC, lse_BxC, dh_BxCxD, nn.with_logical_constraint(dk_DxV, ("embed", "vocab"))


def _head_loss_fwd(hidden_BxTxD, kernel_DxV, targets_BxT, weights_BxT, chunk, z_loss):
  n = _num_chunks(hidden_BxTxD.shape[1], chunk)
  kernel_c_DxV = kernel_DxV.astype(hidden_BxTxD.dtype)
  if n == 1:
    ce_BxT, lse_BxT, dh_BxTxD, dk_DxV = _chunk_value_and_grads(
      hidden_BxTxD, kernel_c_DxV, targets_BxT, weights_BxT, z_loss
    )
  else:

    def body(dk_DxV, xs):
      ce, lse, dh, dk = _chunk_value_and_grads(xs[0], kernel_c_DxV, xs[1], xs[2], z_loss)
      return dk_DxV + dk.astype(jnp.float32), (ce, lse, dh)  # Summed over chunks in fp32.

    chunks = tuple(_split(x, n) for x in (hidden_BxTxD, targets_BxT, weights_BxT))
    dk_DxV, (ce_NxBxC, lse_NxBxC, dh_NxBxCxD) = jax.lax.scan(
      body, jnp.zeros(kernel_DxV.shape, jnp.float32), chunks
    )
    # Padded tokens weigh 0, so they add nothing to the kernel's gradient; their values go.
    t = hidden_BxTxD.shape[1]
    ce_BxT, lse_BxT, dh_BxTxD = (_merge(x, t) for x in (ce_NxBxC, lse_NxBxC, dh_NxBxCxD))
  out = _weighted_sums(ce_BxT, lse_BxT, weights_BxT, z_loss)
  # d objective / d w is the token's own loss term.
  dw_BxT = ce_BxT + z_loss * jnp.square(lse_BxT)
  return out, (dh_BxTxD, dk_DxV.astype(kernel_DxV.dtype), dw_BxT.astype(weights_BxT.dtype))


def _head_loss_bwd(chunk, z_loss, residuals, cotangents):
  # `head_loss` stops the sums' gradients, so the objective's cotangent is the only one.
  del chunk, z_loss
  g = cotangents[0]
  dh_BxTxD, dk_DxV, dw_BxT = residuals
  return (
    (g * dh_BxTxD).astype(dh_BxTxD.dtype),
    (g * dk_DxV).astype(dk_DxV.dtype),
    None,
    (g * dw_BxT).astype(dw_BxT.dtype),
  )


_head_loss.defvjp(_head_loss_fwd, _head_loss_bwd)
