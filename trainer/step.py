"""The pure train and eval steps: the loss (trainer/loss.py), z-loss, gradient accumulation.

Dimension key: B batch, T length, D embed_dim, V vocab, A microbatches, C loss chunk length.
"""

import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from data.batching import BATCH_KEYS, batch_sharding
from model import Llama3, output_kernel
from trainer.loss import head_loss, token_cross_entropy
from trainer.state import TrainState


@functools.cache
def eval_metrics_class() -> type:
  """The CLU collection eval steps return: token-weighted mean cross-entropy.

  Built on first use, so the train step imports without CLU (the GPU image for
  `trainer.benchmark` has none).
  """
  from clu import metrics as clu_metrics

  @flax.struct.dataclass
  class EvalMetrics(clu_metrics.Collection):
    """The mean next-token loss over every evaluated token."""

    eval_loss: clu_metrics.Average.from_output("eval_loss")

  return EvalMetrics


def _hidden(model: Llama3, params: Any, batch: dict[str, jax.Array]) -> jax.Array:
  return model.apply(
    {"params": params},
    batch["inputs"],
    batch["positions"],
    batch["segment_ids"],
    return_hidden=True,
  )


def _loss_sums(params, batch, model: Llama3, chunk: int, z_loss: float):
  """(objective to differentiate, (cross-entropy sum, z-loss sum)), summed over real tokens."""
  hidden_BxTxD = _hidden(model, params, batch)
  kernel_DxV = output_kernel(model.config, params)
  return head_loss(hidden_BxTxD, kernel_DxV, batch["targets"], batch["loss_mask"], chunk, z_loss)


def train_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  *,
  model: Llama3,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
  grad_accum: int,
  chunk: int,
  z_loss: float,
  unroll: bool = False,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on the global batch; pure, no I/O.

  Gradients are sums over real tokens divided once by the batch's token count, so A
  microbatches of B/A rows give the same update as one batch of B rows. With `unroll` the
  microbatch loop is unrolled: the same sums in the same order, with the microbatches free to
  overlap.
  """
  grad_fn = jax.value_and_grad(_loss_sums, has_aux=True)
  if grad_accum == 1:
    (_, (ce_sum, z_sum)), grads = grad_fn(state.params, batch, model, chunk, z_loss)
  else:

    def split(x):
      # Microbatch a takes rows a, A + a, 2A + a, ...: every device keeps an equal share.
      x_AxBxT = x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1)
      return nn.with_logical_constraint(x_AxBxT, (None, "activation_batch", "activation_length"))

    def accumulate(carry, micro):
      (_, (ce, z)), g = grad_fn(state.params, micro, model, chunk, z_loss)
      g_acc, ce_acc, z_acc = carry
      return (jax.tree.map(jnp.add, g_acc, g), ce_acc + ce, z_acc + z), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    (grads, ce_sum, z_sum), _ = jax.lax.scan(
      accumulate, init, jax.tree.map(split, batch), unroll=unroll
    )
  num_tokens = jnp.sum(batch["loss_mask"])
  denom = jnp.maximum(num_tokens, 1.0)
  grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {
    "loss": ce_sum / denom,
    "z_loss": z_sum / denom,
    "grad_norm": optax.tree.norm(grads),
    "learning_rate": schedule(state.step),
    "num_tokens": num_tokens,
  }
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params: Any, batch: dict[str, jax.Array], *, model: Llama3, chunk: int) -> Any:
  """Cross-entropy of one held-out batch as a mergeable CLU metric."""
  hidden_BxTxD = _hidden(model, params, batch)
  kernel_DxV = output_kernel(model.config, params)
  ce_BxT, _ = token_cross_entropy(hidden_BxTxD, kernel_DxV, batch["targets"], chunk)
  return eval_metrics_class().single_from_model_output(eval_loss=ce_BxT, mask=batch["loss_mask"])


def batch_shardings(mesh: Mesh, rules: list) -> dict[str, NamedSharding]:
  """The sharding of each batch array: rows over the 'batch' rule's mesh axes."""
  sharding = batch_sharding(mesh, rules)
  return {k: sharding for k in BATCH_KEYS}


def jit_train_step(
  config: Any,
  model: Llama3,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
  mesh: Mesh,
  rules: list,
  shardings: TrainState,
) -> Any:
  """`train_step` jitted once with explicit shardings and a donated state."""
  fn = functools.partial(
    train_step,
    model=model,
    tx=tx,
    schedule=schedule,
    grad_accum=int(config.grad_accum_steps),
    chunk=int(config.loss_chunk_size),
    z_loss=float(config.z_loss),
    unroll=bool(config.grad_accum_unroll),
  )

  def step(state, batch):
    with nn.logical_axis_rules(rules):
      return fn(state, batch)

  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(
    step,
    in_shardings=(shardings, batch_shardings(mesh, rules)),
    out_shardings=(shardings, replicated),
    donate_argnums=(0,),
  )


def jit_eval_step(config: Any, model: Llama3, mesh: Mesh, rules: list, param_shardings: Any) -> Any:
  """`eval_step` jitted with explicit shardings."""
  fn = functools.partial(eval_step, model=model, chunk=int(config.loss_chunk_size))

  def step(params, batch):
    with nn.logical_axis_rules(rules):
      return fn(params, batch)

  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(
    step, in_shardings=(param_shardings, batch_shardings(mesh, rules)), out_shardings=replicated
  )
