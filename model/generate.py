"""Autoregressive sampling with a KV cache: batched prefill, then one jitted decode loop.

Dimension key: B batch, T padded prompt length, N new tokens, S cache length (T + N), D embed_dim,
V vocab, L layers.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from model.config import ModelConfig
from model.llama import Llama3, output_kernel
from model.params import unstack_layers


class Tokenizer(Protocol):
  """What `sample_text` needs from a tokenizer (`data.tokenizers.Tokenizer` is one)."""

  bos_id: int
  eos_id: int

  def encode(self, text: str, *, bos: bool = False) -> list[int]: ...

  def decode(self, ids: Sequence[int]) -> str: ...


def _cache_logical_axes(config: ModelConfig, name: str) -> tuple[str | None, ...]:
  """Logical axes of one cache variable, so the one rules table also lays out the cache."""
  axes = {
    "key": ("activation_batch", "activation_length", "activation_kv_heads", None),
    "value": ("activation_batch", "activation_length", "activation_kv_heads", None),
    "segment_ids": ("activation_batch", "activation_length"),
    "index": (),
  }[name]
  return ("layers", *axes) if config.scan_layers else axes


def constrain_cache(config: ModelConfig, cache: Any) -> Any:
  """Applies the cache's logical sharding (a no-op outside a mesh and rules context)."""

  def one(path, x):
    name = path[-1].key
    return nn.with_logical_constraint(x, _cache_logical_axes(config, name))

  return jax.tree_util.tree_map_with_path(one, cache)


def init_cache(config: ModelConfig, batch: int) -> Any:
  """An empty KV cache of `config.max_seq_len` slots for `batch` sequences (all segment 0)."""
  tokens_Bx1 = jnp.zeros((batch, 1), jnp.int32)
  shapes = jax.eval_shape(
    lambda: Llama3(config).init(jax.random.key(0), tokens_Bx1, decode=True)["cache"]
  )
  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nn.unbox(shapes))
  return constrain_cache(config, cache)


def prefill(
  config: ModelConfig, params: Any, cache: Any, tokens_BxT: jax.Array, lengths_B: jax.Array
) -> tuple[jax.Array, Any]:
  """Writes right-padded prompts into cache slots [0, T); returns each one's last logits [B, V].

  Pad slots (index >= length) get segment id 0, so no later query ever attends to them.
  """
  b, t = tokens_BxT.shape
  slots_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  segment_ids_BxT = (slots_BxT < lengths_B[:, None]).astype(jnp.int32)
  hidden_BxTxD, variables = Llama3(config).apply(
    {"params": params, "cache": cache},
    tokens_BxT,
    slots_BxT,
    segment_ids_BxT,
    decode=True,
    return_hidden=True,
    mutable=["cache"],
  )
  # Only the last real token's logits are needed: skip the [B, T, V] head matmul.
  last_BxD = jnp.take_along_axis(hidden_BxTxD, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
  kernel_DxV = output_kernel(config, params).astype(config.compute_dtype)
  logits_BxV = jnp.einsum("bd,dv->bv", last_BxD, kernel_DxV, preferred_element_type=jnp.float32)
  return logits_BxV, constrain_cache(config, variables["cache"])


def decode_step(
  config: ModelConfig, params: Any, cache: Any, tokens_B: jax.Array, positions_B: jax.Array
) -> tuple[jax.Array, Any]:
  """Feeds one token per sequence at the cache's next slot; returns logits [B, V] and the cache."""
  logits_Bx1xV, variables = Llama3(config).apply(
    {"params": params, "cache": cache},
    tokens_B[:, None],
    positions_B[:, None],
    jnp.ones_like(tokens_B)[:, None],
    decode=True,
    mutable=["cache"],
  )
  return logits_Bx1xV[:, 0], constrain_cache(config, variables["cache"])


def _ordered_keys(x: jax.Array) -> jax.Array:
  """uint32 keys that order like the float32 values (the radix-sort mapping)."""
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def _largest_key(keys_BxV: jax.Array, holds: Any) -> jax.Array:
  """Per row, the largest key x for which `holds(keys >= x)` (monotone in x), bit by bit.

  32 masked reductions over [B, V] find an exact threshold; a sort of [B, V] is far slower on
  CPU and the filters need no more than the threshold.
  """

  def body(i, ans_B):
    cand_B = ans_B | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
    return jnp.where(holds(keys_BxV >= cand_B[:, None]), cand_B, ans_B)

  return jax.lax.fori_loop(0, 32, body, jnp.zeros(keys_BxV.shape[:1], jnp.uint32))


def filter_logits(
  logits_BxV: jax.Array, *, top_k: int | jax.Array, top_p: float | jax.Array
) -> jax.Array:
  """Top-k (0: off), then top-p (1: off): tokens outside get -inf; ties with the last kept stay.

  Both may be traced, so one compiled decode loop serves every setting.
  """

  def keep_top_k(logits_BxV):
    keys_BxV = _ordered_keys(logits_BxV)
    kth_B = _largest_key(keys_BxV, lambda m_BxV: jnp.sum(m_BxV, axis=-1) >= top_k)
    return jnp.where(keys_BxV >= kth_B[:, None], logits_BxV, -jnp.inf)

  def keep_top_p(logits_BxV):
    # The nucleus: the likeliest tokens whose mass first reaches top_p, i.e. all tokens at or
    # above the largest logit whose at-or-above mass is still >= top_p.
    probs_BxV = jax.nn.softmax(logits_BxV, axis=-1)
    keys_BxV = _ordered_keys(logits_BxV)
    mass = lambda m_BxV: jnp.sum(jnp.where(m_BxV, probs_BxV, 0.0), axis=-1) >= top_p
    cutoff_B = _largest_key(keys_BxV, mass)
    return jnp.where(keys_BxV >= cutoff_B[:, None], logits_BxV, -jnp.inf)

  # Each filter costs 32 passes over [B, V]; skip the ones that are off.
  logits_BxV = jax.lax.cond(top_k > 0, keep_top_k, lambda x: x, logits_BxV)
  return jax.lax.cond(top_p < 1.0, keep_top_p, lambda x: x, logits_BxV)


def sample_logits(
  logits_BxV: jax.Array,
  rng: jax.Array,
  *,
  temperature: float | jax.Array,
  top_k: int | jax.Array,
  top_p: float | jax.Array,
) -> jax.Array:
  """Next tokens [B] drawn after temperature, then the top-k and top-p filters.

  Greedy decoding is `jnp.argmax`, not temperature 0.
  """
  logits_BxV = logits_BxV.astype(jnp.float32)
  # Shifted so the largest is 0 first: a tiny temperature then sends the rest to -inf (greedy),
  # never the largest to +inf (which would make every finite logit tie).
  logits_BxV = (logits_BxV - jnp.max(logits_BxV, axis=-1, keepdims=True)) / temperature
  logits_BxV = filter_logits(logits_BxV, top_k=top_k, top_p=top_p)
  return jax.random.categorical(rng, logits_BxV, axis=-1).astype(jnp.int32)


def _unroll_layers(config: ModelConfig) -> bool:
  """Whether to decode with unrolled layers: on CPU, where it is 2x faster than scanned ones.

  XLA:CPU copies each layer's weights out of the stacked arrays at every scan step, which doubles
  a memory-bound decode step; unrolled layers read them in place. The one-off unstacking copy is
  made before the decode loop.
  """
  return config.scan_layers and jax.default_backend() == "cpu"


@functools.partial(
  jax.jit,
  static_argnames=("config", "max_new_tokens", "greedy", "eos_ids", "pad_id", "unroll"),
)
def _generate(
  config: ModelConfig,
  params: Any,
  tokens_BxT: jax.Array,
  lengths_B: jax.Array,
  rng: jax.Array,
  *,
  max_new_tokens: int,
  greedy: bool,
  temperature: jax.Array,
  top_k: jax.Array,
  top_p: jax.Array,
  eos_ids: tuple[int, ...],
  pad_id: int,
  unroll: bool,
) -> jax.Array:
  """The whole generation as one program: prefill, then a while loop of decode steps."""
  if unroll:
    config, params = config.replace(scan_layers=False), unstack_layers(params)
  b, t = tokens_BxT.shape
  n = max_new_tokens
  if greedy:
    sample = lambda logits_BxV, _: jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  else:
    sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p)
  is_eos = lambda tok_B: jnp.isin(tok_B, jnp.asarray(eos_ids, jnp.int32))

  # Pad ids may lie outside the vocab, where the embedding lookup gives NaN; masked slots must
  # still hold finite keys and values (0 * NaN is NaN), so the model sees token 0 there.
  real_BxT = jnp.arange(t) < lengths_B[:, None]
  inputs_BxT = jnp.where(real_BxT, tokens_BxT, 0)
  logits_BxV, cache = prefill(config, params, init_cache(config, b), inputs_BxT, lengths_B)
  tok_B = sample(logits_BxV, jax.random.fold_in(rng, 0))
  new_BxN = jnp.full((b, n), pad_id, jnp.int32).at[:, 0].set(tok_B)
  done_B = is_eos(tok_B)

  def cond(carry):
    i, _, _, done_B, _ = carry
    return (i < n) & ~jnp.all(done_B)

  def body(carry):
    i, cache, prev_B, done_B, new_BxN = carry
    # Token i-1 sits in cache slot T + i - 1 at RoPE position length + i - 1.
    logits_BxV, cache = decode_step(config, params, cache, prev_B, lengths_B + i - 1)
    tok_B = sample(logits_BxV, jax.random.fold_in(rng, i))
    new_BxN = jax.lax.dynamic_update_slice(
      new_BxN, jnp.where(done_B, pad_id, tok_B)[:, None], (0, i)
    )
    return i + 1, cache, tok_B, done_B | is_eos(tok_B), new_BxN

  carry = (jnp.int32(1), cache, tok_B, done_B, new_BxN)
  new_BxN = jax.lax.while_loop(cond, body, carry)[-1]

  # Row i: its prompt, then its new tokens, then padding.
  out_BxS = jnp.concatenate([tokens_BxT, jnp.full((b, n), pad_id, jnp.int32)], axis=1)
  place = lambda row_S, new_N, start: jax.lax.dynamic_update_slice(row_S, new_N, (start,))
  return jax.vmap(place)(out_BxS, new_BxN, lengths_B)


def pad_prompts(
  prompt_tokens: Sequence[Sequence[int]] | np.ndarray | jax.Array, pad_id: int = 0
) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads prompts to one length T: (tokens [B, T] int32, lengths [B])."""
  if isinstance(prompt_tokens, np.ndarray | jax.Array):
    tokens_BxT = np.asarray(prompt_tokens, np.int32)
    if tokens_BxT.ndim != 2:
      raise ValueError(f"prompt_tokens must be [B, T]; got shape {tokens_BxT.shape}.")
    lengths_B = np.full((tokens_BxT.shape[0],), tokens_BxT.shape[1], np.int32)
  else:
    lengths_B = np.asarray([len(p) for p in prompt_tokens], np.int32)
    if len(lengths_B) == 0:
      raise ValueError("prompt_tokens is empty; give at least one prompt.")
    tokens_BxT = np.full((len(lengths_B), lengths_B.max()), pad_id, np.int32)
    for row, p in zip(tokens_BxT, prompt_tokens):
      row[: len(p)] = p
  if tokens_BxT.size == 0 or lengths_B.min() < 1:
    raise ValueError("Every prompt needs at least one token (e.g. the BOS token).")
  return tokens_BxT, lengths_B


def generate(
  config: ModelConfig,
  params: Any,
  prompt_tokens: Sequence[Sequence[int]] | np.ndarray | jax.Array,
  *,
  max_new_tokens: int,
  temperature: float = 0.0,
  top_k: int = 0,
  top_p: float = 1.0,
  eos_id: int | Sequence[int] | None = None,
  rng: jax.Array | None = None,
  pad_id: int = 0,
) -> jax.Array:
  """Continues each prompt by `max_new_tokens` tokens; returns int32 tokens [B, T + N].

  Args:
    params: the model's `params` collection (boxed or not), possibly sharded.
    prompt_tokens: a list of B token lists of any lengths >= 1, or an int array [B, T] whose rows
      are all full-length prompts. T is the longest prompt.
    temperature: 0 is greedy (argmax); otherwise logits are divided by it and sampled after the
      top-k (0: off) and top-p (1: off) filters.
    eos_id: a token id (or several) that ends a sequence; the stop token is kept, the rest of that
      row is `pad_id`. Generation stops early once every row has stopped.
    rng: a PRNG key for sampling (default key 0); the same key gives the same tokens.
    pad_id: the id written in unused places of the output.

  Returns:
    Row i is prompt i (its `len_i` tokens), then its N generated tokens (`pad_id` after a stop),
    then `T - len_i` pads: `out[i, :len_i + N]` is exactly what a per-prompt generation gives.

  Inside, prompts are right-padded to T in the KV cache (pad slots have segment id 0 and are
  never attended to); new token j of row i goes to cache slot T + j with RoPE position len_i + j.
  Under `jax.set_mesh(mesh)` and `nn.logical_axis_rules(rules)` the cache and activations are
  sharded by the same logical rules as training.
  """
  check_sampling(max_new_tokens, temperature, top_k, top_p)
  tokens_BxT, lengths_B = pad_prompts(prompt_tokens, pad_id)
  real = tokens_BxT[np.arange(tokens_BxT.shape[1]) < lengths_B[:, None]]  # Not the padding.
  if real.size and not 0 <= real.min() <= real.max() < config.vocab_size:
    raise ValueError(
      f"Prompt token ids span {real.min()}..{real.max()}, outside the model's "
      f"vocabulary of {config.vocab_size}; encode with the model's own tokenizer."
    )
  t = tokens_BxT.shape[1]
  if t + max_new_tokens > config.max_seq_len:
    raise ValueError(
      f"Prompt ({t}) + max_new_tokens ({max_new_tokens}) exceeds model.max_seq_len="
      f"{config.max_seq_len}; shorten the prompt or generate fewer tokens."
    )
  if max_new_tokens == 0:
    return jnp.asarray(tokens_BxT)
  params = nn.unbox(params)
  if set(params) == {"params"}:
    params = params["params"]
  eos_ids = () if eos_id is None else tuple(np.atleast_1d(eos_id).astype(int).tolist())
  return _generate(
    config.replace(max_seq_len=t + max_new_tokens),  # The cache holds exactly what is needed.
    params,
    jnp.asarray(tokens_BxT),
    jnp.asarray(lengths_B),
    jax.random.key(0) if rng is None else rng,
    max_new_tokens=max_new_tokens,
    greedy=temperature == 0,
    temperature=jnp.float32(temperature if temperature else 1.0),
    top_k=jnp.int32(top_k),
    top_p=jnp.float32(top_p),
    eos_ids=eos_ids,
    pad_id=int(pad_id),
    unroll=_unroll_layers(config),
  )


def check_sampling(max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
  """One ValueError for generation settings that cannot work."""
  if max_new_tokens < 0:
    raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}.")
  if not (temperature >= 0 and 0 < top_p <= 1 and top_k >= 0):  # NaNs fail too.
    raise ValueError(
      f"Need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}."
    )


def sample_text(
  config: ModelConfig,
  params: Any,
  tokenizer: Tokenizer,
  prompt: str,
  *,
  max_new_tokens: int,
  temperature: float = 0.0,
  top_k: int = 0,
  top_p: float = 1.0,
  seed: int = 0,
  stop_ids: Sequence[int] = (),
) -> str:
  """The prompt and its continuation as text, ended at EOS or the model's max_seq_len.

  The prompt starts with BOS, as every training document does, and special-token text in it
  (an instruct model's '<|start_header_id|>') is read as those tokens. `stop_ids` end the text
  too, besides the tokenizer's EOS (e.g. an instruct model's <|eot_id|>).
  """
  prompt_ids = tokenizer.encode_prompt(prompt)
  if len(prompt_ids) >= config.max_seq_len:
    raise ValueError(
      f"The prompt is {len(prompt_ids)} tokens (with BOS) but the model's max_seq_len is "
      f"{config.max_seq_len}; shorten the prompt."
    )
  max_new_tokens = min(max_new_tokens, config.max_seq_len - len(prompt_ids))
  stops = list(dict.fromkeys((tokenizer.eos_id, *(int(i) for i in stop_ids))))
  tokens = generate(
    config,
    params,
    [prompt_ids],
    max_new_tokens=max_new_tokens,
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
    eos_id=stops,
    pad_id=tokenizer.eos_id,
    rng=jax.random.key(seed),
  )
  new_ids = np.asarray(tokens[0, len(prompt_ids) :]).tolist()
  end = next((i for i, t in enumerate(new_ids) if t in stops), len(new_ids))
  return tokenizer.decode(prompt_ids + new_ids[:end])
