"""TPU splash attention (the Pallas flash kernel): causal + segment ids, GQA, over the mesh.

Dimension key: B batch, T length, N query heads, K kv heads, H head_dim.

The kernel sees one example's [heads, T, H] (vmapped over the batch) and cannot be partitioned
by XLA, so under a mesh it runs in `shard_map`: batch rows split over the axes the rules give
'activation_batch', heads over those of 'activation_heads' (query heads n * K / N of one shard
map to that shard's kv heads, so GQA groups never straddle shards). The sequence is not split.
Off TPU the kernel runs in Pallas interpret mode (slow; for tests).
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib
from jax.sharding import PartitionSpec

_BLOCKS = (512, 256, 128)  # Kernel tile lengths, longest that divides the sequence first.


def splash_unsupported(head_dim: int, seq_len: int) -> str | None:
  """Why the kernel cannot take these shapes (the caller then falls back to XLA), or None."""
  if seq_len % 128:
    return f"seq_len={seq_len} is not a multiple of 128 (the kernel's tile)"
  if head_dim % 64:
    return f"head_dim={head_dim} is not a multiple of 64"
  return None


def _kernel(num_heads: int, seq_len: int, interpret: bool) -> kernel_lib.SplashAttentionKernel:
  """The kernel for one device's heads."""
  # Built per trace (not cached): its mask tables become that trace's constants. Concrete
  # cached tables cannot be made while AOT-compiling for compile-only TPU devices.
  block = next(b for b in _BLOCKS if seq_len % b == 0)
  sizes = kernel_lib.BlockSizes(
    block_q=block,
    block_kv=block,
    block_kv_compute=block,
    block_q_dkv=block,
    block_kv_dkv=block,
    block_kv_dkv_compute=block,
    block_q_dq=block,
    block_kv_dq=block,
  )
  causal = mask_lib.MultiHeadMask(
    [mask_lib.CausalMask((seq_len, seq_len)) for _ in range(num_heads)]
  )
  return kernel_lib.make_splash_mha(
    causal, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
  )


def _local_attention(q_BxNxTxH, k_BxKxTxH, v_BxKxTxH, segment_ids_BxT, kernel):
  """Splash on the rows and heads one device holds."""

  def one(q_NxTxH, k_KxTxH, v_KxTxH, seg_T):
    return kernel(q_NxTxH, k_KxTxH, v_KxTxH, segment_ids=kernel_lib.SegmentIds(q=seg_T, kv=seg_T))

  return jax.vmap(one)(q_BxNxTxH, k_BxKxTxH, v_BxKxTxH, segment_ids_BxT)


def _size(mesh: jax.sharding.AbstractMesh, axes: str | tuple[str, ...] | None) -> int:
  if axes is None:
    return 1
  return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


def splash_attention(
  q_BxTxNxH: jax.Array,
  k_BxTxKxH: jax.Array,
  v_BxTxKxH: jax.Array,
  segment_ids_BxT: jax.Array,
  *,
  interpret: bool | None = None,
) -> jax.Array:
  """Causal, segment-masked GQA self-attention [B, T, N, H] with the splash kernel."""
  h = q_BxTxNxH.shape[-1]
  if interpret is None:
    interpret = jax.default_backend() != "tpu"
  scale = jnp.asarray(h**-0.5, q_BxTxNxH.dtype)  # The kernel does not scale the logits.
  q_BxNxTxH = jnp.swapaxes(q_BxTxNxH * scale, 1, 2)
  k_BxKxTxH = jnp.swapaxes(k_BxTxKxH, 1, 2)
  v_BxKxTxH = jnp.swapaxes(v_BxTxKxH, 1, 2)
  segment_ids_BxT = segment_ids_BxT.astype(jnp.int32)
  n, t = q_BxNxTxH.shape[1:3]
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    kernel = _kernel(n, t, interpret)
    out_BxNxTxH = _local_attention(q_BxNxTxH, k_BxKxTxH, v_BxKxTxH, segment_ids_BxT, kernel)
  else:
    batch, heads = nn.logical_to_mesh_axes(("activation_batch", "activation_heads"))
    # Built outside shard_map: its mask tables are the enclosing trace's, closed over.
    kernel = _kernel(n // _size(mesh, heads), t, interpret)
    heads_spec = PartitionSpec(batch, heads, None, None)
    out_BxNxTxH = jax.shard_map(
      functools.partial(_local_attention, kernel=kernel),
      mesh=mesh,
      in_specs=(heads_spec, heads_spec, heads_spec, PartitionSpec(batch, None)),
      out_specs=heads_spec,
      check_vma=False,
    )(q_BxNxTxH, k_BxKxTxH, v_BxKxTxH, segment_ids_BxT)
  return jnp.swapaxes(out_BxNxTxH, 1, 2)
