"""Input pipelines: tokenizers, corpus preparation, and per-host sharded batches."""

from __future__ import annotations

from typing import Any

from jax.sharding import Mesh

from data.batching import batch_sharding


def create_pipeline(config: Any, mesh: Mesh) -> Any:
  """The pipeline `config.data.source` names, yielding global batches sharded on `mesh`.

  Every pipeline has `tokenizer` (None for synthetic), `fingerprint` (str),
  `train_batches(start_step)` (an iterator of dicts of global arrays [B, T]: inputs, targets,
  positions, segment_ids, loss_mask) and `eval_batches()`.
  """
  source = config.data.source
  sharding = batch_sharding(mesh)
  if source == "synthetic":
    from data.synthetic import SyntheticPipeline

    return SyntheticPipeline(
      seed=config.seed,
      global_batch=config.global_batch_size,
      seq_len=config.seq_len,
      vocab_size=config.model.vocab_size,
      sharding=sharding,
      eval_steps=config.eval_steps,
    )
  raise ValueError(f"data.source={source!r} is not available yet; use 'synthetic'.")
