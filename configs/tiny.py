"""A tiny LLaMA that learns on CPU in minutes from the Python standard library's source files.

make train   # = python -m trainer.train --config=configs/tiny.py --workdir=runs/tiny
Measured: train loss 8.2 -> 4.5 and eval loss 3.7 after 240 steps, 7 minutes on a busy 2-core CPU.
"""

from configs import base


def get_config():
  """The `make train` demo: a tiny model on the offline stdlib corpus, on CPU."""
  c = base.get_config()
  c.steps = 240
  c.global_batch_size = 8
  c.seq_len = 256
  c.eval_every = 80
  c.eval_steps = 4
  c.checkpoint_every = 80
  c.watchdog_timeout_s = 600.0
  c.sample_every = 80
  c.sample_prompt = "def "
  c.sample_max_new_tokens = 48
  c.loss_chunk_size = 256
  c.optimizer.learning_rate = 3e-3
  c.optimizer.warmup_steps = 20
  c.optimizer.weight_decay = 0.01
  c.data.source = "stdlib"
  c.data.tokenizer = "bpe:4096"
  m = c.model
  m.vocab_size = 4096
  m.embed_dim = 256
  m.mlp_dim = 768
  m.num_layers = 4
  m.num_heads = 8
  m.num_kv_heads = 2
  m.head_dim = 32
  m.max_seq_len = 1024
  m.rope_scaling = None
  m.rope_theta = 10000.0
  m.dtype = "float32"
  m.remat = "none"
  m.attention = "xla"
  return c
