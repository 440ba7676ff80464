"""The dense contraction behind every projection, with a backward pass XLA:CPU runs fast.

XLA:CPU sends a matmul to YNNPACK only when its left operand is row-major with the contracted
dimension minor. The weight gradient of `x @ W` contracts over the tokens, the major dimension
of `x`, so XLA falls back to Eigen for it (about half the speed; a third of the head's
gradient). On CPU the backward pass therefore transposes `x` into a real [in, tokens] copy
first, once for all the kernels that read the same `x` (q, k, v; gate, up); an optimization
barrier keeps XLA from folding that transpose back into the dot. Other platforms get JAX's own
gradient; `lax.platform_dependent` picks the branch at lowering time, so TPU and GPU programs
(AOT-compiled ones included) never contain the barrier.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _contract(x: jax.Array, kernel: jax.Array, num_in: int, out_dtype) -> jax.Array:
  contract = (tuple(range(x.ndim - num_in, x.ndim)), tuple(range(num_in)))
  return jax.lax.dot_general(x, kernel, (contract, ((), ())), preferred_element_type=out_dtype)


def _contract_all(x, kernels, num_in, out_dtype):
  return tuple(_contract(x, k, num_in, out_dtype) for k in kernels)


def _grads(x, kernels, dys, num_in, out_dtype):
  """JAX's own gradients of `_contract_all`."""
  _, vjp = jax.vjp(lambda a, ks: _contract_all(a, ks, num_in, out_dtype), x, kernels)
  return vjp(dys)


def _cpu_grads(x, kernels, dys, num_in, out_dtype):
  """The same gradients; each weight gradient a canonical [in, tokens] x [tokens, out] dot."""
  _, vjp_x = jax.vjp(lambda a: _contract_all(a, kernels, num_in, out_dtype), x)
  (dx,) = vjp_x(dys)
  nb = x.ndim - num_in
  x_t = jax.lax.optimization_barrier(jnp.transpose(x, tuple(range(nb, x.ndim)) + tuple(range(nb))))
  dims = ((tuple(range(num_in, x.ndim)), tuple(range(nb))), ((), ()))
  dws = tuple(
    jax.lax.dot_general(x_t, dy, dims, preferred_element_type=out_dtype).astype(k.dtype)
    for k, dy in zip(kernels, dys)
  )
  return dx, dws


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def dense_many(
  x: jax.Array, kernels: tuple[jax.Array, ...], num_in: int = 1, out_dtype=None
) -> tuple[jax.Array, ...]:
  """`dense(x, k)` for each kernel: one shared transposed copy of `x` in the CPU backward."""
  return _contract_all(x, kernels, num_in, out_dtype)


def _dense_many_fwd(x, kernels, num_in, out_dtype):
  return _contract_all(x, kernels, num_in, out_dtype), (x, kernels)


def _dense_many_bwd(num_in, out_dtype, residuals, dys):
  x, kernels = residuals
  return jax.lax.platform_dependent(
    x,
    kernels,
    dys,
    cpu=functools.partial(_cpu_grads, num_in=num_in, out_dtype=out_dtype),
    default=functools.partial(_grads, num_in=num_in, out_dtype=out_dtype),
  )


dense_many.defvjp(_dense_many_fwd, _dense_many_bwd)


def dense(x: jax.Array, kernel: jax.Array, num_in: int = 1, out_dtype=None) -> jax.Array:
  """Contracts the last `num_in` dims of `x` with the first `num_in` dims of `kernel`."""
  return dense_many(x, (kernel,), num_in, out_dtype)[0]
