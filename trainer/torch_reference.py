"""PyTorch `transformers` Llama + AdamW on the benchmark's config and data, in a child process:
the reference `trainer.benchmark --compare_torch` times JAX against. torch is imported only there.
"""

from __future__ import annotations

import multiprocessing
import time
from typing import Any

import numpy as np

from data.synthetic import synthetic_rows
from model import ModelConfig
from trainer import state as state_lib


def torch_worker(conn: Any, spec: dict[str, Any]) -> None:
  """Child process: PyTorch transformers Llama + AdamW; answers ('steps', batches) requests."""
  import torch  # noqa: PLC0415 - only the comparison needs torch.
  import transformers  # noqa: PLC0415

  torch.set_num_threads(spec["threads"])
  torch.manual_seed(0)
  m = spec["model"]
  from model.hf import config_to_hf  # noqa: PLC0415 - the exporter's mapping, not a second one.

  hf_config = transformers.LlamaConfig(**config_to_hf(ModelConfig(**m)))
  dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[m["dtype"]]
  model = transformers.LlamaForCausalLM(hf_config).to(dtype)
  params = [p for p in model.parameters() if p.requires_grad]
  opt = spec["optimizer"]
  groups = [
    {"params": [p for p in params if p.ndim >= 2], "weight_decay": opt["weight_decay"]},
    {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
  ]
  adamw = torch.optim.AdamW(
    groups, lr=opt["learning_rate"], betas=(opt["b1"], opt["b2"]), eps=opt["eps"]
  )

  def step(inputs, targets, mask):
    logits = model(input_ids=inputs).logits.float()
    ce = torch.nn.functional.cross_entropy(
      logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
    )
    loss = (ce * mask.reshape(-1)).sum() / mask.sum().clamp(min=1.0)
    loss.backward()
    if opt["grad_clip"] > 0:
      torch.nn.utils.clip_grad_norm_(params, opt["grad_clip"])
    adamw.step()
    adamw.zero_grad(set_to_none=True)
    return loss

  while (request := conn.recv()) is not None:
    kind, payload = request
    if kind == "peak":
      best = 0.0
      for n in (1024, 2048):
        a = torch.ones(n, n)
        a @ a
        for _ in range(3):
          t0 = time.perf_counter()
          a @ a
          best = max(best, 2 * n**3 / (time.perf_counter() - t0))
      conn.send(best)
      continue
    batches = [tuple(torch.from_numpy(x) for x in b) for b in payload]
    t0 = time.perf_counter()
    for inputs, targets, mask in batches:
      loss = step(inputs.long(), targets.long(), mask)
    conn.send((time.perf_counter() - t0, loss.item()))


class TorchRunner:
  """Drives `torch_worker` in a spawned child, so its threads never share a process with XLA's."""

  def __init__(self, config: Any, threads: int):
    ctx = multiprocessing.get_context("spawn")
    self._conn, child = ctx.Pipe()
    model = state_lib.model_config(config).to_dict()
    spec = {"model": model, "optimizer": dict(config.optimizer), "threads": threads}
    self._proc = ctx.Process(target=torch_worker, args=(child, spec), daemon=True)
    self._proc.start()
    self.seed, self.seq_len, self.vocab = config.seed, config.seq_len, model["vocab_size"]
    self.rows = np.arange(config.global_batch_size)

  def _ask(self, request: Any) -> Any:
    self._conn.send(request)
    return self._conn.recv()

  def matmul_peak(self) -> float:
    """fp32 matmul FLOP/s that PyTorch reaches on this host (its own peak)."""
    return self._ask(("peak", None))

  def run(self, first_step: int, num_steps: int) -> tuple[float, float]:
    """(seconds, last loss) for `num_steps` steps on the same synthetic rows JAX trains on."""
    batches = []
    for s in range(first_step, first_step + num_steps):
      ex = synthetic_rows(self.seed, s, self.rows, self.seq_len, self.vocab)
      batches.append((ex["inputs"], ex["targets"], ex["loss_mask"]))
    return self._ask(("steps", batches))

  def close(self) -> None:
    """Ends the PyTorch process."""
    self._conn.send(None)
    self._proc.join(timeout=30)
