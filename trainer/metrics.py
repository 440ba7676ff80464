"""Metric writers: CLU's TensorBoard writer plus a JSON-lines file, on process 0 only."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from clu import metric_writers
from etils import epath


def _plain(value: Any) -> Any:
  value = np.asarray(value).item() if np.ndim(value) == 0 else np.asarray(value).tolist()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


class JsonlWriter(metric_writers.MetricWriter):
  """Appends one JSON object per `write_scalars` call to a file (also on resume).

  Object stores (`gs://`) cannot append, so there the file is rewritten whole at most every
  `remote_flush_s` seconds and on close.
  """

  def __init__(self, path: str, remote_flush_s: float = 30.0, remote: bool | None = None):
    self._path = epath.Path(path)
    self._path.parent.mkdir(parents=True, exist_ok=True)
    text = self._path.read_text() if self._path.exists() else ""
    # A process killed mid-line left half a record; the next one starts on its own line.
    torn = "\n" if text and not text.endswith("\n") else ""
    self._remote = "://" in str(path) if remote is None else remote
    self._remote_flush_s, self._last_flush = remote_flush_s, time.monotonic()
    if self._remote:
      self._lines, self._file = [text + torn], None
    else:
      self._file = self._path.open("a")
      self._file.write(torn)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    line = json.dumps({"step": int(step), **{k: _plain(v) for k, v in scalars.items()}}) + "\n"
    if self._remote:
      self._lines.append(line)
      if time.monotonic() - self._last_flush > self._remote_flush_s:
        self.flush()
    else:
      self._file.write(line)
      self._file.flush()

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    if self._remote:
      self._path.write_text("".join(self._lines))
      self._last_flush = time.monotonic()
    else:
      self._file.flush()

  def close(self):
    self.flush()
    if self._file is not None:
      self._file.close()


def create_writers(workdir: str) -> tuple[metric_writers.MetricWriter, metric_writers.MetricWriter]:
  """(all metrics: TensorBoard + `metrics.jsonl`, TensorBoard only) under `workdir`.

  Hosts other than process 0 only log. The TensorBoard-only writer takes progress counters
  (steps/s, uptime) that would clutter the one-line-per-step JSONL file.
  """
  lead = jax.process_index() == 0
  board = metric_writers.create_default_writer(workdir, just_logging=not lead)
  writers = [board]
  if lead:
    writers.append(JsonlWriter(os.path.join(workdir, "metrics.jsonl")))
  return metric_writers.MultiWriter(writers), board


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """All whole records of a metrics.jsonl file (a line torn by a killed process is skipped)."""
  records = []
  with epath.Path(path).open() as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return records


def truncate_jsonl(path: str, last_step: int) -> int:
  """Drops the records after `last_step` (and torn lines) from a metrics file; returns how many."""
  p = epath.Path(path)
  if not p.exists():
    return 0
  lines = p.read_text().splitlines(keepends=True)
  kept = []
  for line in lines:
    try:
      if int(json.loads(line)["step"]) <= last_step:
        kept.append(line if line.endswith("\n") else line + "\n")
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
      continue
  if len(kept) != len(lines):
    p.write_text("".join(kept))
  return len(lines) - len(kept)


def truncate_events(workdir: str, last_step: int) -> int:
  """Drops the TensorBoard summaries after `last_step` (and a torn last record) from the event
  files in `workdir`; returns how many. A resumed run logs the steps after its checkpoint again,
  and TensorBoard would draw both."""
  import tensorflow as tf  # noqa: PLC0415 - CLU's writer has loaded it already.
  from tensorboard.compat.proto import event_pb2  # noqa: PLC0415

  dropped = 0
  for path in sorted(tf.io.gfile.glob(os.path.join(workdir, "events.out.tfevents.*"))):
    kept, seen = [], 0
    try:
      for record in tf.data.TFRecordDataset(path):
        seen += 1
        raw = record.numpy()
        event = event_pb2.Event.FromString(raw)
        if event.step <= last_step or not event.HasField("summary"):
          kept.append(raw)
    except tf.errors.DataLossError:
      seen += 1  # Torn by a killed process.
    if len(kept) == seen:
      continue
    tmp = os.path.join(workdir, f"truncating-{os.getpid()}.tmp")  # Not a name TensorBoard reads.
    with tf.io.TFRecordWriter(tmp) as w:
      for raw in kept:
        w.write(raw)
    tf.io.gfile.rename(tmp, path, overwrite=True)
    dropped += seen - len(kept)
  return dropped
