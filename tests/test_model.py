"""Properties of the Llama3 module: causality, packing, MHA reference, layouts, remat, sizes."""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.linen import meta

from model import Llama3, ModelConfig
from model.params import stack_layers, unstack_layers
from tests.common import TINY_MODEL

TINY = TINY_MODEL.replace(remat="none")


def _params(config: ModelConfig, seed: int = 0) -> dict:
  """Random params in numpy (no init compile): fan-in scaled kernels, RMSNorm scales away from 1."""
  shapes = jax.eval_shape(Llama3(config).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  rng = np.random.default_rng(seed)

  def draw(path, x):
    names = [k.key for k in path]
    if names[-1] == "scale":
      return (1 + 0.5 * rng.standard_normal(x.shape)).astype(np.float32)
    kind = names[-2] if names[-1] == "kernel" else names[-1]
    if kind == "embed":
      fan_in = 1
    elif kind in ("q", "k", "v"):  # [(L,) D, N|K, H]
      fan_in = x.shape[-3]
    elif kind == "o":  # [(L,) N, H, D]
      fan_in = x.shape[-3] * x.shape[-2]
    else:  # [(L,) in, out]
      fan_in = x.shape[-2]
    return (rng.standard_normal(x.shape) / np.sqrt(fan_in)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, meta.unbox(shapes)["params"])


@functools.cache
def _apply(config: ModelConfig):
  return jax.jit(Llama3(config).apply)


def _logits(config, params, tokens, positions=None, segment_ids=None) -> np.ndarray:
  return np.asarray(_apply(config)({"params": params}, tokens, positions, segment_ids))


def test_causal_via_gradients():
  """d logits[t] / d embedding of the token at s is exactly zero for s > t, nonzero for s <= t."""
  t, config = 12, TINY.replace(scan_layers=False)  # Unscanned: a cheaper compile on CPU.
  tokens_T = np.random.default_rng(0).permutation(config.vocab_size)[:t]  # Distinct: rows = slots.
  params = _params(config)
  w_V = jax.random.normal(jax.random.key(1), (config.vocab_size,))

  def f(embed_VxD):
    logits_1xTxV = Llama3(config).apply({"params": {**params, "embed": embed_VxD}}, tokens_T[None])
    return logits_1xTxV[0] @ w_V

  jac_TxVxD = jax.jit(jax.jacrev(f))(params["embed"])
  dep_TxT = np.abs(np.asarray(jac_TxVxD[:, tokens_T])).sum(-1)  # [t, s]
  future = np.triu(np.ones((t, t), bool), k=1)
  assert np.all(dep_TxT[future] == 0.0)
  assert np.all(dep_TxT[~future] > 1e-6)


def test_segments_are_isolated():
  """In a packed row, one document's tokens never touch another's logits; order is irrelevant."""
  n1, n2 = 7, 9
  rng = np.random.default_rng(0)
  params = _params(TINY)
  doc1, doc1_alt, doc2 = (rng.integers(0, TINY.vocab_size, n) for n in (n1, n1, n2))

  def packed(*docs):
    segments = np.concatenate([np.full(len(d), i + 1) for i, d in enumerate(docs)])[None]
    positions = np.concatenate([np.arange(len(d)) for d in docs])[None]
    return _logits(TINY, params, np.concatenate(docs)[None], positions, segments)[0]

  a, b, swapped = packed(doc1, doc2), packed(doc1_alt, doc2), packed(doc2, doc1)
  assert np.abs(a[:n1] - b[:n1]).max() > 1e-2  # Document 1 itself did change.
  np.testing.assert_allclose(a[n1:], b[n1:], rtol=0, atol=1e-6)
  np.testing.assert_allclose(a[n1:], swapped[:n2], rtol=0, atol=1e-5)
  np.testing.assert_allclose(a[:n1], swapped[n2:], rtol=0, atol=1e-5)


def _reference_logits(c: ModelConfig, p: dict, tokens_T: np.ndarray) -> np.ndarray:
  """Plain multi-head LLaMA in float64 numpy, written without the model's code."""
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), p)
  t, h = len(tokens_T), c.head_dim

  def norm(x, scale):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + c.norm_eps) * scale

  def rope(x_TxNxH):  # Pairs (i, i + H/2) as one complex number, turned by position * freq.
    angle_Txh = np.arange(t)[:, None] * c.rope_theta ** (-np.arange(0, h, 2) / h)
    z = (x_TxNxH[..., : h // 2] + 1j * x_TxNxH[..., h // 2 :]) * np.exp(1j * angle_Txh)[:, None]
    return np.concatenate([z.real, z.imag], -1)

  x_TxD = p["embed"][tokens_T]
  for i in range(c.num_layers):
    lp = jax.tree.map(lambda a, i=i: a[i], p["layers"])
    y = norm(x_TxD, lp["attn_norm"]["scale"])
    q, k, v = (np.einsum("td,dnh->tnh", y, lp["attn"][n]["kernel"]) for n in "qkv")
    q, k = rope(q), rope(k)
    heads = []
    for n in range(c.num_heads):
      s_TxT = q[:, n] @ k[:, n].T / np.sqrt(h)
      s_TxT = np.where(np.tril(np.ones((t, t), bool)), s_TxT, -np.inf)
      e_TxT = np.exp(s_TxT - s_TxT.max(-1, keepdims=True))
      heads.append(e_TxT / e_TxT.sum(-1, keepdims=True) @ v[:, n])
    x_TxD = x_TxD + np.einsum("tnh,nhd->td", np.stack(heads, 1), lp["attn"]["o"]["kernel"])
    y = norm(x_TxD, lp["mlp_norm"]["scale"])
    gate, up = y @ lp["mlp"]["gate"]["kernel"], y @ lp["mlp"]["up"]["kernel"]
    x_TxD = x_TxD + (gate / (1 + np.exp(-gate)) * up) @ lp["mlp"]["down"]["kernel"]
  return norm(x_TxD, p["final_norm"]["scale"]) @ p["lm_head"]


def test_mha_matches_independent_reference():
  config = TINY.replace(num_kv_heads=TINY.num_heads)
  params = _params(config)
  tokens_T = np.random.default_rng(0).integers(0, config.vocab_size, 16)
  ours = _logits(config, params, tokens_T[None])[0]
  ref = _reference_logits(config, params, tokens_T)
  assert np.abs(ref).std() > 0.3
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)  # Measured: 1.9e-6.


def test_scanned_equals_unscanned():
  scanned = _params(TINY)
  unscanned = unstack_layers(scanned)
  config_u = TINY.replace(scan_layers=False)
  # The converted tree is exactly the unscanned model's own layout.
  shapes_u = _params(config_u)
  assert jax.tree.structure(shapes_u) == jax.tree.structure(unscanned)
  assert jax.tree.map(np.shape, shapes_u) == jax.tree.map(np.shape, unscanned)
  jax.tree.map(np.testing.assert_array_equal, stack_layers(unscanned), scanned)
  tokens = np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 16))
  np.testing.assert_allclose(
    _logits(config_u, unscanned, tokens), _logits(TINY, scanned, tokens), rtol=0, atol=1e-5
  )


@functools.cache
def _baseline():
  """Params, tokens, and the loss and gradients of the scanned stack without remat."""
  params = _params(TINY)
  tokens = np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 17))
  return params, tokens, _loss_and_grads(TINY, params, tokens)


def _loss_and_grads(config, params, tokens):
  def loss(p):
    logits = Llama3(config).apply({"params": p}, tokens[:, :-1])
    logp = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()

  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize(
  ("remat", "scan"),
  [("full", True), ("dots", True), ("dots_no_batch", True), ("offload", True), ("full", False)],
)
def test_remat_changes_nothing(remat, scan):
  """Each policy gives the loss and gradients of no remat; unscanned too, where every layer is
  rematerialized on its own (with prevent_cse)."""
  params, tokens, (loss0, grads0) = _baseline()
  config = TINY.replace(remat=remat, scan_layers=scan)
  loss1, grads1 = _loss_and_grads(config, params if scan else unstack_layers(params), tokens)
  grads1 = grads1 if scan else stack_layers(grads1)
  np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
  for g1, g0 in zip(jax.tree.leaves(grads1), jax.tree.leaves(grads0)):
    assert np.abs(g0).max() > 0
    np.testing.assert_allclose(g1, g0, rtol=0, atol=1e-6 * np.abs(g0).max())


@pytest.mark.parametrize(
  "preset, expected",
  [
    ("llama3_8b", 8_030_261_248),
    ("llama3_70b", 70_553_706_496),
    ("llama3_405b", 405_853_388_800),
    ("llama3_2_1b", 1_235_814_400),
    ("llama3_2_3b", 3_212_749_824),
  ],
)
def test_preset_parameter_counts(preset, expected):
  config = ModelConfig(**importlib.import_module(f"configs.{preset}").get_config().model.to_dict())
  shapes = jax.eval_shape(Llama3(config).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(meta.unbox(shapes)))
  assert count == expected
  assert config.num_params() == expected


SCALING = dict(
  factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64
)


@pytest.mark.parametrize(
  "change, match",
  [
    (dict(num_heads=6, num_kv_heads=4), "num_heads=6 is not a multiple of model.num_kv_heads=4"),
    (dict(remat="everything"), "remat='everything' is unknown"),
    (dict(num_layers=0), "num_layers must be a positive integer"),
    (dict(rope_scaling={**SCALING, "factor": 0.0}), "needs factor >= 1 and 0 < low_freq"),
    (dict(rope_scaling={**SCALING, "high_freq_factor": 0.5}), "0 < low_freq_factor < high"),
    (dict(rope_scaling={**SCALING, "rope_type": "linear"}), "type 'linear'; only Llama 3.1"),
    (dict(rope_scaling={**SCALING, "beta": 1}), r"has \['beta'\]; only Llama 3.1's"),
  ],
)
def test_bad_config_raises_clear_error(change, match):
  with pytest.raises(ValueError, match=match):
    TINY.replace(**change)


def test_rope_scaling_factor_1_is_plain_rope():
  """The command line cannot set rope_scaling to None; factor 1.0 turns it off, exactly."""
  assert TINY.replace(rope_scaling={**SCALING, "factor": 1.0}).rope_scaling is None
  assert TINY.replace(rope_scaling=SCALING).rope_scaling["factor"] == 8.0


@pytest.mark.parametrize("lookup", ["embed_tokens", "jnp.take"])
@pytest.mark.parametrize("shape", [(2, 4, 1), (2, 2, 2)])
def test_embedding_stays_split_over_the_mesh(lookup, shape):
  """With the batch over data x fsdp, the table's D over fsdp and its V over tensor:
  - the forward pass never holds the whole global batch's embeddings on a device (jnp.take
    does: the partitioner all-gathers them over 'data', and with V split at full width);
  - the table gradient is scattered into each device's own [V, D / fsdp] slice: no device
    builds the whole fp32 [V, D] table (jnp.take's own gradient does when the batch is split
    over more axes than D);
  - the values are exact."""
  import flax.linen as nn
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  from configs.base import SHARDING_RULES
  from model.llama import embed_tokens
  from trainer.mesh import mesh_context

  v, d, b, t = 320, 96, 8, 12
  rng = np.random.default_rng(0)
  table = rng.standard_normal((v, d)).astype(np.float32)
  tokens = rng.integers(0, v, (b, t)).astype(np.int32)  # Repeats: a scatter-add, not a copy.
  dy = rng.standard_normal((b, t, d)).astype(np.float32)
  take = embed_tokens if lookup == "embed_tokens" else lambda t, i: jnp.take(t, i, axis=0)

  def loss(t, i):
    return jnp.sum(take(t, i) * dy)

  want = np.zeros_like(table)
  np.add.at(want, tokens, dy)
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(shape), ("data", "fsdp", "tensor"))
  with mesh_context(mesh), nn.logical_axis_rules(SHARDING_RULES):
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    ins = (NamedSharding(mesh, PartitionSpec("tensor", "fsdp")), rows)
    forward = jax.jit(take, in_shardings=ins, out_shardings=rows)
    step = jax.jit(jax.grad(loss), in_shardings=ins)
    got_rows, got = forward(table, tokens), step(table, tokens)
    forward_hlo = forward.lower(table, tokens).compile().as_text()
    hlo = step.lower(table, tokens).compile().as_text()
  np.testing.assert_array_equal(np.asarray(got_rows), table[tokens])
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)
  whole_batch = f"f32[{b},{t}," in forward_hlo
  assert whole_batch == (lookup == "jnp.take"), f"{lookup}: whole batch gathered"
  full_table = f"f32[{v},{d}]" in hlo
  assert full_table == (lookup == "jnp.take" and shape[0] > 1), f"{lookup}: whole [V, D] table"
