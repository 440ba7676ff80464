"""The dense contraction behind every projection, with a backward pass XLA:CPU runs fast.

XLA:CPU sends a matmul to YNNPACK only when its left operand is row-major with the contracted
dimension minor. The weight gradient of `x @ W` contracts over the tokens, the major dimension
of `x`, so XLA falls back to Eigen for it (about half the speed; a third of the head's
gradient). On CPU the backward pass therefore transposes `x` into a real [in, tokens] copy
first; an optimization barrier keeps XLA from folding that transpose back into the dot. Other
platforms get JAX's own gradient; `lax.platform_dependent` picks the branch at lowering time,
so TPU and GPU programs (AOT-compiled ones included) never contain the barrier.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _contract(x: jax.Array, kernel: jax.Array, num_in: int, out_dtype) -> jax.Array:
  contract = (tuple(range(x.ndim - num_in, x.ndim)), tuple(range(num_in)))
  return jax.lax.dot_general(x, kernel, (contract, ((), ())), preferred_element_type=out_dtype)


def _grads(x, kernel, dy, num_in, out_dtype):
  """JAX's own gradients of `_contract`."""
  _, vjp = jax.vjp(lambda a, k: _contract(a, k, num_in, out_dtype), x, kernel)
  return vjp(dy)


def _cpu_grads(x, kernel, dy, num_in, out_dtype):
  """The same gradients, with the weight gradient a canonical [in, tokens] x [tokens, out] dot."""
  _, vjp_x = jax.vjp(lambda a: _contract(a, kernel, num_in, out_dtype), x)
  (dx,) = vjp_x(dy)
  nb = x.ndim - num_in
  x_t = jax.lax.optimization_barrier(jnp.transpose(x, tuple(range(nb, x.ndim)) + tuple(range(nb))))
  dims = ((tuple(range(num_in, x.ndim)), tuple(range(nb))), ((), ()))
  dw = jax.lax.dot_general(x_t, dy, dims, preferred_element_type=out_dtype)
  return dx, dw.astype(kernel.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def dense(x: jax.Array, kernel: jax.Array, num_in: int = 1, out_dtype=None) -> jax.Array:
  """Contracts the last `num_in` dims of `x` with the first `num_in` dims of `kernel`."""
  return _contract(x, kernel, num_in, out_dtype)


def _dense_fwd(x, kernel, num_in, out_dtype):
  return _contract(x, kernel, num_in, out_dtype), (x, kernel)


def _dense_bwd(num_in, out_dtype, residuals, dy):
  x, kernel = residuals
  return jax.lax.platform_dependent(
    x,
    kernel,
    dy,
    cpu=functools.partial(_cpu_grads, num_in=num_in, out_dtype=out_dtype),
    default=functools.partial(_grads, num_in=num_in, out_dtype=out_dtype),
  )


dense.defvjp(_dense_fwd, _dense_bwd)
