"""The output-head losses against plain autodiff of a full-logits reference."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from trainer.loss import _merge, _split, head_loss, token_cross_entropy

B, T, D, V = 2, 13, 8, 40  # T prime: chunks of 3, 4 or 5 tokens need a padded last one.


def _inputs(dtype=jnp.float32):
  k = jax.random.split(jax.random.key(0), 4)
  hidden = jax.random.normal(k[0], (B, T, D), dtype)
  kernel = jax.random.normal(k[1], (D, V), jnp.float32)
  targets = jax.random.randint(k[2], (B, T), 0, V)
  # Padding (0), real tokens (1) and a fractional weight, so every term of d/dw shows.
  weights = jax.random.choice(k[3], jnp.array([0.0, 1.0, 1.0, 0.5]), (B, T))
  return hidden, kernel, targets, weights


def _reference(hidden, kernel, targets, weights, z_loss):
  logits = jnp.einsum("btd,dv->btv", hidden, kernel.astype(hidden.dtype)).astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  ce = lse - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  ce_sum, z_sum = jnp.sum(ce * weights), jnp.sum(lse**2 * weights)
  return ce_sum + z_loss * z_sum, (ce_sum, z_sum)


@pytest.mark.parametrize("chunk", [0, 4, 5, 13])  # one chunk, 4 x 4 and 3 x 5 (padded), T
@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
def test_head_loss_value_and_gradients_match_autodiff(chunk, z_loss):
  hidden, kernel, targets, weights = _inputs()
  fused = jax.value_and_grad(
    lambda h, k, w: head_loss(h, k, targets, w, chunk, z_loss), argnums=(0, 1, 2), has_aux=True
  )
  plain = jax.value_and_grad(
    lambda h, k, w: _reference(h, k, targets, w, z_loss), argnums=(0, 1, 2), has_aux=True
  )
  (obj, sums), grads = jax.jit(fused)(hidden, kernel, weights)
  (ref_obj, ref_sums), ref_grads = plain(hidden, kernel, weights)
  np.testing.assert_allclose(obj, ref_obj, rtol=1e-5)
  np.testing.assert_allclose(sums, ref_sums, rtol=1e-5)
  for g, r, name in zip(grads, ref_grads, ("hidden", "kernel", "weights")):
    assert g.dtype == r.dtype, name
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=2e-6, err_msg=name)
  assert np.abs(ref_grads[0]).max() > 0.1  # A real gradient, not zeros on both sides.


def test_head_loss_scales_with_the_cotangent_and_its_sums_carry_none():
  hidden, kernel, targets, weights = _inputs()

  def f(h):
    obj, (ce_sum, z_sum) = head_loss(h, kernel, targets, weights, 4, 1e-3)
    return 3.0 * obj + ce_sum + z_sum

  def ref(h):
    return 3.0 * _reference(h, kernel, targets, weights, 1e-3)[0]

  np.testing.assert_allclose(jax.grad(f)(hidden), jax.grad(ref)(hidden), rtol=1e-5, atol=2e-6)


def test_head_loss_in_bfloat16_keeps_dtypes_and_tracks_fp32():
  hidden, kernel, targets, weights = _inputs()
  grad = jax.grad(lambda h, k: head_loss(h, k, targets, weights, 4, 0.0)[0], argnums=(0, 1))
  dh16, dk16 = jax.jit(grad)(hidden.astype(jnp.bfloat16), kernel)
  dh32, dk32 = jax.jit(grad)(hidden, kernel)
  assert dh16.dtype == jnp.bfloat16 and dk16.dtype == jnp.float32
  np.testing.assert_allclose(dh16.astype(jnp.float32), dh32, rtol=0.05, atol=0.02)
  np.testing.assert_allclose(dk16, dk32, rtol=0.05, atol=0.02)


@pytest.mark.parametrize("chunk", [0, 3])
def test_token_cross_entropy_matches_the_reference_per_token(chunk):
  hidden, kernel, targets, _ = _inputs()
  ce, lse = jax.jit(token_cross_entropy, static_argnums=3)(hidden, kernel, targets, chunk)
  logits = jnp.einsum("btd,dv->btv", hidden, kernel)
  ref_lse = jax.nn.logsumexp(logits, axis=-1)
  ref_ce = ref_lse - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  np.testing.assert_allclose(lse, ref_lse, rtol=1e-5)
  np.testing.assert_allclose(ce, ref_ce, rtol=1e-5, atol=1e-6)


def test_chunks_that_do_not_divide_the_length_are_padded_and_logits_stay_chunk_sized():
  hidden, kernel, targets, weights = _inputs()
  parts = _split(hidden, 4)
  assert parts.shape == (4, B, 4, D) and not np.asarray(parts[-1, :, 1:]).any()
  np.testing.assert_array_equal(_merge(parts, T), hidden)
  assert _split(hidden[:, :12], 3).shape == (3, B, 4, D)  # Even: no padding.
  step = jax.grad(lambda h, k: head_loss(h, k, targets, weights, 4, 0.0)[0], argnums=(0, 1))
  shapes = {
    v.aval.shape
    for eq in _equations(jax.make_jaxpr(step)(hidden, kernel).jaxpr)
    for v in eq.outvars
  }
  assert (B, 4, V) in shapes and not any(len(s) == 3 and s[-1] == V and s[1] > 4 for s in shapes)


def _equations(jaxpr):
  """Every equation of a jaxpr, inside scans and custom rules too."""
  for eq in jaxpr.eqns:
    yield eq
    for sub in jax.extend.core.jaxprs_in_params(eq.params):
      yield from _equations(sub)
