"""What `launch.plan` suggests trying next: for a plan that does not fit, and for one that does."""

from __future__ import annotations

from typing import Any

from data.batching import batch_shards

# A full-remat plan under this share of HBM is told it could save matmul outputs instead: on
# v5p-256, Llama 3.1 8B at 128 x 2048 tokens took 10.13 GiB with remat=dots, 4.68 with full.
SPARE_HBM_FRACTION = 0.3


def _tensor_split(config: Any, mesh_shape: dict[str, int], devices_per_host: int) -> int:
  """The largest tensor split up to 4 within a host that divides the devices and the heads."""
  devices = mesh_shape["data"] * mesh_shape["fsdp"] * mesh_shape["tensor"]
  heads = (config.model.num_heads, config.model.num_kv_heads)
  for t in (4, 2):
    if t <= devices_per_host and devices % t == 0 and all(h % t == 0 for h in heads):
      return t
  return 1


def advice(config: Any, mesh_shape: dict[str, int], devices_per_host: int) -> list[str]:
  """What would make a plan that does not fit fit, most effective first."""
  tips = []
  if config.model.remat != "full":
    tips.append("recompute activations: --config.model.remat=full")
  if mesh_shape["data"] > 1 or mesh_shape["tensor"] > 1:
    tips.append(
      "shard parameters and optimizer state over more devices: --config.mesh.data=1 "
      "--config.mesh.fsdp=-1 (or keep tensor parallelism within a host)"
    )
  per_device = config.global_batch_size // batch_shards(config.sharding_rules, mesh_shape)
  if per_device > 1:
    tips.append(
      f"smaller microbatches: --config.grad_accum_steps={2 * config.grad_accum_steps} (same "
      f"global batch) or --config.global_batch_size={config.global_batch_size // 2}"
    )
  tensor = _tensor_split(config, mesh_shape, devices_per_host)
  if mesh_shape["tensor"] == 1 and tensor > 1:
    tips.append(f"split activations over heads too: --config.mesh.tensor={tensor} (within a host)")
  if int(config.loss_chunk_size) == 0:
    tips.append("chunk the loss: --config.loss_chunk_size=512")
  tips.append("a larger topology or more slices (--slices=N)")
  return tips


def hints(config: Any, peak_bytes: int, hbm_bytes: int) -> list[str]:
  """What may make a plan that fits faster; each is worth its own plan (`--search` tries them)."""
  tips = []
  if config.model.remat == "full" and peak_bytes < SPARE_HBM_FRACTION * hbm_bytes:
    tips.append(
      f"HBM to spare ({peak_bytes / 2**30:.1f} of {hbm_bytes / 2**30:.4g} GiB): "
      "--config.model.remat=dots saves the matmul outputs instead of recomputing them (Llama "
      "3.1 8B on v5p-256, 128 x 2048 tokens, --full_depth_cost: 0.337 s at 10.1 GiB, against "
      "0.381 s at 4.7 GiB)"
    )
  return tips
