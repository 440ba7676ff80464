"""Turns packed rows into the global, sharded training batch, reading only this host's rows."""

from __future__ import annotations

import math
import signal
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from data.workers import exit_with_parent

BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")


def as_axes(axes: Any) -> tuple[str, ...]:
  """A sharding rule's mesh axes (one name, a sequence of names, or None) as a tuple."""
  return (axes,) if isinstance(axes, str) else tuple(axes or ())


def rule_axes(rules: Sequence[tuple[str, Any]], name: str) -> tuple[str, ...] | None:
  """The mesh axes of logical axis `name` in `rules` (config.sharding_rules), or None if the
  rules do not name it."""
  for rule, axes in rules:
    if rule == name:
      return as_axes(axes)
  return None


def batch_axes(rules: Sequence[tuple[str, Any]]) -> tuple[str, ...]:
  """The mesh axes that batch rows split over: the 'batch' entry of `rules`
  (config.sharding_rules; ('data', 'fsdp') in configs/base.py)."""
  axes = rule_axes(rules, "batch")
  if axes is None:
    raise ValueError(
      "sharding_rules has no 'batch' entry (the mesh axes that batch rows split over); add "
      "('batch', ('data', 'fsdp'))."
    )
  return axes


def batch_shards(rules: Sequence[tuple[str, Any]], mesh_shape: Mapping[str, int]) -> int:
  """Into how many parts the 'batch' rule splits the rows over a mesh of `mesh_shape`."""
  return math.prod(mesh_shape[a] for a in batch_axes(rules))


def batch_sharding(mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> NamedSharding:
  """Batch rows split over the 'batch' rule's mesh axes, replicated over the others; sequence
  unsplit."""
  return NamedSharding(mesh, PartitionSpec(batch_axes(rules) or None, None))


def rows_to_example(
  tokens: np.ndarray, segment_ids: np.ndarray, positions: np.ndarray
) -> dict[str, np.ndarray]:
  """Packed rows [n, T+1] -> model inputs and shifted targets [n, T].

  A target counts in the loss only when it continues the same (non-padding) document.
  """
  seg_in, seg_out = segment_ids[:, :-1], segment_ids[:, 1:]
  return {
    "inputs": tokens[:, :-1].astype(np.int32),
    "targets": tokens[:, 1:].astype(np.int32),
    "positions": positions[:, :-1].astype(np.int32),
    "segment_ids": seg_in.astype(np.int32),
    "loss_mask": ((seg_in == seg_out) & (seg_out != 0)).astype(np.float32),
  }


def host_rows(sharding: NamedSharding, global_batch: int, seq_len: int) -> np.ndarray:
  """Sorted global row indices that this host's devices hold (any mesh layout)."""
  index_map = sharding.addressable_devices_indices_map((global_batch, seq_len))
  rows = set()
  for idx in index_map.values():
    rows.update(range(*idx[0].indices(global_batch)))
  return np.array(sorted(rows), dtype=np.int64)


def assemble(
  sharding: NamedSharding,
  global_batch: int,
  seq_len: int,
  local_rows: np.ndarray,
  examples: dict[str, np.ndarray],
) -> dict[str, jax.Array]:
  """Global arrays from this host's examples (`examples[k][i]` is global row `local_rows[i]`)."""
  shape = (global_batch, seq_len)
  index_map = sharding.addressable_devices_indices_map(shape)
  where = {int(r): i for i, r in enumerate(local_rows)}
  out = {}
  for key, value in examples.items():
    per_device = []
    for device, idx in index_map.items():
      sel = [where[r] for r in range(*idx[0].indices(global_batch))]
      per_device.append(jax.device_put(value[sel][:, idx[1]], device))
    out[key] = jax.make_array_from_single_device_arrays(shape, sharding, per_device)
  return out


def make_batch(
  sharding: NamedSharding,
  global_batch: int,
  seq_len: int,
  read_rows: Callable[[np.ndarray], dict[str, np.ndarray]],
) -> dict[str, jax.Array]:
  """One global batch; `read_rows(global_row_indices)` returns examples for just those rows."""
  local = host_rows(sharding, global_batch, seq_len)
  return assemble(sharding, global_batch, seq_len, local, read_rows(local))


def on_every_host(ok: bool) -> bool:
  """Whether `ok` holds on every process, so that all take the same branch before a collective."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils

  return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


def gather_json(value: object) -> list:
  """`value` (JSON-able) of every process, in process order; every process gets the list."""
  import json

  if jax.process_count() == 1:
    return [value]
  from jax.experimental import multihost_utils

  payload = np.frombuffer(json.dumps(value).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.array([payload.size]))).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[: payload.size] = payload
  everyone = np.asarray(multihost_utils.process_allgather(padded))
  return [json.loads(bytes(everyone[i, : sizes[i]])) for i in range(len(sizes))]


def init_worker(worker_index: int = 0, worker_count: int = 0, *, parent: int) -> None:
  """grain worker start-up, bound to the trainer's pid `parent` (functools.partial). A
  terminal's Ctrl-C reaches every process of the group, and the trainer, not its data workers,
  decides what it does (save, then stop them); a trainer that dies without stopping them
  (SIGKILL, the OOM killer, its own watchdog), even while they start, takes them along."""
  del worker_index, worker_count
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  threading.Thread(target=exit_with_parent, args=(parent,), daemon=True).start()
