"""Attention kernels behind one function: XLA everywhere, cuDNN flash on GPU, splash on TPU.

Dimension key: B batch, T query length, S key length, N query heads, K kv heads,
G query heads per kv head, H head_dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from model.blockwise import NEG_INF, blockwise_attention


def resolve_implementation(implementation: str) -> str:
  """Maps 'auto' to the fastest kernel for the default backend."""
  if implementation != "auto":
    return implementation
  backend = jax.default_backend()
  if backend == "tpu":
    return "splash"
  if backend == "gpu":
    return "cudnn"
  return "xla"


def _unsupported(impl: str, head_dim: int, seq_len: int, dtype: jnp.dtype | None) -> str | None:
  """Why kernel `impl` cannot run these shapes, or None."""
  if impl == "splash":
    from model.splash import splash_unsupported  # Pallas TPU imports only when asked for.

    return splash_unsupported(head_dim, seq_len)
  if impl == "cudnn" and dtype is not None and jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
    return f"cuDNN flash attention needs bfloat16 or float16, not {jnp.dtype(dtype).name}"
  return None


def select_implementation(
  implementation: str, head_dim: int, seq_len: int, dtype: jnp.dtype | None = None
) -> tuple[str, str | None]:
  """(kernel that runs, why 'auto' fell back to XLA or None); an explicit misfit raises."""
  impl = resolve_implementation(implementation)
  why = _unsupported(impl, head_dim, seq_len, dtype)
  if why is None:
    return impl, None
  if implementation != "auto":
    raise ValueError(f"model.attention={implementation!r} cannot run here: {why}; use 'auto'.")
  return "xla", why


def describe_attention(
  implementation: str,
  *,
  head_dim: int | None = None,
  seq_len: int | None = None,
  dtype: str | None = None,
) -> str:
  """One line for logs: which attention kernel `implementation` runs on the default backend."""
  impl, why = resolve_implementation(implementation), None
  if head_dim is not None and seq_len is not None:
    impl, why = select_implementation(implementation, head_dim, seq_len, dtype)
  text = {
    "splash": "splash (TPU Pallas flash kernel, causal + segment ids)",
    "cudnn": "cudnn (cuDNN flash attention via jax.nn.dot_product_attention)",
    "xla": "xla (blockwise causal attention in XLA ops, recomputing backward)",
  }[impl]
  if why:
    text += f"; auto fell back from {resolve_implementation(implementation)}: {why}"
  return f"{text} [model.attention={implementation!r}, {jax.default_backend()}]"


def attention_mask(
  q_segment_ids_BxT: jax.Array,
  kv_segment_ids_BxS: jax.Array,
  q_offset: jax.Array | int = 0,
  *,
  cache: bool = False,
) -> jax.Array:
  """Boolean [B, T, S]: causal by slot index, and only within the same segment.

  With `cache`, key slots of segment 0 are empty cache slots and are never attended to.
  """
  t, s = q_segment_ids_BxT.shape[1], kv_segment_ids_BxS.shape[1]
  q_idx_T = q_offset + jnp.arange(t)
  causal_TxS = jnp.arange(s)[None, :] <= q_idx_T[:, None]
  same_BxTxS = q_segment_ids_BxT[:, :, None] == kv_segment_ids_BxS[:, None, :]
  mask = causal_TxS[None] & same_BxTxS
  if cache:
    mask &= (kv_segment_ids_BxS != 0)[:, None, :]
  return mask


def xla_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxTxS) -> jax.Array:
  """Reference attention: fp32 softmax, GQA by grouping query heads per kv head."""
  b, t, n, h = q_BxTxNxH.shape
  kh = k_BxSxKxH.shape[2]
  q_BxTxKxGxH = (q_BxTxNxH * jnp.asarray(h**-0.5, q_BxTxNxH.dtype)).reshape(b, t, kh, n // kh, h)
  logits_BxKxGxTxS = jnp.einsum(
    "btkgh,bskh->bkgts", q_BxTxKxGxH, k_BxSxKxH, preferred_element_type=jnp.float32
  )
  logits_BxKxGxTxS = jnp.where(mask_BxTxS[:, None, None], logits_BxKxGxTxS, NEG_INF)
  probs_BxKxGxTxS = jax.nn.softmax(logits_BxKxGxTxS, axis=-1).astype(v_BxSxKxH.dtype)
  out_BxTxKxGxH = jnp.einsum("bkgts,bskh->btkgh", probs_BxKxGxTxS, v_BxSxKxH)
  return out_BxTxKxGxH.reshape(b, t, n, h)


def cudnn_attention(
  q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT, implementation: str = "cudnn"
) -> jax.Array:
  """cuDNN flash attention (GPU, bf16/fp16) through `jax.nn.dot_product_attention`.

  Causality is the kernel's own mask type (it skips blocks above the diagonal); documents are
  a boolean mask. `implementation='xla'` runs the same call anywhere, for tests.
  """
  same_Bx1xTxS = (segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :])[:, None]
  return jax.nn.dot_product_attention(
    q_BxTxNxH,
    k_BxSxKxH,
    v_BxSxKxH,
    mask=same_Bx1xTxS,
    is_causal=True,
    implementation=implementation,
  )


def dot_product_attention(
  q_BxTxNxH: jax.Array,
  k_BxSxKxH: jax.Array,
  v_BxSxKxH: jax.Array,
  segment_ids_BxT: jax.Array | None,
  *,
  kv_segment_ids_BxS: jax.Array | None = None,
  q_offset: jax.Array | int = 0,
  implementation: str = "auto",
) -> jax.Array:
  """Causal, segment-masked GQA attention; returns [B, T, N, H].

  Without `kv_segment_ids_BxS` keys and queries are the same tokens (training and prefill);
  with it, keys are a KV cache whose empty slots carry segment 0 and `q_offset` is the cache
  slot of the first query.
  """
  b, t = q_BxTxNxH.shape[:2]
  if segment_ids_BxT is None:
    segment_ids_BxT = jnp.ones((b, t), jnp.int32)
  impl, _ = select_implementation(implementation, q_BxTxNxH.shape[-1], t, q_BxTxNxH.dtype)
  if kv_segment_ids_BxS is None:
    if impl == "cudnn":
      return cudnn_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT)
    if impl == "splash":
      from model.splash import splash_attention  # TPU-only imports stay off other backends.

      return splash_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT)
    return blockwise_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT)
  mask = attention_mask(segment_ids_BxT, kv_segment_ids_BxS, q_offset, cache=True)
  return xla_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask)
