"""Streaming pipeline for data too large to prepare: documents -> tokenize -> pack -> batch.

Each host reads its own shard of the documents (hosts holding the same batch rows read the same
shard), tokenizes on the fly, packs with grain's ConcatThenSplit transform and batches its rows.
Unlike the prepared loader the position in the stream is state: `state()` is a JSON-able grain
iterator state that the trainer stores in the checkpoint and hands back through `restore()`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding

from data.batching import assemble, host_rows, init_worker, on_every_host, rows_to_example
from data.catalog import open_hf, open_tfds, with_split
from data.sources import clean_text, example_field, expand_input, iter_file_documents
from data.tokenizers import Tokenizer, load_tokenizer


def shard_of(rows_by_process: dict[int, set[int]], process: int) -> tuple[int, int]:
  """(shard, num_shards): processes holding the same rows share a shard, others never do."""
  groups = sorted({tuple(sorted(rows)) for rows in rows_by_process.values()})
  return groups.index(tuple(sorted(rows_by_process[process]))), len(groups)


def host_shard(sharding: NamedSharding, global_batch: int, seq_len: int) -> tuple[int, int]:
  """This host's document shard, from which rows every process's devices hold."""
  rows: dict[int, set[int]] = {}
  for device, idx in sharding.devices_indices_map((global_batch, seq_len)).items():
    rows.setdefault(device.process_index, set()).update(range(*idx[0].indices(global_batch)))
  return shard_of(rows, jax.process_index())


class FileDocuments(grain.IterDataset):
  """Non-empty documents of local files (text, JSONL, Parquet) for one shard, epoch after epoch.

  Files are dealt to shards round-robin (documents are, when there are fewer files than shards);
  each epoch visits this shard's files in a new order drawn from (seed, epoch).
  """

  def __init__(
    self, files: list[str], text_field: str, shard: int, num_shards: int, seed: int, repeat: bool
  ):
    super().__init__()
    self.by_file = len(files) >= num_shards
    self.files = files[shard::num_shards] if self.by_file else list(files)
    self.text_field, self.shard, self.num_shards = text_field, shard, num_shards
    self.seed, self.repeat = seed, repeat

  def __iter__(self) -> _FileDocumentsIterator:
    return _FileDocumentsIterator(self)

  def __str__(self) -> str:
    return "FileDocuments"


class _FileDocumentsIterator(grain.DatasetIterator):
  """State: (epoch, file position in the epoch's order, documents read from that file)."""

  def __init__(self, ds: FileDocuments):
    super().__init__()
    self._ds = ds
    self._state = {"epoch": 0, "file": 0, "doc": 0}
    self._docs: Iterator[Any] | None = None

  def _order(self, epoch: int) -> np.ndarray:
    if self._ds.seed < 0:
      return np.arange(len(self._ds.files))
    return np.random.default_rng([self._ds.seed, epoch]).permutation(len(self._ds.files))

  def _open(self) -> Iterator[Any]:
    path = self._ds.files[self._order(self._state["epoch"])[self._state["file"]]]
    docs = iter_file_documents(path, self._ds.text_field)
    for _ in range(self._state["doc"]):  # Resuming: skip what was already read.
      next(docs, None)
    return docs

  def __next__(self) -> str:
    ds, st = self._ds, self._state
    epochs_without_docs = 0
    while True:
      if st["file"] == len(ds.files):
        if not ds.repeat or epochs_without_docs:
          raise StopIteration
        st.update(epoch=st["epoch"] + 1, file=0, doc=0)
        epochs_without_docs += 1
      if self._docs is None:
        self._docs = self._open()
      raw = next(self._docs, StopIteration)
      if raw is StopIteration:
        st.update(file=st["file"] + 1, doc=0)
        self._docs = None
        continue
      st["doc"] += 1
      if not ds.by_file and (st["doc"] - 1) % ds.num_shards != ds.shard:
        continue
      text, _ = clean_text(raw)
      if text.strip():
        return text

  def get_state(self) -> dict[str, Any]:
    """The position: a small JSON-able dict."""
    return dict(self._state)

  def set_state(self, state: dict[str, Any]) -> None:
    """Continue from a `get_state()` position (re-reads the open file up to it)."""
    self._state = {k: int(state[k]) for k in ("epoch", "file", "doc")}
    self._docs = None


class _Tokenize:
  """Text -> {'tokens': BOS + ids + EOS}; loads the tokenizer lazily (picklable for workers)."""

  def __init__(self, spec: str):
    self.spec, self._tok = spec, None

  def __call__(self, text: Any) -> dict[str, np.ndarray]:
    if self._tok is None:
      self._tok = load_tokenizer(self.spec)
    tok = self._tok
    return {"tokens": np.asarray(tok.encode(text, bos=True, eos=True), np.int32)}

  def __getstate__(self) -> dict[str, Any]:
    return {"spec": self.spec, "_tok": None}


class _Text:
  """Example -> cleaned text of `field` ('' when empty, filtered out next)."""

  def __init__(self, field: str):
    self.field = field

  def __call__(self, example: Any) -> str:
    return clean_text(example[self.field])[0]


def _non_empty(text: str) -> bool:
  return bool(text.strip())


def _to_example(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return rows_to_example(batch["tokens"], batch["tokens_segment_ids"], batch["tokens_positions"])


class StreamingPipeline:
  """Batches tokenized and packed on the fly from TFDS, HF datasets or local text files."""

  def __init__(
    self,
    source: str,
    path: str,
    *,
    tokenizer: str,
    seed: int,
    global_batch: int,
    seq_len: int,
    sharding: NamedSharding,
    eval_steps: int = 1,
    eval_path: str = "",
    text_field: str = "text",
    data_dir: str = "",
    num_workers: int = 0,
    prefetch: int = 2,
  ):
    if not path:
      raise ValueError(f"data.source={source!r} needs data.path (a dataset name or a file glob).")
    self.source, self.path, self.eval_path = source, path, eval_path
    self.tokenizer: Tokenizer = load_tokenizer(tokenizer)
    self._tok_spec = self.tokenizer.path or "byte"
    self.seed, self.global_batch, self.seq_len = seed, global_batch, seq_len
    self.sharding, self.eval_steps = sharding, eval_steps
    self.text_field, self.data_dir = text_field, data_dir
    self.num_workers, self.prefetch = num_workers, prefetch
    # Worker processes change the shape of grain's saved state; text files are read in-process.
    self._workers = num_workers if source != "text" else 0
    self.local_rows = host_rows(sharding, global_batch, seq_len)
    self.shard, self.num_shards = host_shard(sharding, global_batch, seq_len)
    self.fingerprint = f"{source}:{path}:{self.tokenizer.fingerprint}:{seq_len}"
    if source == "text":  # The saved position indexes the file list: it must not change.
      files = [(f, os.path.getsize(f)) for f in expand_input(path, "data.path")]
      digest = hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]
      self.fingerprint += f":{digest}"
    self._it: Any = None
    self._pending_state: dict[str, Any] | None = None

  def _documents(self, spec: str, *, train: bool) -> grain.IterDataset:
    seed = self.seed if train else -1
    if self.source == "text":
      files = expand_input(spec, "data.path" if spec == self.path else "data.eval_path")
      return FileDocuments(files, self.text_field, self.shard, self.num_shards, seed, repeat=train)
    data = self._open(spec)
    if len(data) == 0:
      raise ValueError(f"{spec!r} is empty; pick another split or dataset.")
    example_field(data[0], self.text_field, spec)  # A wrong data.text_field fails here, once.
    ds = grain.MapDataset.source(data)[self.shard :: self.num_shards]
    if train:
      ds = ds.shuffle(int(seed) % 2**32).repeat()
    ds = ds.map(_Text(self.text_field)).filter(_non_empty)
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=8))

  def _open(self, spec: str) -> Any:
    return open_tfds(spec, self.data_dir) if self.source == "tfds" else open_hf(spec)

  def _batches(self, spec: str, *, train: bool) -> grain.IterDataset:
    ds = self._documents(spec, train=train).map(_Tokenize(self._tok_spec))
    if train and self._workers:
      options = grain.MultiprocessingOptions(num_workers=self._workers)
      ds = ds.mp_prefetch(
        options, worker_init_fn=functools.partial(init_worker, parent=os.getpid())
      )
    row = {"tokens": self.seq_len + 1}
    ds = grain.experimental.ConcatThenSplitIterDataset(ds, length_struct=row)
    return ds.batch(len(self.local_rows), drop_remainder=True).map(_to_example)

  def state(self) -> dict[str, Any]:
    """JSON-able position after the last batch handed out: the grain iterator state, with the
    host shard it belongs to and the rows per batch it was cut for."""
    it = self._pending_state if self._it is None else self._it.get_state()
    if not it:
      return {}
    return {
      "shard": self.shard,
      "num_shards": self.num_shards,
      "rows": len(self.local_rows),
      "workers": self._workers,
      "iterator": _to_json(it),
    }

  def restore(self, positions: list[dict[str, Any]]) -> None:
    """Continue from the positions every process saved (`state()`, in process order), in this
    or the next `train_batches` iterator: this host takes its own shard's."""
    state = own_position(
      positions, self.shard, self.num_shards, len(self.local_rows), self._workers
    )
    self._pending_state = _from_json(state) if state else None
    if self._it is not None and self._pending_state:
      self._it.set_state(self._pending_state)

  def train_batches(self, start_step: int) -> Iterator[dict[str, jax.Array]]:
    """Global batches, continuing from the restored state (the step number alone cannot)."""
    self._it = iter(self._batches(self.path, train=True))
    if self._pending_state:
      self._it.set_state(self._pending_state)
    elif start_step > 0:
      print(
        f"warning: streaming data.source={self.source!r} has no saved iterator state; "
        f"step {start_step} starts from the beginning of the stream",
        file=sys.stderr,
      )
    for examples in self._it:
      yield assemble(self.sharding, self.global_batch, self.seq_len, self.local_rows, examples)
    raise ValueError(
      f"data.path={self.path!r} gave no documents for host shard {self.shard} of "
      f"{self.num_shards}; check the path and data.text_field."
    )

  def check_eval(self) -> None:
    """Raises now, not at the first evaluation, when the held-out data is missing or holds
    fewer than `eval_steps` batches (it reads them once)."""
    for _ in self._eval_examples():
      pass

  def eval_batches(self) -> Iterator[dict[str, jax.Array]]:
    """`eval_steps` batches from the start of the held-out data (the same every call)."""
    for examples in self._eval_examples():
      yield assemble(self.sharding, self.global_batch, self.seq_len, self.local_rows, examples)

  def _eval_examples(self) -> Iterator[dict[str, np.ndarray]]:
    spec = self._eval_spec()
    it = iter(self._batches(spec, train=False))
    for _ in range(self.eval_steps):
      examples = next(it, None)
      # Every host stops together: one host short of data must not leave the rest in a collective.
      if not on_every_host(examples is not None):
        raise ValueError(
          f"The eval data {spec!r} has fewer than eval_steps={self.eval_steps} batches for a "
          f"host's shard ({self.num_shards} shards); lower eval_steps or give data.eval_path "
          f"more data."
        )
      yield examples

  def _eval_spec(self) -> str:
    if self.eval_path:
      return self.eval_path
    if self.source == "text":
      raise ValueError(
        "data.source='text' needs data.eval_path (a glob of held-out files) to evaluate; "
        "set it or set eval_every=0."
      )
    # A dataset's held-out split: the same name with the split replaced.
    for split in ("validation", "test"):
      try:
        spec = with_split(f"{self.source}:{self.path.removeprefix(self.source + ':')}", split)
        self._open(spec)
        return spec
      except (FileNotFoundError, ValueError, KeyError):
        continue
    raise ValueError(f"{self.path!r} has no validation or test split; set data.eval_path.")


def own_position(
  positions: list[dict[str, Any]], shard: int, num_shards: int, rows: int, workers: int = 0
) -> dict[str, Any]:
  """The grain state of host shard `shard` among every process's saved `state()`.

  Processes holding the same batch rows read the same shard and saved the same state, so it is
  found by shard, whichever process now reads it. A different shard count or rows per host
  would continue each host from a place in another shard's stream: that is an error.
  """
  # Prepared data saves its sample origin instead (a switch to streaming with allow_new_data).
  saved = [p for p in positions if p and "origin" not in p]
  if not saved:
    return {}
  if all("shard" in p for p in saved):
    layouts = sorted({(p["num_shards"], p["rows"]) for p in saved})
    if layouts != [(num_shards, rows)]:
      was = " or ".join(f"{n} host shard(s) of {r} rows each" for n, r in layouts)
      raise ValueError(
        f"This run's stream position was saved with each batch read as {was}, and each shard "
        f"has its own place in the stream; this run reads {num_shards} host shard(s) of {rows} "
        "rows each. Resume with the same global_batch_size, hosts and mesh axes across them, or "
        "prepare the data with data.prepare to change them."
      )
    saved_workers = sorted({p.get("workers", workers) for p in saved})
    if saved_workers != [workers]:
      raise ValueError(
        f"This run's stream position was saved with data.num_workers={saved_workers[0]}, and "
        "grain keeps a position in another form with worker processes than without; resume "
        f"with --config.data.num_workers={saved_workers[0]}."
      )
    mine = [p["iterator"] for p in saved if p["shard"] == shard]
    if not mine:
      raise ValueError(
        f"This run's saved stream positions have none for host shard {shard} of {num_shards}; "
        "the checkpoint's data item is incomplete. Resume from an older checkpoint (move this "
        "one aside) or set data.allow_new_data=True to start the stream afresh."
      )
    return mine[0]
  # Saved before positions named their shard: one per process, in process order.
  if len(positions) != jax.process_count():
    raise ValueError(
      f"This run's stream position was saved by {len(positions)} processes, and each reads its "
      f"own shard of the stream; resume it on {len(positions)} processes (this run has "
      f"{jax.process_count()}), or prepare the data with data.prepare to change host counts."
    )
  return positions[jax.process_index()]


def _to_json(tree: Any) -> Any:
  """Grain states hold tuples (which JSON would turn into lists) and numpy scalars."""
  if isinstance(tree, dict):
    return {str(k): _to_json(v) for k, v in tree.items()}
  if isinstance(tree, tuple):
    return {_TUPLE: [_to_json(v) for v in tree]}
  if isinstance(tree, list):
    return [_to_json(v) for v in tree]
  if isinstance(tree, np.generic):
    return tree.item()
  return tree


def _from_json(tree: Any) -> Any:
  """Inverse of `_to_json` (after a JSON round trip)."""
  if isinstance(tree, dict):
    if set(tree) == {_TUPLE}:
      return tuple(_from_json(v) for v in tree[_TUPLE])
    return {k: _from_json(v) for k, v in tree.items()}
  if isinstance(tree, list):
    return [_from_json(v) for v in tree]
  return tree


_TUPLE = "__tuple__"
