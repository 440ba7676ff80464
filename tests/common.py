"""Shared test helpers: a tiny run config and a quick model config."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import ml_collections

from configs import base
from model import ModelConfig
from trainer.metrics import read_jsonl

# A two-layer GQA model for model-level tests (fp32 by default, XLA attention everywhere).
TINY_MODEL = ModelConfig(
  vocab_size=128,
  embed_dim=64,
  mlp_dim=128,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  head_dim=16,
  rope_theta=10000.0,
  max_seq_len=64,
  attention="xla",
)


def write_tiktoken(path, extra_tokens) -> str:
  """A tiktoken-format file: the 256 bytes, then `extra_tokens`, one 'base64 rank' per line."""
  tokens = [bytes([b]) for b in range(256)] + list(extra_tokens)
  with open(path, "wb") as f:
    for rank, tok in enumerate(tokens):
      f.write(base64.b64encode(tok) + b" " + str(rank).encode() + b"\n")
  return str(path)


def train_losses(workdir: Path) -> dict[int, float]:
  """Per-step train losses of a run; a step logged twice (before a kill, then after) keeps the
  last."""
  return {
    r["step"]: r["loss"] for r in read_jsonl(str(Path(workdir) / "metrics.jsonl")) if "loss" in r
  }


def tiny_config(**overrides) -> ml_collections.ConfigDict:
  """A few-hundred-K-parameter fp32 run on synthetic data; overrides are dotted keys."""
  c = base.get_config()
  c.steps = 6
  c.global_batch_size = 8
  c.seq_len = 32
  c.log_every = 2
  c.eval_every = 0
  c.eval_steps = 2
  c.checkpoint_every = 0
  c.watchdog_timeout_s = 0.0
  c.loss_chunk_size = 16
  c.optimizer.warmup_steps = 2
  c.optimizer.learning_rate = 1e-2
  m = c.model
  m.vocab_size = 256
  m.embed_dim = 64
  m.mlp_dim = 128
  m.num_layers = 2
  m.num_heads = 4
  m.num_kv_heads = 2
  m.head_dim = 16
  m.max_seq_len = 64
  m.rope_scaling = None
  m.dtype = "float32"
  m.remat = "none"
  m.attention = "xla"
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 1
  for key, value in overrides.items():
    target = c
    *path, last = key.split(".")
    for p in path:
      target = target[p]
    target[last] = value
  c.lock()
  return c


def child_pids(pid: int) -> list[int]:
  """The child processes of `pid`, started from any of its threads (Linux /proc)."""
  out = []
  for task in Path(f"/proc/{pid}/task").iterdir():
    out += [int(c) for c in (task / "children").read_text().split()]
  return out


def command_of(pid: int) -> bytes:
  """A process's command line, or b'' once it is gone."""
  try:
    return Path(f"/proc/{pid}/cmdline").read_bytes()
  except FileNotFoundError:
    return b""


def is_running(pid: int) -> bool:
  """Whether `pid` exists and is not a zombie waiting for a parent to reap it."""
  try:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
  except FileNotFoundError:
    return False


def wait_until(predicate, seconds: float) -> bool:
  """Polls `predicate` until it holds (True) or `seconds` pass (False)."""
  deadline = time.monotonic() + seconds
  while time.monotonic() < deadline:
    if predicate():
      return True
    time.sleep(0.2)
  return False
