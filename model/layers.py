"""Building blocks of the LLaMA 3 decoder: RMSNorm, rotary embeddings, GQA attention, SwiGLU.

Dimension key for tensor names:
  B batch, T query length, S key length, D embed_dim, N query heads, K kv heads,
  G query heads per kv head (N // K), H head_dim, P = H / 2 rotated pairs, F mlp_dim, V vocab.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from model.attention import dot_product_attention
from model.config import ModelConfig
from model.matmul import dense, dense_many


class Linear(nn.Module):
  """A bias-free projection contracting the last `num_in` input dims with a logically named kernel.

  Unlike `nn.DenseGeneral`, the kernel is created in its final shape, so its logical axis names
  apply to the real rank (DenseGeneral initializes a flattened 2-D kernel).
  """

  features: tuple[int, ...]
  logical_axes: tuple[str, ...]
  dtype: jnp.dtype
  param_dtype: jnp.dtype
  num_in: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, kernel_only: bool = False) -> jax.Array:
    """The projection of `x`; with `kernel_only`, just the kernel (cast) for `dense_many`."""
    n_in, n_out = self.num_in, len(self.features)
    init = nn.initializers.variance_scaling(
      1.0,
      "fan_in",
      "truncated_normal",
      in_axis=tuple(range(n_in)),
      out_axis=tuple(range(n_in, n_in + n_out)),
    )
    shape = x.shape[x.ndim - n_in :] + tuple(self.features)
    kernel = self.param(
      "kernel", nn.with_logical_partitioning(init, self.logical_axes), shape, self.param_dtype
    )
    if kernel_only:
      return kernel.astype(self.dtype)
    return dense(x.astype(self.dtype), kernel.astype(self.dtype), n_in)


class RMSNorm(nn.Module):
  """Root-mean-square norm, computed in fp32 whatever the activation dtype."""

  eps: float
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    scale_D = self.param(
      "scale",
      nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
      (x_BxTxD.shape[-1],),
      self.param_dtype,
    )
    x = x_BxTxD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return scale_D.astype(self.dtype) * x.astype(self.dtype)


def rope_frequencies(config: ModelConfig) -> np.ndarray:
  """Inverse frequencies [H/2] with the Llama 3.1 long-context scaling when configured."""
  h = config.head_dim
  inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, h, 2, dtype=np.float32) / h))
  s = config.rope_scaling
  if s is None:
    return inv_freq.astype(np.float32)
  factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
  old_ctx = s["original_max_position_embeddings"]
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
  smooth = (old_ctx / wavelen - low) / (high - low)
  blended = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
  return np.where(medium, blended, scaled).astype(np.float32)


def apply_rope(x_BxTxNxH: jax.Array, positions_BxT: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """Rotates pairs (i, i + H/2): the half-split layout Hugging Face Llama weights use."""
  freqs_BxTxP = positions_BxT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  cos_BxTx1xP = jnp.cos(freqs_BxTxP)[:, :, None, :]
  sin_BxTx1xP = jnp.sin(freqs_BxTxP)[:, :, None, :]
  x1_BxTxNxP, x2_BxTxNxP = jnp.split(x_BxTxNxH.astype(jnp.float32), 2, axis=-1)
  out_BxTxNxH = jnp.concatenate(
    [
      x1_BxTxNxP * cos_BxTx1xP - x2_BxTxNxP * sin_BxTx1xP,
      x2_BxTxNxP * cos_BxTx1xP + x1_BxTxNxP * sin_BxTx1xP,
    ],
    axis=-1,
  )
  return out_BxTxNxH.astype(x_BxTxNxH.dtype)


class Attention(nn.Module):
  """Grouped-query attention with RoPE, causal and segment masks, and an optional KV cache."""

  config: ModelConfig

  @nn.compact
  def __call__(
    self,
    x_BxTxD: jax.Array,
    positions_BxT: jax.Array,
    segment_ids_BxT: jax.Array | None,
    decode: bool = False,
  ) -> jax.Array:
    c = self.config
    dense = lambda name, features, num_in, logical: Linear(
      features if isinstance(features, tuple) else (features,),
      logical,
      c.compute_dtype,
      c.weight_dtype,
      num_in,
      name=name,
    )
    kernels = (
      dense("q", (c.num_heads, c.head_dim), 1, ("embed", "heads", "head_dim")),
      dense("k", (c.num_kv_heads, c.head_dim), 1, ("embed", "kv_heads", "head_dim")),
      dense("v", (c.num_kv_heads, c.head_dim), 1, ("embed", "kv_heads", "head_dim")),
    )
    # One call, so the CPU backward transposes x once for the three weight gradients.
    q_BxTxNxH, k_BxTxKxH, v_BxTxKxH = dense_many(
      x_BxTxD.astype(c.compute_dtype), tuple(w(x_BxTxD, kernel_only=True) for w in kernels)
    )
    q_BxTxNxH = nn.with_logical_constraint(
      q_BxTxNxH, ("activation_batch", "activation_length", "activation_heads", None)
    )
    k_BxTxKxH = nn.with_logical_constraint(
      k_BxTxKxH, ("activation_batch", "activation_length", "activation_kv_heads", None)
    )
    v_BxTxKxH = nn.with_logical_constraint(
      v_BxTxKxH, ("activation_batch", "activation_length", "activation_kv_heads", None)
    )

    inv_freq = rope_frequencies(c)
    q_BxTxNxH = apply_rope(q_BxTxNxH, positions_BxT, inv_freq)
    k_BxTxKxH = apply_rope(k_BxTxKxH, positions_BxT, inv_freq)

    if decode:
      out_BxTxNxH = self._cached_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT)
    else:
      out_BxTxNxH = dot_product_attention(
        q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, implementation=c.attention
      )
    out_BxTxNxH = nn.with_logical_constraint(
      out_BxTxNxH, ("activation_batch", "activation_length", "activation_heads", None)
    )
    return dense("o", c.embed_dim, 2, ("heads", "head_dim", "embed"))(out_BxTxNxH)

  def _cached_attention(self, q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT):
    """Writes this call's keys/values at the cache index, then attends over the whole cache.

    The cache (`cache` collection) holds [B, S, K, H] keys and values, the per-slot segment ids
    (0 = empty slot, never attended to) and the write index. Calls may cover several tokens
    (prefill) or one (a decode step).
    """
    b, t, k, h = k_BxTxKxH.shape
    is_init = not self.has_variable("cache", "key")
    max_len = self.config.max_seq_len
    key = self.variable("cache", "key", jnp.zeros, (b, max_len, k, h), k_BxTxKxH.dtype)
    value = self.variable("cache", "value", jnp.zeros, (b, max_len, k, h), v_BxTxKxH.dtype)
    seg = self.variable("cache", "segment_ids", jnp.zeros, (b, max_len), jnp.int32)
    index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
    if segment_ids_BxT is None:
      segment_ids_BxT = jnp.ones((b, t), jnp.int32)
    if is_init:
      return dot_product_attention(
        q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, implementation="xla"
      )
    i = index.value
    key.value = jax.lax.dynamic_update_slice(key.value, k_BxTxKxH, (0, i, 0, 0))
    value.value = jax.lax.dynamic_update_slice(value.value, v_BxTxKxH, (0, i, 0, 0))
    seg.value = jax.lax.dynamic_update_slice(seg.value, segment_ids_BxT.astype(jnp.int32), (0, i))
    index.value = i + t
    return dot_product_attention(
      q_BxTxNxH,
      key.value,
      value.value,
      segment_ids_BxT,
      kv_segment_ids_BxS=seg.value,
      q_offset=i,
      implementation="xla",
    )


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
  """silu(gate) * up; the backward recomputes the sigmoid, so only gate and up are saved."""
  return nn.silu(gate) * up


def _swiglu_fwd(gate, up):
  return swiglu(gate, up), (gate, up)


def _swiglu_bwd(residuals, dh):
  gate, up = residuals
  sig = jax.nn.sigmoid(gate)
  return dh * up * sig * (1 + gate * (1 - sig)), dh * gate * sig


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class MLP(nn.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    c = self.config
    dense = lambda name, features, logical: Linear(
      (features,), logical, c.compute_dtype, c.weight_dtype, name=name
    )
    kernels = tuple(
      dense(name, c.mlp_dim, ("embed", "mlp"))(x_BxTxD, kernel_only=True) for name in ("gate", "up")
    )
    gate_BxTxF, up_BxTxF = dense_many(x_BxTxD.astype(c.compute_dtype), kernels)
    h_BxTxF = swiglu(gate_BxTxF, up_BxTxF)
    h_BxTxF = nn.with_logical_constraint(
      h_BxTxF, ("activation_batch", "activation_length", "activation_mlp")
    )
    return dense("down", c.embed_dim, ("mlp", "embed"))(h_BxTxF)
