"""Cloud TPU accelerator names (v5p-256, v6e-256, ...) -> compile-only devices for AOT planning.

Names count as the cloud does: v4-N and v5p-N count TensorCores (N/2 megacore chips, one JAX
device each); v5e-N and v6e-N count chips (one core each).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

from trainer import flops, tpu_flags

# Physical chip grid per slice size; v4 and v5p are 3-D tori, v5e and v6e 2-D.
_CUBE_SHAPES = {
  4: "2x2x1",
  8: "2x2x2",
  16: "2x2x4",
  32: "2x4x4",
  64: "4x4x4",
  128: "4x4x8",
  256: "4x8x8",
  512: "8x8x8",
  1024: "8x8x16",
  2048: "8x16x16",
}
_GRID_SHAPES = {
  1: "1x1",
  4: "2x2",
  8: "2x4",
  16: "4x4",
  32: "4x8",
  64: "8x8",
  128: "8x16",
  256: "16x16",
}
_GENERATIONS = {"v4": True, "v5p": True, "v5e": False, "v6e": False}  # name -> megacore


class TopologyError(ValueError):
  """An accelerator name that names no known TPU slice."""


@dataclasses.dataclass(frozen=True)
class Topology:
  """One TPU slice shape and its per-chip numbers."""

  name: str  # Cloud accelerator type, e.g. 'v5p-256'.
  generation: str  # 'v4' | 'v5p' | 'v5e' | 'v6e'.
  chips: int  # Chips per slice; also JAX devices per slice (megacore: one device per chip).
  topology_name: str  # libtpu's name, e.g. 'v5p:4x4x8'.
  chip_config_name: str  # 'megacore' (v4, v5p) or 'default'.
  chips_per_host_bounds: tuple[int, int, int]

  @property
  def peak_flops(self) -> float:
    """Dense bf16 FLOP/s of one chip (= one JAX device)."""
    return dict(flops.PEAK_FLOPS)[self.generation]

  @property
  def hbm_bytes(self) -> int:
    """HBM per chip that a program may use."""
    return flops.HBM_BYTES[self.generation]

  @property
  def hbm_bandwidth(self) -> float:
    """HBM bytes/s per chip."""
    return flops.HBM_BANDWIDTH[self.generation]

  @property
  def ici_bandwidth(self) -> float:
    """ICI bytes/s per chip, all links both ways."""
    return flops.ICI_BANDWIDTH[self.generation]


def valid_names() -> list[str]:
  """Every accelerator name this planner knows."""
  names = []
  for gen, megacore in _GENERATIONS.items():
    if megacore:
      names += [f"{gen}-{2 * chips}" for chips in _CUBE_SHAPES]
    else:
      names += [f"{gen}-{chips}" for chips in _GRID_SHAPES]
  return names


def parse(name: str) -> Topology:
  """The Topology for a cloud accelerator name; raises TopologyError listing valid names."""
  norm = name.strip().lower().replace("v5litepod", "v5e")
  m = re.fullmatch(r"(v4|v5p|v5e|v6e)-(\d+)", norm)
  if m is None or norm not in valid_names():
    raise TopologyError(f"Unknown TPU topology {name!r}; use one of: {', '.join(valid_names())}.")
  gen, count = m.group(1), int(m.group(2))
  if _GENERATIONS[gen]:
    chips = count // 2
    shape, config = _CUBE_SHAPES[chips], "megacore"
    bounds = (2, 2, 1)
  else:
    chips = count
    shape, config = _GRID_SHAPES[chips], "default"
    # Slices of up to 8 chips are one host; larger ones have 4 chips per host.
    bounds = {1: (1, 1, 1), 4: (2, 2, 1), 8: (2, 4, 1)}.get(chips, (2, 2, 1))
  return Topology(
    name=f"{gen}-{count}",
    generation=gen,
    chips=chips,
    topology_name=f"{gen}:{shape}",
    chip_config_name=config,
    chips_per_host_bounds=bounds,
  )


def devices(topology: Topology, num_slices: int = 1) -> list[Any]:
  """Compile-only TPU devices of `num_slices` such slices, made on this (CPU) machine by libtpu."""
  # Planning drives no chips, so it may load libtpu beside a process that holds its lockfile.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  tpu_flags.init_args()  # Compile with the flags the run will have: they change memory and cost.
  from jax.experimental import topologies  # noqa: PLC0415 - loads libtpu; only when planning.

  try:
    desc = topologies.get_topology_desc(
      platform="tpu",
      topology_name=topology.topology_name,
      chip_config_name=topology.chip_config_name,
      chips_per_host_bounds=topology.chips_per_host_bounds,
      num_slices=num_slices,
    )
  except Exception as e:  # libtpu missing or refusing: one clear sentence, not its traceback.
    raise TopologyError(
      f"Could not make the {topology.name} topology ({topology.topology_name}) with libtpu: "
      f"{str(e).splitlines()[0] if str(e) else type(e).__name__}; install it with "
      "`pip install 'jax[tpu]'`."
    ) from e
  return list(desc.devices)
