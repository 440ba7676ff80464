"""Deterministic random tokens: row r of step s depends only on (seed, s, r). Always offline."""

from __future__ import annotations

from collections.abc import Iterator

import jax
import numpy as np
from jax.sharding import NamedSharding

from data.batching import make_batch, rows_to_example


def synthetic_rows(
  seed: int, step: int, rows: np.ndarray, seq_len: int, vocab_size: int
) -> dict[str, np.ndarray]:
  """Examples for the given global rows of one step; one document per row."""
  tokens = (
    np.stack(
      [
        np.random.default_rng([seed, step, int(r)]).integers(0, vocab_size, seq_len + 1)
        for r in rows
      ]
    )
    if len(rows)
    else np.zeros((0, seq_len + 1), np.int64)
  )
  segment_ids = np.ones_like(tokens)
  positions = np.broadcast_to(np.arange(seq_len + 1), tokens.shape)
  return rows_to_example(tokens, segment_ids, positions)


class SyntheticPipeline:
  """Train and eval batches of random tokens; the data state is just the step number."""

  tokenizer = None
  fingerprint = "synthetic"

  def __init__(
    self,
    *,
    seed: int,
    global_batch: int,
    seq_len: int,
    vocab_size: int,
    sharding: NamedSharding,
    eval_steps: int = 1,
  ):
    self.seed, self.global_batch, self.seq_len = seed, global_batch, seq_len
    self.vocab_size, self.sharding, self.eval_steps = vocab_size, sharding, eval_steps

  def batch(self, step: int, *, seed: int | None = None) -> dict[str, jax.Array]:
    """The global batch of `step`."""
    seed = self.seed if seed is None else seed
    return make_batch(
      self.sharding,
      self.global_batch,
      self.seq_len,
      lambda rows: synthetic_rows(seed, step, rows, self.seq_len, self.vocab_size),
    )

  def state(self) -> dict:
    """Nothing beyond the step number."""
    return {}

  def restore(self, positions: list[dict]) -> None:
    """Nothing to restore (see `state`)."""

  def check_eval(self) -> None:
    """Synthetic eval batches always exist."""

  def train_batches(self, start_step: int) -> Iterator[dict[str, jax.Array]]:
    """Batches of steps start_step, start_step + 1, ..."""
    step = start_step
    while True:
      yield self.batch(step)
      step += 1

  def eval_batches(self) -> Iterator[dict[str, jax.Array]]:
    """`eval_steps` fixed batches."""
    # A different seed stream, so eval rows never coincide with training rows.
    for i in range(self.eval_steps):
      yield self.batch(i, seed=self.seed + 1_000_003)
