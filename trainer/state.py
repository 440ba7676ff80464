"""Train state and its sharded initialization: no host ever holds the whole model."""

from __future__ import annotations

import logging
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from data.batching import as_axes
from model import Llama3, ModelConfig
from trainer.mesh import mesh_context


class TrainState(flax.struct.PyTreeNode):
  """Everything a step changes: the step count, parameters and optimizer state."""

  step: jax.Array
  params: Any
  opt_state: Any


def model_config(config: Any) -> ModelConfig:
  """The typed ModelConfig for a run config."""
  return ModelConfig(**config.model)


def logical_rules(config: Any) -> list[tuple[str, Any]]:
  """The logical -> mesh axis table from the config, as flax expects it."""
  return [
    (name, tuple(axes) if isinstance(axes, list | tuple) else axes)
    for name, axes in config.sharding_rules
  ]


def _init_params(model: Llama3, rng: jax.Array) -> Any:
  # The parameters do not depend on the attention kernel; an explicit one's shape checks must
  # not see this short dummy batch (splash wants whole 128-token tiles).
  model = model.clone(config=model.config.replace(attention="xla"))
  tokens = jnp.zeros((1, 8), jnp.int32)
  return model.init(rng, tokens)["params"]


def _boxed_shapes(model: Llama3) -> Any:
  """The parameters' shapes and dtypes, boxed with their logical axis names (one trace)."""
  return jax.eval_shape(lambda r: _init_params(model, r), jax.random.key(0))


def param_shardings(model: Llama3, mesh: Mesh, rules: list, boxed: Any = None) -> Any:
  """NamedShardings of every parameter, from its logical axis names and the rules (`boxed`:
  `_boxed_shapes(model)` where the caller has it already)."""
  boxed = _boxed_shapes(model) if boxed is None else boxed
  specs = nn.get_partition_spec(boxed)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
  _check_divisible(boxed, shardings, mesh)
  return shardings


def _check_divisible(boxed: Any, shardings: Any, mesh: Mesh) -> None:
  """A clear error for a parameter dimension that its mesh axes do not split evenly."""
  for (path, leaf), sharding in zip(
    jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)),
    jax.tree.leaves(shardings),
  ):
    names = getattr(leaf, "names", None) or (None,) * len(leaf.shape)
    shape = leaf.value.shape if isinstance(leaf, nn.Partitioned) else leaf.shape
    for size, name, axes in zip(shape, names, sharding.spec):
      axes = as_axes(axes)
      parts = 1
      for axis in axes:
        parts *= mesh.shape[axis]
      if size % parts:
        where = "/".join(str(getattr(k, "key", k)) for k in path)
        raise ValueError(
          f"Parameter {where} has {size} along {name!r}, which does not split over mesh axes "
          f"{axes} of size {parts}; pick mesh sizes that divide {size}, or map {name!r} to other "
          f"axes in sharding_rules."
        )


def state_layout(
  model: Llama3, tx: optax.GradientTransformation, mesh: Mesh, rules: list
) -> tuple[TrainState, TrainState]:
  """(shardings, abstract state) of the whole TrainState from one trace of the model's init.

  Optimizer moments follow their parameters. The abstract state is ShapeDtypeStructs carrying
  those shardings, for restore, `init_from` and AOT compiles.
  """
  boxed = _boxed_shapes(model)
  p_shard = param_shardings(model, mesh, rules, boxed)
  abstract_params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), nn.unbox(boxed))
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  replicated = NamedSharding(mesh, PartitionSpec())
  o_shard = optax.tree_map_params(
    tx, lambda _, s: s, abstract_opt, p_shard, transform_non_params=lambda _: replicated
  )
  shardings = TrainState(step=replicated, params=p_shard, opt_state=o_shard)
  shapes = TrainState(
    step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params, opt_state=abstract_opt
  )
  abstract = jax.tree.map(
    lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
  )
  return shardings, abstract


def init_state(model: Llama3, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
  """A fresh TrainState (unsharded definition; jit it with out_shardings to shard)."""
  params = nn.unbox(_init_params(model, rng))
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def create_sharded_state(
  model: Llama3,
  tx: optax.GradientTransformation,
  mesh: Mesh,
  rules: list,
  seed: int,
  shardings: TrainState | None = None,
) -> tuple[TrainState, TrainState]:
  """Initializes the state directly into its shardings (`state_layout(...)[0]`, computed here
  unless given); returns (state, shardings)."""
  if shardings is None:
    shardings, _ = state_layout(model, tx, mesh, rules)
  with mesh_context(mesh), nn.logical_axis_rules(rules):
    state = jax.jit(lambda r: init_state(model, tx, r), out_shardings=shardings)(
      jax.random.key(seed)
    )
  return state, shardings


def with_params(params: Any, tx: optax.GradientTransformation, shardings: TrainState) -> TrainState:
  """A state with `params` (host arrays, any placement) and a fresh optimizer (`init_from`)."""
  fn = jax.jit(
    lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p)),
    out_shardings=shardings,
  )
  # Host arrays go straight to their shards: no device ever holds the whole model.
  params = jax.device_put(params, shardings.params)
  return fn(params)


def init_from(
  path: str,
  mcfg: ModelConfig,
  tx: optax.GradientTransformation,
  shardings: TrainState,
  abstract_params: Any,
) -> TrainState:
  """A fresh optimizer over parameters from an HF directory, a params dir, or another run;
  `abstract_params` (`state_layout(...)[1].params`) gives each parameter's dtype."""
  p = epath.Path(path)
  if (p / "config.json").exists() and any(p.glob("*.safetensors*")):
    from model.hf import load_hf  # noqa: PLC0415

    loaded_cfg, params = load_hf(path, scan_layers=mcfg.scan_layers)
  elif (p / "model_config.json").exists():
    from model.convert import load_params_dir  # noqa: PLC0415

    loaded_cfg, params = load_params_dir(path)
  else:
    from trainer.checkpoint import restore_params  # noqa: PLC0415

    loaded_cfg, params = restore_params(path, on_host=True)
  from model.params import stack_layers, unstack_layers  # noqa: PLC0415
  from trainer.checkpoint import CheckpointMismatchError, shape_mismatch  # noqa: PLC0415

  if loaded_cfg.scan_layers != mcfg.scan_layers:  # Only the layers' layout differs: convert.
    params = (stack_layers if mcfg.scan_layers else unstack_layers)(params)
    loaded_cfg = loaded_cfg.replace(scan_layers=mcfg.scan_layers)

  diff = shape_mismatch(loaded_cfg.to_dict(), mcfg)
  if diff:
    raise CheckpointMismatchError(
      f"init_from={path} holds another model ({'; '.join(diff)}); "
      "set --config.model values to match it."
    )
  logging.info("Initialized parameters from %s.", path)
  params = jax.tree.map(lambda x, s: np.asarray(x, s.dtype), params, abstract_params)
  return with_params(params, tx, shardings)
