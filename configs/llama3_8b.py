"""Llama 3.1 8B (8,030,261,248 parameters).

python -m launch.plan --config=configs/llama3_8b.py --topology=v6e-256
"""

from configs import base


def get_config():
  c = base.get_config()
  c.mesh.data, c.mesh.fsdp = 1, -1
  return c
