"""The LLaMA 3 decoder: token embedding, a (scanned, rematerialized) stack of blocks, a head.

Dimension key: B batch, T length, D embed_dim, V vocab, L layers; lower case (b, v, d): one
device's shard of that dimension, inside shard_map.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.config import ModelConfig
from model.layers import MLP, Attention, RMSNorm

_EMBED_INIT_STD = 0.02


def remat_policy(name: str) -> Any:
  """The `jax.checkpoint` policy behind a remat name ('none' means no remat at all)."""
  policies = jax.checkpoint_policies
  return {
    "full": policies.nothing_saveable,
    "dots": policies.checkpoint_dots,
    "dots_no_batch": policies.dots_with_no_batch_dims_saveable,
    "offload": policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
  }[name]


def _mesh_axes(logical: str) -> tuple[str, ...]:
  """The mesh axes the active logical rules give one logical axis, as a tuple."""
  (axes,) = nn.logical_to_mesh_axes((logical,))
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def _sharding_mesh() -> jax.sharding.AbstractMesh | None:
  """The ambient mesh when it has several devices and logical rules are active; else None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1 or not nn.get_logical_axis_rules():
    return None
  return mesh


def _sharded_take(table_VxD: jax.Array, tokens_BxT: jax.Array) -> jax.Array | None:
  """`table[tokens]` on a mesh, laid out by hand; None where the layout does not fit.

  Each device gathers, from its own [V / vocab, D / embed] slice of the table, the rows of all
  tokens of its 'embed' group; where V is split (tensor parallelism) the partial rows are summed
  over the vocab axes (one device holds each token's row, so the sum is exact); an all-to-all
  over the embed axes then turns [the group's rows, D / embed] into [own rows, D]. The SPMD
  partitioner, given `jnp.take`, all-gathers the embeddings of the whole global batch instead:
  over 'data' at D / fsdp, and with V split all of D too ("involuntary full rematerialization").
  """
  mesh = _sharding_mesh()
  if mesh is None:
    return None
  vocab, embed, batch = _mesh_axes("vocab"), _mesh_axes("embed"), _mesh_axes("activation_batch")
  size = lambda axes: math.prod(mesh.shape[a] for a in axes)
  fits = (
    (vocab or embed)
    and not set(vocab) & (set(batch) | set(embed))
    and batch[len(batch) - len(embed) :] == embed  # D's axes are the batch's minor ones.
    and table_VxD.shape[0] % size(vocab) == 0
    and table_VxD.shape[1] % size(embed) == 0
    and tokens_BxT.shape[0] % size(batch) == 0
  )
  if not fits:
    return None
  v_local = table_VxD.shape[0] // size(vocab)

  def local(table_vxd, tokens_bxt):
    if embed:
      tokens_bxt = jax.lax.all_gather(tokens_bxt, embed, axis=0, tiled=True)
    if not vocab:
      rows_bxTxd = jnp.take(table_vxd, tokens_bxt, axis=0)
    else:
      ids_bxt = tokens_bxt - jax.lax.axis_index(vocab) * v_local
      mine_bxt = (ids_bxt >= 0) & (ids_bxt < v_local)
      rows_bxTxd = jnp.take(table_vxd, jnp.where(mine_bxt, ids_bxt, 0), axis=0)
      rows_bxTxd = jax.lax.psum(jnp.where(mine_bxt[..., None], rows_bxTxd, 0), vocab)
    if embed:
      rows_bxTxd = jax.lax.all_to_all(rows_bxTxd, embed, 0, 2, tiled=True)
    return rows_bxTxd

  spec = jax.sharding.PartitionSpec
  return jax.shard_map(
    local,
    mesh=mesh,
    in_specs=(spec(vocab or None, embed or None), spec(batch or None, None)),
    out_specs=spec(batch or None, None, None),
    check_vma=False,
  )(table_VxD, tokens_BxT)


def _take(table_VxD: jax.Array, tokens_BxT: jax.Array) -> jax.Array:
  rows_BxTxD = _sharded_take(table_VxD, tokens_BxT)
  return jnp.take(table_VxD, tokens_BxT, axis=0) if rows_BxTxD is None else rows_BxTxD


@jax.custom_vjp
def embed_tokens(table_VxD: jax.Array, tokens_BxT: jax.Array) -> jax.Array:
  """`table[tokens]`, never replicating the table, its gradient or the batch's embeddings.

  Forward: see `_sharded_take`.
  Backward: the table's D is split over the 'embed' axes (FSDP). Left to itself, XLA's SPMD
  partitioner scatters the gradient into a full fp32 [V, D] table on every device whenever the
  batch is split over more axes than D is (e.g. data=2 x fsdp=64), then all-reduces it: for
  Llama 3 a 2 GiB buffer and 4 GiB of collective traffic per device and step. Here the token
  gradients are first re-laid out so each device holds its own D slice of the rows of its 'data'
  group, and each device scatters into its own [V, D / fsdp] slice; only the batch axes D does
  not use are summed over.
  """
  return _take(table_VxD, tokens_BxT)


def _embed_tokens_fwd(table_VxD, tokens_BxT):
  # The table is a parameter, alive anyway: keeping it costs nothing; only its shape is used.
  return _take(table_VxD, tokens_BxT), (table_VxD, tokens_BxT)


def _embed_tokens_bwd(residuals, d_BxTxD):
  table_VxD, tokens_BxT = residuals
  if _sharding_mesh() is not None:
    embed = _mesh_axes("embed")
    rows = tuple(a for a in _mesh_axes("activation_batch") if a not in embed) or None
    spec = jax.sharding.PartitionSpec
    d_BxTxD = jax.lax.with_sharding_constraint(d_BxTxD, spec(rows, None, embed or None))
    tokens_BxT = jax.lax.with_sharding_constraint(tokens_BxT, spec(rows, None))
  d_table_VxD = jnp.zeros(table_VxD.shape, d_BxTxD.dtype).at[tokens_BxT].add(d_BxTxD)
  d_table_VxD = nn.with_logical_constraint(d_table_VxD, ("vocab", "embed"))
  return d_table_VxD.astype(table_VxD.dtype), None


embed_tokens.defvjp(_embed_tokens_fwd, _embed_tokens_bwd)


class Block(nn.Module):
  """Pre-norm decoder block: x + attn(norm(x)), then + mlp(norm(.))."""

  config: ModelConfig
  decode: bool = False

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, segment_ids_BxT):
    c = self.config
    norm = lambda name: RMSNorm(c.norm_eps, c.compute_dtype, c.weight_dtype, name=name)
    x_BxTxD = nn.with_logical_constraint(
      x_BxTxD, ("activation_batch", "activation_length", "activation_embed")
    )
    h_BxTxD = x_BxTxD + Attention(c, name="attn")(
      norm("attn_norm")(x_BxTxD), positions_BxT, segment_ids_BxT, self.decode
    )
    out_BxTxD = h_BxTxD + MLP(c, name="mlp")(norm("mlp_norm")(h_BxTxD))
    out_BxTxD = nn.with_logical_constraint(
      out_BxTxD, ("activation_batch", "activation_length", "activation_embed")
    )
    if c.scan_layers:
      return out_BxTxD, None
    return out_BxTxD


def output_kernel(config: ModelConfig, params: Any) -> jax.Array:
  """The [D, V] matrix that maps final hidden states to logits (the embedding when tied)."""
  if config.tie_embeddings:
    return params["embed"].T
  return params["lm_head"]


class Llama3(nn.Module):
  """LLaMA 3 causal LM: `apply({'params': p}, tokens[B,T]) -> logits[B,T,V]` (fp32)."""

  config: ModelConfig

  @nn.compact
  def __call__(
    self,
    tokens_BxT: jax.Array,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    *,
    decode: bool = False,
    return_hidden: bool = False,
  ) -> jax.Array:
    """Logits [B,T,V], or the final-norm hidden states [B,T,D] when `return_hidden`.

    Args:
      positions: [B,T] RoPE positions; default 0..T-1 (packed rows restart them per document).
      segment_ids: [B,T] document ids; tokens attend only within their own segment. 0 marks
        padding.
      decode: use and update the KV cache (`cache` collection), for generation.
    """
    c = self.config
    b, t = tokens_BxT.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    embedding_VxD = self.param(
      "embed",
      nn.with_logical_partitioning(nn.initializers.normal(_EMBED_INIT_STD), ("vocab", "embed")),
      (c.vocab_size, c.embed_dim),
      c.weight_dtype,
    )
    x_BxTxD = embed_tokens(embedding_VxD, tokens_BxT).astype(c.compute_dtype)

    block = Block
    if c.remat != "none":
      block = nn.remat(Block, policy=remat_policy(c.remat), prevent_cse=not c.scan_layers)
    if c.scan_layers:
      stack = nn.scan(
        block,
        variable_axes={"params": 0, "cache": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast, nn.broadcast),
        length=c.num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
      )
      x_BxTxD, _ = stack(c, decode, name="layers")(x_BxTxD, positions, segment_ids)
    else:
      for i in range(c.num_layers):
        x_BxTxD = block(c, decode, name=f"layers_{i}")(x_BxTxD, positions, segment_ids)

    x_BxTxD = RMSNorm(c.norm_eps, c.compute_dtype, c.weight_dtype, name="final_norm")(x_BxTxD)
    kernel_DxV = embedding_VxD.T
    if not c.tie_embeddings:
      kernel_DxV = self.param(
        "lm_head",
        nn.with_logical_partitioning(
          nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal"), ("embed", "vocab")
        ),
        (c.embed_dim, c.vocab_size),
        c.weight_dtype,
      )
    if return_hidden:
      return x_BxTxD
    logits_BxTxV = jnp.einsum(
      "btd,dv->btv", x_BxTxD, kernel_DxV.astype(c.compute_dtype), preferred_element_type=jnp.float32
    )
    return nn.with_logical_constraint(
      logits_BxTxV, ("activation_batch", "activation_length", "activation_vocab")
    )
