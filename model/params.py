"""The two layouts of a model's layers: one stacked `layers` subtree (scanned, a leading layer
axis) or `layers_0..layers_{L-1}` (unscanned), and the conversions between them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import meta


def is_scanned(params: Mapping[str, Any]) -> bool:
  """Whether the layers are one stacked `layers` subtree (True) or `layers_0..` (False)."""
  return "layers" in params


def stack_layers(params: Mapping[str, Any]) -> dict[str, Any]:
  """Unscanned params (`layers_0..layers_{L-1}`) -> scanned (`layers`, leading L axis)."""
  params = dict(meta.unbox(params))
  names = sorted((k for k in params if k.startswith("layers_")), key=lambda k: int(k[7:]))
  layers = [params.pop(k) for k in names]
  xp = jnp if isinstance(jax.tree.leaves(layers[0])[0], jax.Array) else np
  params["layers"] = jax.tree.map(lambda *xs: xp.stack(xs), *layers)
  return params


def unstack_layers(params: Mapping[str, Any]) -> dict[str, Any]:
  """Scanned params (`layers` with a leading L axis) -> unscanned (`layers_0..layers_{L-1}`)."""
  params = dict(meta.unbox(params))
  layers = params.pop("layers")
  for i in range(jax.tree.leaves(layers)[0].shape[0]):
    params[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], layers)
  return params
