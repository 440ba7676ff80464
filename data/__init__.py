"""Input pipelines: tokenizers, corpus preparation, and per-host sharded batches."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # Tokenizer worker processes import data.* and must not pay for JAX.
  from jax.sharding import Mesh


def create_pipeline(config: Any, mesh: Mesh) -> Any:
  """The pipeline `config.data.source` names, yielding global batches sharded on `mesh`.

  Every pipeline has `tokenizer` (None for synthetic), `fingerprint` (str),
  `train_batches(start_step)` (an iterator of dicts of global arrays [B, T]: inputs, targets,
  positions, segment_ids, loss_mask), `eval_batches()`, `check_eval()` (raises when there is
  nothing to evaluate on; run here when `eval_every` > 0, so that a run fails before it trains),
  and `state()` / `restore(state)` (a JSON-able iterator position; empty where the step number
  alone fixes the data).
  """
  pipeline = _create(config, mesh)
  if config.eval_every > 0:
    pipeline.check_eval()
  return pipeline


def _create(config: Any, mesh: Mesh) -> Any:
  from data.batching import batch_sharding

  source = config.data.source
  sharding = batch_sharding(mesh, config.sharding_rules)
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
  d = config.data
  common = dict(
    seed=config.seed,
    global_batch=config.global_batch_size,
    seq_len=config.seq_len,
    sharding=sharding,
    eval_steps=config.eval_steps,
    eval_path=d.eval_path,
    num_workers=d.num_workers,
    prefetch=d.prefetch,
  )
  if source in ("prepared", "stdlib"):
    from data.loader import PreparedPipeline

    if source == "stdlib":
      from data.stdlib import ensure_stdlib_prepared

      path = ensure_stdlib_prepared(d.cache_dir, tokenizer=d.tokenizer, seq_len=config.seq_len)
    elif not d.path:
      raise ValueError(
        "data.source='prepared' needs data.path: a dir written by `python -m data.prepare`."
      )
    else:
      path = d.path
    pipeline = PreparedPipeline(path, **common)
    if source == "prepared" and d.tokenizer != "byte":  # 'byte' is also the unset default.
      from data.tokenizers import load_tokenizer

      tok = pipeline.tokenizer
      if d.tokenizer.startswith("bpe:"):  # A BPE to train (stdlib's); a small corpus may end
        same = tok.kind == "hf"  # up with fewer ids than asked for.
      else:
        same = load_tokenizer(d.tokenizer).fingerprint == tok.fingerprint
      if not same:
        raise ValueError(
          f"data.tokenizer={d.tokenizer!r} is not the tokenizer {path} was prepared with "
          f"({tok.kind}, {tok.vocab_size} ids); prepared data brings its own, so set "
          "--config.data.tokenizer=byte (the default, which defers to it) or prepare the data "
          "again with that tokenizer."
        )
    return pipeline
  if source in ("tfds", "hf", "text"):
    from data.streaming import StreamingPipeline

    return StreamingPipeline(
      source, d.path, tokenizer=d.tokenizer, text_field=d.text_field, data_dir=d.data_dir, **common
    )
  raise ValueError(
    f"data.source={source!r} is unknown; use synthetic, prepared, stdlib, tfds, hf or text."
  )
