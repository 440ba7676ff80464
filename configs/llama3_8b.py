"""Llama 3.1 8B (8,030,261,248 parameters).

python -m launch.plan --config=configs/llama3_8b.py --topology=v6e-256

Full remat fits everywhere. With HBM to spare, save the matmul outputs instead: on v5p-256 at
128 x 2048 tokens, `--config.model.remat=dots` planned at 0.337 s per step and 10.1 GiB per chip,
against 0.381 s and 4.7 GiB with full remat. Full remat with `--config.mesh.data=2
--config.mesh.fsdp=64` planned at 0.388 s and 5.0 GiB with the trainer's libtpu flags, 0.358 s
and 4.0 GiB without them (see docs/tpu.md).
"""

from configs import base


def get_config():
  """Llama 3.1 8B (the base shapes), FSDP over every device."""
  c = base.get_config()
  c.mesh.data, c.mesh.fsdp = 1, -1
  return c
