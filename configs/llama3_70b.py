"""Llama 3.1 70B (70,553,706,496 parameters).

python -m launch.plan --config=configs/llama3_70b.py --topology=v5p-256
"""

from configs import base


def get_config():
  """Llama 3.1 70B: 80 layers of width 8192."""
  c = base.get_config()
  c.model.embed_dim = 8192
  c.model.mlp_dim = 28672
  c.model.num_layers = 80
  c.model.num_heads = 64
  c.mesh.data, c.mesh.fsdp = 1, -1
  return c
