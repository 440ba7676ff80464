"""Llama 3.2 1B (1,235,814,400 parameters; tied embeddings).

python -m trainer.benchmark --config=configs/llama3_2_1b.py --config.seq_len=4096
"""

from configs import base


def get_config():
  """Llama 3.2 1B: tied embeddings, 16 layers, RoPE scaling factor 32."""
  c = base.get_config()
  c.model.embed_dim = 2048
  c.model.mlp_dim = 8192
  c.model.num_layers = 16
  c.model.head_dim = 64
  c.model.tie_embeddings = True
  c.model.rope_scaling.factor = 32.0
  c.mesh.data, c.mesh.fsdp = 1, -1
  return c
