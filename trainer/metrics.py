"""Metric writers: CLU's TensorBoard writer plus a JSON-lines file, on process 0 only."""

from __future__ import annotations

import json
import math
import os
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
  """Appends one JSON object per `write_scalars` call to a file (also on resume)."""

  def __init__(self, path: str):
    self._path = epath.Path(path)
    self._path.parent.mkdir(parents=True, exist_ok=True)
    text = self._path.read_text() if self._path.exists() else ""
    self._file = self._path.open("a")
    if text and not text.endswith("\n"):
      # A process killed mid-line left half a record; the next one starts on its own line.
      self._file.write("\n")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    self._file.write(
      json.dumps({"step": int(step), **{k: _plain(v) for k, v in scalars.items()}}) + "\n"
    )
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
    self._file.flush()

  def close(self):
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
  """All records of a metrics.jsonl file."""
  with epath.Path(path).open() as f:
    return [json.loads(line) for line in f if line.strip()]
