"""Llama 3.2 3B (3,212,749,824 parameters; tied embeddings).

python -m launch.plan --config=configs/llama3_2_3b.py --topology=v5e-16
"""

from configs import base


def get_config():
  """Llama 3.2 3B: tied embeddings, 28 layers, RoPE scaling factor 32."""
  c = base.get_config()
  c.model.embed_dim = 3072
  c.model.mlp_dim = 8192
  c.model.num_layers = 28
  c.model.num_heads = 24
  c.model.tie_embeddings = True
  c.model.rope_scaling.factor = 32.0
  c.mesh.data, c.mesh.fsdp = 1, -1
  return c
