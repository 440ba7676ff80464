"""The grain loader over prepared rows: step s's global batch is a pure function of (seed, s).

Row r of step s is record `shuffle_seed(s * global_batch + r)` of the prepared dir, where the
shuffle is grain's index shuffle (a bijection per epoch, reseeded each epoch; no permutation is
ever held in memory). Each host reads only the rows its own devices hold, so the data state is
the step number and resume is exact on any host count or mesh. A run resumed with another
global batch size moves the origin: from its resume step on, step s starts at sample
`origin_sample + (s - origin_step) * global_batch` (see `PreparedPipeline.state`).
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Iterator
from typing import Any

import grain
import jax
import numpy as np
from absl import flags
from jax.sharding import NamedSharding

from data.batching import assemble, host_rows, init_worker, rows_to_example
from data.packing import decode_row
from data.tokenizers import read_json, tokenizer_from_prepared


def read_metadata(path: str) -> dict[str, Any]:
  """metadata.json of a prepared dir, with a clear error when it is not one."""
  meta_path = os.path.join(path, "metadata.json")
  if not os.path.exists(meta_path):
    raise FileNotFoundError(
      f"{path!r} is not a prepared dataset (no metadata.json); create it with "
      f"`python -m data.prepare --input=... --output={path}` or set data.path."
    )
  keys = ("seq_len", "row_len", "dtypes", "num_rows", "num_eval_rows", "train_files")
  keys += ("eval_files", "tokenizer", "fingerprint")
  fix = f"prepare it again (python -m data.prepare --input=... --output={path} --overwrite)"
  return read_json(meta_path, keys, fix)


def _shuffle_seed(seed: int) -> int:
  return int(seed) % 2**32  # grain's index shuffle takes a 32-bit seed.


def record_indices(
  seed: int, step: int, rows: np.ndarray, global_batch: int, num_records: int
) -> np.ndarray:
  """The records that global rows `rows` of `step` read: the pure (seed, step) -> data map of a
  run that never changed its batch size."""
  order = grain.MapDataset.range(num_records).shuffle(_shuffle_seed(seed))
  return np.array([order[step * global_batch + int(r)] for r in rows], np.int64)


class _StepRows(grain.MapDataset):
  """Element j is global row `rows[j % n]` of step `j // n`: one host's rows, step after step.

  Step `origin_step` starts at sample `origin_sample` of the shuffled stream, and each step
  takes `global_batch` samples.
  """

  def __init__(
    self, parent: grain.MapDataset, rows: np.ndarray, global_batch: int, origin: tuple[int, int]
  ):
    super().__init__(parent)
    self._rows, self._global_batch = [int(r) for r in rows], global_batch
    self._origin_step, self._origin_sample = origin

  def __len__(self) -> int:
    return sys.maxsize

  def _index(self, j: int) -> int:
    step, k = divmod(j, len(self._rows))
    return self._origin_sample + (step - self._origin_step) * self._global_batch + self._rows[k]

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self._index(index)]

  def _getitems(self, indices):
    return self._parent._getitems([self._index(j) for j in indices])

  def __str__(self) -> str:
    return "_StepRows"


def _stack(rows: list[tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
  return tuple(np.stack(parts) for parts in zip(*rows))


def _to_example(batch: tuple[np.ndarray, ...]) -> dict[str, np.ndarray]:
  return rows_to_example(*batch)


def rows_dataset(path: str, meta: dict[str, Any], split: str) -> grain.MapDataset:
  """Decoded rows (tokens, segment_ids, positions) of one split of a prepared dir."""
  files = meta[f"{split}_files"]
  source = grain.sources.ArrayRecordDataSource([os.path.join(path, f) for f in files])
  decode = functools.partial(decode_row, row_len=meta["row_len"], dtypes=meta["dtypes"])
  return grain.MapDataset.source(source).map(decode)


class PreparedPipeline:
  """Train and eval batches from a `data.prepare` dir; the data state is the step number (and,
  after a batch-size change, the sample that its resume step started at).

  Step s reads samples s * global_batch onwards of the shuffled, repeated rows. A run resumed
  with another global_batch_size continues from the sample where the saved run stopped, not
  from s * the new batch: `state()` holds the (step, sample) origin that makes this so.
  """

  def __init__(
    self,
    path: str,
    *,
    seed: int,
    global_batch: int,
    seq_len: int,
    sharding: NamedSharding,
    eval_steps: int = 1,
    eval_path: str = "",
    num_workers: int = 0,
    prefetch: int = 2,
  ):
    self.meta = read_metadata(path)
    if self.meta["seq_len"] != seq_len:
      raise ValueError(
        f"{path} was prepared with seq_len={self.meta['seq_len']} but config.seq_len={seq_len}; "
        f"set --config.seq_len={self.meta['seq_len']} or prepare again with --seq_len={seq_len}."
      )
    if self.meta["num_rows"] == 0:
      raise ValueError(f"{path} has no training rows; prepare it from a larger corpus.")
    if self.meta["num_rows"] < global_batch:
      print(
        f"warning: {path} has {self.meta['num_rows']} training rows, fewer than one batch of "
        f"{global_batch}; every batch repeats rows.",
        file=sys.stderr,
      )
    self.path, self.seed, self.global_batch, self.seq_len = path, seed, global_batch, seq_len
    self.sharding, self.eval_steps = sharding, eval_steps
    self.num_workers, self.prefetch = num_workers, prefetch
    self.tokenizer = tokenizer_from_prepared(path)
    self.fingerprint = self.meta["fingerprint"]
    self.local_rows = host_rows(sharding, global_batch, seq_len)
    self._train = rows_dataset(path, self.meta, "train").shuffle(_shuffle_seed(seed)).repeat()
    self._eval_path = eval_path or path
    self._origin = (0, 0)  # Step 0 starts at sample 0; moved when a resume changes the batch.
    self._saved: dict[str, Any] | None = None  # Restored; train_batches applies it.

  def state(self) -> dict[str, Any]:
    """Where the steps sit in the sample stream: the (step, sample) origin and the batch."""
    if self._saved is not None:  # Restored, not yet applied.
      return dict(self._saved)
    return {"origin": list(self._origin), "global_batch": self.global_batch}

  def restore(self, positions: list[dict[str, Any]]) -> None:
    """Takes the saved origin (every host saved the same one); `train_batches` continues from
    the sample the saved run would have read next, whatever this run's batch size."""
    saved = next((p for p in positions if p and "origin" in p), None)
    self._saved = dict(saved) if saved else None

  def first_sample(self, step: int) -> int:
    """The index, in the shuffled repeated stream, of step `step`'s first row."""
    origin_step, origin_sample = self._origin
    return origin_sample + (step - origin_step) * self.global_batch

  def read_rows(self, step: int, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Examples for global rows `rows` of `step`, read synchronously."""
    parts = self._train._getitems([self.first_sample(step) + int(r) for r in rows])
    return rows_to_example(*_stack(parts))

  def host_dataset(self, rows: np.ndarray, start_step: int = 0) -> grain.MapDataset:
    """Element i: this host's examples (global rows `rows`) of step start_step + i."""
    steps = _StepRows(self._train, rows, self.global_batch, self._origin)
    return steps.batch(len(rows), batch_fn=_stack).map(_to_example)[start_step:]

  def train_batches(self, start_step: int) -> Iterator[dict[str, jax.Array]]:
    """Global batches of steps start_step, start_step + 1, ... (forever)."""
    if self._saved is not None:
      (step, sample), batch = self._saved["origin"], int(self._saved["global_batch"])
      self._origin = (start_step, int(sample) + (start_step - int(step)) * batch)
      self._saved = None
      if batch != self.global_batch:
        print(
          f"global_batch_size changed from {batch} to {self.global_batch}: step {start_step} "
          f"continues from sample {self._origin[1]} of the data, where the saved run stopped.",
          file=sys.stderr,
        )
    ds = self.host_dataset(self.local_rows, start_step).to_iter_dataset(
      grain.ReadOptions(num_threads=2, prefetch_buffer_size=max(1, self.prefetch))
    )
    if self.num_workers > 0:
      if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; a library user may
        flags.FLAGS.mark_as_parsed()  # not have parsed any (the trainer's absl.app has).
      ds = ds.mp_prefetch(
        grain.MultiprocessingOptions(
          num_workers=self.num_workers, per_worker_buffer_size=max(1, self.prefetch)
        ),
        worker_init_fn=functools.partial(init_worker, parent=os.getpid()),
      )
    it = iter(ds)
    try:
      for examples in it:
        yield assemble(self.sharding, self.global_batch, self.seq_len, self.local_rows, examples)
    finally:
      close = getattr(it, "close", None)
      if close is not None:
        close()

  def _eval_split(self) -> tuple[dict[str, Any], str]:
    """(metadata, split) of the held-out rows, or a clear error when there are none."""
    meta = read_metadata(self._eval_path)
    split = "eval" if meta["num_eval_rows"] else "train"
    if self._eval_path == self.path and split == "train":
      raise ValueError(
        f"{self.path} has no eval rows; prepare it with --eval_fraction > 0 and more documents, "
        f"set data.eval_path to another prepared dir, or set eval_every=0."
      )
    if meta["seq_len"] != self.seq_len or meta["tokenizer"] != self.meta["tokenizer"]:
      raise ValueError(
        f"data.eval_path={self._eval_path} has another seq_len or tokenizer than {self.path}; "
        f"prepare both with the same --seq_len and --tokenizer."
      )
    return meta, split

  def check_eval(self) -> None:
    """Raises now, not at the first evaluation, when there is no held-out data to evaluate on."""
    meta, split = self._eval_split()
    rows = meta["num_eval_rows" if split == "eval" else "num_rows"]
    if rows < self.eval_steps * self.global_batch:
      print(
        f"warning: the eval data ({self._eval_path}) has {rows} rows, fewer than eval_steps x "
        f"global_batch_size = {self.eval_steps * self.global_batch}; an evaluation repeats rows.",
        file=sys.stderr,
      )

  def eval_batches(self) -> Iterator[dict[str, jax.Array]]:
    """`eval_steps` batches of held-out rows, in order (the same every call)."""
    meta, split = self._eval_split()
    ds = rows_dataset(self._eval_path, meta, split)
    for step in range(self.eval_steps):
      idx = [step * self.global_batch + int(r) for r in self.local_rows]
      examples = rows_to_example(*_stack(ds._getitems(idx)))
      yield assemble(self.sharding, self.global_batch, self.seq_len, self.local_rows, examples)
