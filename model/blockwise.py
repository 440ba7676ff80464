"""Causal self-attention in plain XLA ops, a query block at a time, with a recomputing backward.

Dimension key: B batch, T length (queries and keys are the same tokens), K kv heads, G query
heads per kv head, H head_dim, Q query block length, S keys one query block sees.

This is the 'xla' training path. Compared with materializing the [T, T] logits and letting
autodiff differentiate a masked softmax, it
- skips key blocks above the causal diagonal (query block i sees keys [0, (i + 1) Q));
- normalizes the softmax on the [Q, H] output instead of the [Q, S] probabilities;
- saves only the output and the log-sum-exp, and recomputes the probabilities in the backward
  pass directly transposed ([S, G*Q]), so every matmul contracts a row-major operand's minor
  dimension, the form XLA:CPU hands to YNNPACK (others fall back to Eigen at about half speed).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)  # Masked logits; finite, so no inf - inf.
_F32 = jnp.float32


def _block_len(t: int, block: int) -> int:
  """Query block length: `block`, else 64 or T/8 (at most 8 unrolled blocks); T if not a divisor."""
  q = block or max(64, t // 8)
  return q if t > q and t % q == 0 else t


def _mask_QxS(segment_ids_BxT: jax.Array, i: int, q: int) -> jax.Array:
  """[B, Q, S] for query block i: causal, and within the same segment."""
  s = (i + 1) * q
  causal_QxS = jnp.arange(s)[None, :] <= (i * q + jnp.arange(q))[:, None]
  seg_q_BxQ = segment_ids_BxT[:, i * q : (i + 1) * q]
  return causal_QxS[None] & (seg_q_BxQ[:, :, None] == segment_ids_BxT[:, None, :s])


def _forward(q_BxKxGxTxH, k_BxKxTxH, v_BxKxTxH, segment_ids_BxT, block):
  t = q_BxKxGxTxH.shape[3]
  q = _block_len(t, block)
  outs, lses = [], []
  for i in range(t // q):
    s = (i + 1) * q
    q_BxKxGxQxH = q_BxKxGxTxH[:, :, :, i * q : (i + 1) * q]
    logits_BxKxGxQxS = jnp.einsum(
      "bkgqh,bksh->bkgqs", q_BxKxGxQxH, k_BxKxTxH[:, :, :s], preferred_element_type=_F32
    )
    mask_Bx1x1xQxS = _mask_QxS(segment_ids_BxT, i, q)[:, None, None]
    logits_BxKxGxQxS = jnp.where(mask_Bx1x1xQxS, logits_BxKxGxQxS, NEG_INF)
    max_BxKxGxQ = jnp.max(logits_BxKxGxQxS, axis=-1)
    p_BxKxGxQxS = jnp.exp(logits_BxKxGxQxS - max_BxKxGxQ[..., None])
    sum_BxKxGxQ = jnp.sum(p_BxKxGxQxS, axis=-1)
    out_BxKxGxQxH = jnp.einsum(
      "bkgqs,bksh->bkgqh",
      p_BxKxGxQxS.astype(v_BxKxTxH.dtype),
      v_BxKxTxH[:, :, :s],
      preferred_element_type=_F32,
    )
    outs.append(out_BxKxGxQxH / sum_BxKxGxQ[..., None])
    lses.append(max_BxKxGxQ + jnp.log(sum_BxKxGxQ))
  out_BxKxGxTxH = jnp.concatenate(outs, axis=3).astype(q_BxKxGxTxH.dtype)
  return out_BxKxGxTxH, jnp.concatenate(lses, axis=3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q_BxKxGxTxH, k_BxKxTxH, v_BxKxTxH, segment_ids_BxT, block):
  return _forward(q_BxKxGxTxH, k_BxKxTxH, v_BxKxTxH, segment_ids_BxT, block)[0]


def _attention_fwd(q_BxKxGxTxH, k_BxKxTxH, v_BxKxTxH, segment_ids_BxT, block):
  out, lse = _forward(q_BxKxGxTxH, k_BxKxTxH, v_BxKxTxH, segment_ids_BxT, block)
  return out, (q_BxKxGxTxH, k_BxKxTxH, v_BxKxTxH, segment_ids_BxT, out, lse)


def _attention_bwd(block, residuals, dout_BxKxGxTxH):
  q_BxKxGxTxH, k_BxKxTxH, v_BxKxTxH, segment_ids_BxT, out_BxKxGxTxH, lse_BxKxGxT = residuals
  dtype = q_BxKxGxTxH.dtype
  t = q_BxKxGxTxH.shape[3]
  q = _block_len(t, block)
  delta_BxKxGxT = jnp.sum(dout_BxKxGxTxH.astype(_F32) * out_BxKxGxTxH.astype(_F32), axis=-1)
  # dq contracts over keys; with keys transposed to the minor dim that matmul is canonical too.
  # The barrier stops XLA folding the transpose back into the dot's dimension numbers.
  k_BxKxHxT = jax.lax.optimization_barrier(jnp.swapaxes(k_BxKxTxH, 2, 3))
  dk_BxKxTxH = jnp.zeros(k_BxKxTxH.shape, _F32)
  dv_BxKxTxH = jnp.zeros(v_BxKxTxH.shape, _F32)
  dq_blocks = []
  for i in range(t // q):
    s = (i + 1) * q
    blk = slice(i * q, (i + 1) * q)
    q_BxKxGxQxH = q_BxKxGxTxH[:, :, :, blk]
    dout_BxKxGxQxH = dout_BxKxGxTxH[:, :, :, blk]
    k_BxKxSxH, v_BxKxSxH = k_BxKxTxH[:, :, :s], v_BxKxTxH[:, :, :s]
    logits_BxKxSxGxQ = jnp.einsum(
      "bksh,bkgqh->bksgq", k_BxKxSxH, q_BxKxGxQxH, preferred_element_type=_F32
    )
    mask_Bx1xSx1xQ = jnp.swapaxes(_mask_QxS(segment_ids_BxT, i, q), 1, 2)[:, None, :, None]
    lse_BxKx1xGxQ = lse_BxKxGxT[:, :, None, :, blk]
    p_BxKxSxGxQ = jnp.where(mask_Bx1xSx1xQ, jnp.exp(logits_BxKxSxGxQ - lse_BxKx1xGxQ), 0.0)
    dv_BxKxSxH = jnp.einsum(
      "bksgq,bkgqh->bksh", p_BxKxSxGxQ.astype(dtype), dout_BxKxGxQxH, preferred_element_type=_F32
    )
    dp_BxKxSxGxQ = jnp.einsum(
      "bksh,bkgqh->bksgq", v_BxKxSxH, dout_BxKxGxQxH, preferred_element_type=_F32
    )
    ds_BxKxSxGxQ = (p_BxKxSxGxQ * (dp_BxKxSxGxQ - delta_BxKxGxT[:, :, None, :, blk])).astype(dtype)
    dk_BxKxSxH = jnp.einsum(
      "bksgq,bkgqh->bksh", ds_BxKxSxGxQ, q_BxKxGxQxH, preferred_element_type=_F32
    )
    dq_blocks.append(
      jnp.einsum("bkhs,bksgq->bkhgq", k_BxKxHxT[..., :s], ds_BxKxSxGxQ, preferred_element_type=_F32)
    )
    dk_BxKxTxH = dk_BxKxTxH.at[:, :, :s].add(dk_BxKxSxH)
    dv_BxKxTxH = dv_BxKxTxH.at[:, :, :s].add(dv_BxKxSxH)
  dq_BxKxGxTxH = jnp.moveaxis(jnp.concatenate(dq_blocks, axis=-1), 2, -1)
  return (
    dq_BxKxGxTxH.astype(dtype),
    dk_BxKxTxH.astype(k_BxKxTxH.dtype),
    dv_BxKxTxH.astype(v_BxKxTxH.dtype),
    None,
  )


_attention.defvjp(_attention_fwd, _attention_bwd)


def blockwise_attention(
  q_BxTxNxH: jax.Array,
  k_BxTxKxH: jax.Array,
  v_BxTxKxH: jax.Array,
  segment_ids_BxT: jax.Array,
  block: int = 0,
) -> jax.Array:
  """Causal, segment-masked GQA self-attention [B, T, N, H]; equals `xla_attention`.

  `block` is the query block length (0: 64, or T/8 for long sequences).
  """
  b, t, n, h = q_BxTxNxH.shape
  kh = k_BxTxKxH.shape[2]
  q_BxTxKxGxH = (q_BxTxNxH * jnp.asarray(h**-0.5, q_BxTxNxH.dtype)).reshape(b, t, kh, n // kh, h)
  out_BxKxGxTxH = _attention(
    jnp.transpose(q_BxTxKxGxH, (0, 2, 3, 1, 4)),
    jnp.swapaxes(k_BxTxKxH, 1, 2),
    jnp.swapaxes(v_BxTxKxH, 1, 2),
    segment_ids_BxT.astype(jnp.int32),
    block,
  )
  return jnp.transpose(out_BxKxGxTxH, (0, 3, 1, 2, 4)).reshape(b, t, n, h)
