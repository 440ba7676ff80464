"""Two processes x 4 devices train exactly like one process x 8, survive a SIGTERM together (a
simulated preemption), and share one checkpoint."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optax

from model import Llama3
from tests.common import tiny_config
from tests.common import train_losses as losses
from trainer import distributed
from trainer.loop import train_and_evaluate

REPO = Path(__file__).resolve().parents[1]
MESH = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
STEPS = 8
FLAGS = [
  f"--config.steps={STEPS}",
  "--config.log_every=1",
  "--config.checkpoint_every=0",
  f"--config.optimizer.decay_steps={STEPS}",
  "--config.mesh.data=2",
  "--config.mesh.fsdp=2",
  "--config.mesh.tensor=2",
]


def start_two_hosts(workdir: Path, *extra: str, devices: int = 4) -> subprocess.Popen:
  env = dict(os.environ, PYTHONPATH=str(REPO))
  for k in distributed.LAUNCHER_VARS:
    env.pop(k, None)
  cmd = [
    sys.executable,
    "-m",
    "launch.local",
    "--processes=2",
    f"--devices_per_process={devices}",
    "--",
    sys.executable,
    "-m",
    "trainer.train",
    "--config=tests/tiny_run.py",
    f"--workdir={workdir}",
    *FLAGS,
    *extra,
  ]
  return subprocess.Popen(
    cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )


def finish(proc: subprocess.Popen, code: int = 0) -> str:
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == code, out[-6000:]
  return out


def wait_for_step(workdir: Path, step: int, proc: subprocess.Popen, timeout: float = 400) -> None:
  deadline = time.time() + timeout
  while time.time() < deadline:
    if (workdir / "metrics.jsonl").exists() and any(s >= step for s in losses(workdir)):
      return
    assert proc.poll() is None, proc.communicate()[0][-6000:]
    time.sleep(0.02)
  raise AssertionError(f"step {step} not reached")


def one_host(workdir: Path, init_from: Path) -> None:
  config = tiny_config(
    steps=STEPS, log_every=1, init_from=str(init_from), **{"optimizer.decay_steps": STEPS}, **MESH
  )
  train_and_evaluate(config, str(workdir))


def test_two_hosts_match_one_host_and_their_checkpoint_resumes_on_one(tmp_path):
  """Two hosts of 4 devices train as one host of 8 does, from a params dir (init_from: each host
  places its copy of the loaded parameters straight into its shards), and the checkpoint they
  write together resumes on one host. (Stopping and resuming on two hosts together: the stream
  test below.)"""
  import jax

  from model.convert import save_params_dir
  from trainer import state as state_lib

  mcfg = state_lib.model_config(tiny_config())
  params = state_lib.init_state(Llama3(mcfg), optax.sgd(0.0), jax.random.key(7)).params
  save_params_dir(mcfg, jax.tree.map(np.asarray, params), str(tmp_path / "params"))
  one = tmp_path / "one"
  one_host(one, tmp_path / "params")
  reference = losses(one)

  half = STEPS // 2
  two = tmp_path / "two"
  out = finish(
    start_two_hosts(two, f"--config.init_from={tmp_path / 'params'}", f"--config.steps={half}")
  )
  assert out.count(f"Initialized parameters from {tmp_path / 'params'}") == 2, out[-3000:]
  assert sorted(p.name for p in (two / "checkpoints").iterdir() if p.name.isdigit()) == [str(half)]
  one_host(two, tmp_path / "params")  # Resumes from step `half`: init_from applies to new runs.
  got = losses(two)
  assert sorted(got) == list(range(1, STEPS + 1))
  steps = range(1, STEPS + 1)
  np.testing.assert_allclose([got[s] for s in steps], [reference[s] for s in steps], rtol=1e-5)


def test_a_stream_resumes_exactly_on_two_hosts(tmp_path):
  """Each host reads its own shard of a streamed text corpus: every host's position is saved
  (process 0 writes them all) and each host resumes from its own. The run is stopped with a
  Ctrl-C, which the hosts get at different steps and still save together."""
  import json

  from trainer.metrics import read_jsonl

  rng = np.random.default_rng(0)
  for f in range(4):
    lines = []
    for d in range(40):  # Documents of very different lengths, so the shards drift apart.
      words = rng.choice(["llama", "pod", "tpu", "shard"], int(rng.integers(1, 60)))
      lines.append(json.dumps({"text": f"f{f} d{d} " + " ".join(words)}))
    (tmp_path / f"part{f}.jsonl").write_text("\n".join(lines) + "\n")
  steps = 48
  stream = [
    "--config.data.source=text",
    f"--config.data.path={tmp_path}/part*.jsonl",
    "--config.data.tokenizer=byte",
    "--config.model.vocab_size=320",
    # Room after the Ctrl-C: the hosts agree on the step to stop at in the background, which
    # took more than the 12 tiny steps (0.8 s) left of 16 when the machine was busy.
    f"--config.steps={steps}",
    f"--config.optimizer.decay_steps={steps}",
    # One device per host: what is tested is each host's own shard and position (the test
    # above splits a model over both hosts), and two devices compile and step much faster.
    "--config.mesh.data=2",
    "--config.mesh.fsdp=1",
    "--config.mesh.tensor=1",
  ]
  straight = tmp_path / "straight"
  finish(start_two_hosts(straight, *stream, devices=1))
  stopped = tmp_path / "stopped"
  proc = start_two_hosts(stopped, *stream, devices=1)
  wait_for_step(stopped, 3, proc)
  proc.send_signal(signal.SIGINT)  # What the launcher gets from a Ctrl-C in its terminal.
  out = finish(proc, code=130)
  assert out.count("Interrupted (Ctrl-C): saved step") == 2, out[-3000:]
  assert "stopping the others" not in out  # Each host exits 130 on its own; none failed.
  (step,) = [p.name for p in (stopped / "checkpoints").iterdir() if p.name.isdigit()]
  assert int(step) < steps
  data = json.loads((stopped / "checkpoints" / step / "data" / "metadata").read_text())
  assert len(data["iterators"]) == 2 and data["iterators"][0] != data["iterators"][1]
  finish(start_two_hosts(stopped, *stream, devices=1))
  want, got = losses(straight), losses(stopped)
  assert sorted(got) == sorted(want) == list(range(1, steps + 1))
  np.testing.assert_allclose([got[s] for s in want], list(want.values()), rtol=1e-5)
  assert len(read_jsonl(str(stopped / "metrics.jsonl"))) == steps  # Each step logged once.


def test_an_error_on_one_host_ends_the_run_with_it(tmp_path):
  """Host 1 alone gets a bad init_from path: it exits 1 with one line at once, rather than
  waiting for the others at JAX's shutdown barrier until every host aborts."""
  env = dict(os.environ, PYTHONPATH=str(REPO))
  for k in distributed.LAUNCHER_VARS:
    env.pop(k, None)
  train = f"{sys.executable} -m trainer.train --config=tests/tiny_run.py --workdir={tmp_path}"
  bad = f"{tmp_path}/missing"
  script = (
    f'{train} {" ".join(FLAGS)} $([ "$LLAMA_PROCESS_ID" = 1 ] && echo --config.init_from={bad})'
  )
  cmd = [sys.executable, "-m", "launch.local", "--processes=2", "--devices_per_process=4"]
  proc = subprocess.run(
    [*cmd, "--grace_s=2", "--", "bash", "-c", script],
    cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
  )  # fmt: skip
  out = proc.stdout + proc.stderr
  assert proc.returncode == 1, out[-3000:]
  assert f"[p1] error: {bad}/config.json does not exist" in out, out[-3000:]
  assert "Fatal Python error" not in out and "Shutdown barrier" not in out, out[-3000:]
