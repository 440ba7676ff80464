"""Llama 3.1 405B (405,853,388,800 parameters).

python -m launch.plan --config=configs/llama3_405b.py --topology=v5p-256 --config.mesh.tensor=4
"""

from configs import base


def get_config():
  """Llama 3.1 405B: 126 layers of width 16384."""
  c = base.get_config()
  c.model.embed_dim = 16384
  c.model.mlp_dim = 53248
  c.model.num_layers = 126
  c.model.num_heads = 128
  c.mesh.data, c.mesh.fsdp = 1, -1
  return c
