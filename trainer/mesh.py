"""The ('data', 'fsdp', 'tensor') device mesh, single- or multi-slice, and its context."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

MESH_AXES = ("data", "fsdp", "tensor")


class MeshError(ValueError):
  """A mesh shape that cannot be laid over the available devices."""


def resolve_shape(sizes: Sequence[int], total: int, what: str) -> tuple[int, ...]:
  """Fills a single -1 so the product equals `total`; raises MeshError naming both otherwise."""
  sizes = [int(s) for s in sizes]
  names = ", ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes))
  if sizes.count(-1) > 1:
    raise MeshError(f"{what} ({names}) has more than one -1; let at most one axis fill the rest.")
  if any(s == 0 or s < -1 for s in sizes):
    raise MeshError(f"{what} ({names}) has a size that is not positive or -1.")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if total % known:
      raise MeshError(
        f"{what} ({names}) does not divide the {total} devices; choose sizes "
        f"whose product divides {total}."
      )
    sizes[sizes.index(-1)] = total // known
  if math.prod(sizes) != total:
    raise MeshError(
      f"{what} ({names}) needs {math.prod(sizes)} devices but {total} are "
      f"available; set the sizes so their product is {total} (or use -1 for one)."
    )
  return tuple(sizes)


def create_mesh(mesh_config: Any, devices: Sequence[Any] | None = None) -> Mesh:
  """A Mesh with axes ('data', 'fsdp', 'tensor') from `config.mesh`.

  Within a slice the devices are ordered by `create_device_mesh` (ICI-aware on TPU); with
  `num_slices > 1` the DCN sizes split the slices (`create_hybrid_device_mesh`).
  """
  devices = list(jax.devices() if devices is None else devices)
  num_slices = int(mesh_config.num_slices)
  if num_slices < 1 or len(devices) % num_slices:
    raise MeshError(
      f"mesh.num_slices={num_slices} does not divide the {len(devices)} devices; set it to the "
      "number of TPU slices the run has (1 for one slice, GPU or CPU)."
    )
  if num_slices > 1 and not all(hasattr(d, "slice_index") for d in devices):
    raise MeshError(
      f"mesh.num_slices={num_slices} needs TPU slices joined over DCN, and {devices[0].platform} "
      "devices have none; set mesh.num_slices=1 (launch.plan --slices plans multi-slice runs)."
    )
  per_slice = len(devices) // num_slices
  ici = resolve_shape(
    (mesh_config.data, mesh_config.fsdp, mesh_config.tensor),
    per_slice,
    "mesh (data, fsdp, tensor)" + (" per slice" if num_slices > 1 else ""),
  )
  if num_slices == 1:
    try:
      grid = mesh_utils.create_device_mesh(ici, devices=devices, allow_split_physical_axes=True)
    except (AssertionError, NotImplementedError, ValueError):
      # Fake CPU devices and odd topologies have no physical layout to respect.
      grid = np.asarray(devices).reshape(ici)
    return Mesh(grid, MESH_AXES)
  dcn_data = num_slices if int(mesh_config.dcn_data) == -1 else mesh_config.dcn_data
  dcn = resolve_shape(
    (dcn_data, mesh_config.dcn_fsdp, mesh_config.dcn_tensor),
    num_slices,
    "mesh DCN sizes (dcn_data, dcn_fsdp, dcn_tensor)",
  )
  grid = mesh_utils.create_hybrid_device_mesh(
    ici, dcn, devices=devices, allow_split_physical_axes=True
  )
  return Mesh(grid, MESH_AXES)


def mesh_context(mesh: Mesh) -> contextlib.AbstractContextManager:
  """Makes `mesh` the ambient mesh (needed by logical sharding constraints while tracing)."""
  if hasattr(jax, "set_mesh"):
    return jax.set_mesh(mesh)
  return mesh
