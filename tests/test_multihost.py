"""Two processes x 4 devices train exactly like one process x 8, and share one checkpoint."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.common import tiny_config, train_losses
from trainer import distributed
from trainer.loop import train_and_evaluate

REPO = Path(__file__).resolve().parents[1]
MESH = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
FLAGS = [
  "--config.steps={steps}",
  "--config.log_every=1",
  "--config.checkpoint_every=3",
  "--config.optimizer.decay_steps=6",
  "--config.mesh.data=2",
  "--config.mesh.fsdp=2",
  "--config.mesh.tensor=2",
]


losses = train_losses


def launch_two_hosts(workdir: Path, steps: int) -> str:
  env = dict(os.environ, PYTHONPATH=str(REPO))
  for k in distributed.LAUNCHER_VARS:
    env.pop(k, None)
  cmd = [
    sys.executable,
    "-m",
    "launch.local",
    "--processes=2",
    "--devices_per_process=4",
    "--",
    sys.executable,
    "-m",
    "trainer.train",
    "--config=tests/tiny_run.py",
    f"--workdir={workdir}",
    *[f.format(steps=steps) for f in FLAGS],
  ]
  result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return result.stdout + result.stderr


def test_two_hosts_match_one_host_and_resume_together(tmp_path):
  one = tmp_path / "one"
  train_and_evaluate(
    tiny_config(steps=6, log_every=1, **{"optimizer.decay_steps": 6}, **MESH), str(one)
  )
  reference = losses(one)

  two = tmp_path / "two"
  launch_two_hosts(two, steps=3)
  assert sorted(p.name for p in (two / "checkpoints").iterdir() if p.name.isdigit()) == ["3"]
  copy = tmp_path / "copy"
  shutil.copytree(two, copy)

  out = launch_two_hosts(two, steps=6)
  assert "Resumed from step 3" in out
  got = losses(two)
  assert sorted(got) == list(range(1, 7))
  np.testing.assert_allclose(
    [got[s] for s in range(1, 7)], [reference[s] for s in range(1, 7)], rtol=1e-5
  )

  # The checkpoint the two hosts wrote together also resumes on one host of 8 devices.
  train_and_evaluate(
    tiny_config(steps=6, log_every=1, **{"optimizer.decay_steps": 6}, **MESH), str(copy)
  )
  got = losses(copy)
  np.testing.assert_allclose(
    [got[s] for s in range(4, 7)], [reference[s] for s in range(4, 7)], rtol=1e-5
  )
