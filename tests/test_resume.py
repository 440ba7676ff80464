"""Exact resume: stop, kill -9, SIGTERM, a new mesh, a corrupted checkpoint, another model."""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from data import create_pipeline
from data.prepare import prepare
from model import Llama3
from tests.common import tiny_config
from tests.common import train_losses as losses
from trainer import state as state_lib
from trainer import step as step_lib
from trainer.checkpoint import CheckpointMismatchError, restore_params
from trainer.loop import train_and_evaluate
from trainer.mesh import create_mesh
from trainer.metrics import read_jsonl

STEPS = 12
CORPUS = {}  # The prepared data every run here trains on, set up once per module.


@pytest.fixture(scope="module", autouse=True)
def prepared_corpus(tmp_path_factory):
  """Real text: twenty standard-library modules, byte-tokenized and packed into rows of 33."""
  src = tmp_path_factory.mktemp("corpus")
  for path in sorted(Path(json.__file__).parent.parent.glob("*.py"))[:20]:
    (src / f"{path.stem}.txt").write_bytes(path.read_bytes())
  out = str(tmp_path_factory.mktemp("prepared") / "data")
  prepare(
    f"{src}/*.txt",
    out,
    seq_len=32,
    tokenizer="byte",
    eval_fraction=0.1,
    num_workers=1,
    progress=False,
  )
  CORPUS["path"], CORPUS["text"] = out, f"{src}/*.txt"
  yield out


def config(**overrides):
  base = {
    "steps": STEPS,
    "log_every": 1,
    "checkpoint_every": 4,
    "optimizer.decay_steps": STEPS,
    "data.source": "prepared",
    "data.path": CORPUS["path"],
    "model.vocab_size": 320,
  }
  return tiny_config(**{**base, **overrides})


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("straight")
  train_and_evaluate(config(), str(workdir))
  result = losses(workdir)
  assert sorted(result) == list(range(1, STEPS + 1))
  return result


def test_stop_and_rerun_is_bitwise_identical(tmp_path, straight, caplog):
  train_and_evaluate(config(steps=4), str(tmp_path))
  assert sorted(losses(tmp_path)) == [1, 2, 3, 4]
  with caplog.at_level(logging.INFO):
    train_and_evaluate(config(), str(tmp_path))
  assert "Resumed from step 4 in" in caplog.text  # A fresh start would match too.
  assert losses(tmp_path) == straight


def test_resume_on_another_mesh(tmp_path, straight):
  train_and_evaluate(config(steps=4, **{"mesh.data": 8}), str(tmp_path))
  mesh = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
  train_and_evaluate(config(**mesh), str(tmp_path))
  got = losses(tmp_path)
  steps = list(range(1, STEPS + 1))
  np.testing.assert_allclose([got[s] for s in steps], [straight[s] for s in steps], rtol=1e-5)


def _truncate(state_dir: Path) -> None:
  assert state_dir.is_dir()
  for f in state_dir.rglob("*"):
    if f.is_file() and f.stat().st_size > 0:
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def test_other_data_is_an_error_unless_allowed_and_then_read_from_its_start(tmp_path):
  def saved_position(workdir, step):
    data = json.loads((workdir / "checkpoints" / str(step) / "data" / "metadata").read_text())
    return data["iterators"]

  def run(workdir, steps, path, **kw):
    text = {"data.source": "text", "data.path": path, "checkpoint_every": 2}
    train_and_evaluate(config(steps=steps, **text, **kw), str(workdir))

  run(tmp_path / "run", 2, CORPUS["text"])
  new = tmp_path / "new"  # Fewer files: the saved file position points past their end.
  new.mkdir()
  for path in sorted(Path(CORPUS["text"]).parent.glob("*.txt"))[:3]:
    (new / path.name).write_bytes(path.read_bytes())
  with pytest.raises(ValueError, match="trained on data .* set --config.data.allow_new_data=True"):
    run(tmp_path / "run", 4, f"{new}/*.txt")
  run(tmp_path / "run", 4, f"{new}/*.txt", **{"data.allow_new_data": True})
  run(tmp_path / "fresh", 2, f"{new}/*.txt")
  # Two steps into the new stream, as in a run that started on it: read from its start.
  assert saved_position(tmp_path / "run", 4) == saved_position(tmp_path / "fresh", 2)


def test_corrupt_newest_checkpoint_falls_back(tmp_path, straight, caplog, capfd):
  train_and_evaluate(config(steps=8), str(tmp_path))
  _truncate(tmp_path / "checkpoints" / "8" / "state")
  killed_save = tmp_path / "checkpoints" / "9.orbax-checkpoint-tmp" / "state"  # kill -9 mid-save
  killed_save.mkdir(parents=True)
  train_and_evaluate(config(), str(tmp_path))
  assert not killed_save.parent.exists()
  assert "step 8" in caplog.text and "older one" in caplog.text
  assert "TensorStore details" not in caplog.text  # One line, not a repr of the store's spec.
  assert losses(tmp_path) == straight
  # Nothing was deleted: the corrupt checkpoint was moved aside, not removed.
  assert any((tmp_path / "checkpoints_corrupt").rglob("*"))
  # None restores: an error, not a quiet restart from step 0 over the run's metrics.
  for step in (4, 8, 12):
    _truncate(tmp_path / "checkpoints" / str(step) / "state")
  with pytest.raises(ValueError, match=r"No checkpoint in .* restores: steps \[12, 8, 4\] were"):
    train_and_evaluate(config(), str(tmp_path))
  assert losses(tmp_path) == straight
  # Rerun, as the error says: the run starts over, and so do its metrics (each step once).
  train_and_evaluate(config(), str(tmp_path))
  steps = [r["step"] for r in read_jsonl(str(tmp_path / "metrics.jsonl")) if "loss" in r]
  assert steps == list(range(1, STEPS + 1)) and losses(tmp_path) == straight
  # Failed reads leave un-awaited coroutines; their reports (screens of spec) are not printed.
  assert "Exception ignored" not in capfd.readouterr().err


def test_unreadable_config_of_the_newest_checkpoint_sets_it_aside(tmp_path, straight, caplog):
  train_and_evaluate(config(steps=8), str(tmp_path))
  (tmp_path / "checkpoints" / "8" / "config" / "metadata").write_text("garbage{")
  # Left in place, step 8 would block this run's own save of step 8.
  train_and_evaluate(config(), str(tmp_path))
  assert "step 8 is unreadable" in caplog.text
  assert losses(tmp_path) == straight
  assert [p.name.split("-")[0] for p in (tmp_path / "checkpoints_corrupt").iterdir()] == ["8"]


def test_checkpoint_of_another_model_is_one_clear_error(tmp_path):
  train_and_evaluate(config(steps=4), str(tmp_path))
  with pytest.raises(CheckpointMismatchError, match="embed_dim: 64 -> 96"):
    train_and_evaluate(config(**{"model.embed_dim": 96}), str(tmp_path))
  # fp32 master weights and moments are not quietly cast down on resume.
  with pytest.raises(CheckpointMismatchError, match="set --config.model.param_dtype=float32, or"):
    train_and_evaluate(config(**{"model.param_dtype": "bfloat16"}), str(tmp_path))
  # Optimizer state of another layout is not mistaken for a corrupt checkpoint and set aside.
  with pytest.raises(
    CheckpointMismatchError, match=r"other entries .*optimizer.grad_clip: 1.0 -> 0"
  ):
    train_and_evaluate(config(**{"optimizer.grad_clip": 0.0}), str(tmp_path))
  assert not (tmp_path / "checkpoints_corrupt").exists()
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["4"]


def _start(workdir: Path, *flags: str) -> subprocess.Popen:
  overrides = [
    "--config.steps=12",
    "--config.log_every=1",
    "--config.checkpoint_every=2",
    "--config.optimizer.decay_steps=12",
    "--config.data.source=synthetic",
  ]
  cmd = [
    sys.executable,
    "-m",
    "trainer.train",
    "--config=tests/tiny_run.py",
    f"--workdir={workdir}",
    *overrides,
    *flags,
  ]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.Popen(
    cmd,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    cwd=Path(__file__).parent.parent,
  )


def _wait_for_step(workdir: Path, step: int, proc: subprocess.Popen, timeout: float = 240):
  deadline = time.time() + timeout
  while time.time() < deadline:
    path = workdir / "metrics.jsonl"
    if path.exists() and any(s >= step for s in losses(path.parent)):
      return
    assert proc.poll() is None, proc.stdout.read()
    time.sleep(0.02)  # A tiny step takes about 50 ms: the signal must land well before the end.
  raise AssertionError(f"step {step} not reached")


@pytest.fixture(scope="module")
def straight_cli(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("straight_cli")
  proc = _start(workdir)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out
  return losses(workdir)


def test_kill_9_then_rerun_continues_exactly(tmp_path, straight_cli):
  proc = _start(tmp_path)
  _wait_for_step(tmp_path, 5, proc)
  proc.kill()
  proc.wait()
  assert max(losses(tmp_path)) < STEPS
  rerun = _start(tmp_path)
  out, _ = rerun.communicate(timeout=300)
  assert rerun.returncode == 0, out
  assert "Resumed from step" in out  # Not trained again from scratch, which matches too.
  assert losses(tmp_path) == straight_cli
  # Steps logged after the checkpoint were trained again; their first records were dropped.
  steps = [r["step"] for r in read_jsonl(str(tmp_path / "metrics.jsonl")) if "loss" in r]
  assert steps == sorted(set(steps)) == list(range(1, STEPS + 1))


def _saved_steps(workdir: Path) -> list[int]:
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def test_ctrl_c_and_sigterm_save_and_resume(tmp_path, straight_cli):
  """A first Ctrl-C saves at the step's end and exits 130 (interrupted), with no traceback; a
  SIGTERM (preemption) saves and exits 0. Logged every 3 steps: a stopped run also logs its
  last, partial window, so each logged loss is the mean over the steps since the one logged
  before it, across both resumes."""
  flags = ("--config.checkpoint_every=0", "--config.log_every=3")
  proc = _start(tmp_path, *flags)
  _wait_for_step(tmp_path, 3, proc)
  proc.send_signal(signal.SIGINT)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 130 and "Traceback" not in out, out
  assert "Interrupted (Ctrl-C): saved step" in out
  (first,) = _saved_steps(tmp_path)
  assert 3 <= first < STEPS

  proc = _start(tmp_path, *flags)
  _wait_for_step(tmp_path, first + 1, proc)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0 and "Preempted (SIGTERM): saved step" in out, out
  assert f"Resumed from step {first}" in out
  second = _saved_steps(tmp_path)[-1]
  assert first < second < STEPS

  rerun = _start(tmp_path, *flags)
  out, _ = rerun.communicate(timeout=300)
  assert rerun.returncode == 0 and f"Resumed from step {second}" in out, out
  got = losses(tmp_path)
  logged = sorted(got)
  assert logged == sorted({3, 6, 9, 12, first, second}), logged
  for before, step in zip([0, *logged], logged):
    window = [straight_cli[k] for k in range(before + 1, step + 1)]
    np.testing.assert_allclose(got[step], np.mean(window), rtol=1e-6, err_msg=str(step))


def _eval_loss(config, params) -> float:
  mesh = create_mesh(config.mesh, jax.devices()[:1])
  model = Llama3(state_lib.model_config(config))
  replicated = jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), params)
  eval_step = step_lib.jit_eval_step(
    config, model, mesh, state_lib.logical_rules(config), replicated
  )
  total = None
  for batch in create_pipeline(config, mesh).eval_batches():
    m = eval_step(params, batch)
    total = m if total is None else total.merge(m)
  return float(total.compute()["eval_loss"])


def test_restore_params_and_init_from_carry_the_trained_weights(tmp_path, monkeypatch):
  trained = config(steps=4, eval_every=4, checkpoint_every=2)
  last = train_and_evaluate(trained, str(tmp_path / "a"))
  mcfg, params = restore_params(str(tmp_path / "a"))
  assert mcfg == state_lib.model_config(trained)
  assert _eval_loss(trained, params) == pytest.approx(last["eval_loss"], rel=1e-5)
  _, on_host = restore_params(str(tmp_path / "a"), on_host=True)  # What init_from reads.
  assert all(type(x) is np.ndarray for x in jax.tree.leaves(on_host))
  jax.tree.map(np.testing.assert_array_equal, on_host, params)
  # A new run started from it: its first step has learning rate 0 (warmup), so its eval after
  # step 1 is the trained model's eval, and its step counter starts again from 0.
  fresh = config(steps=1, eval_every=1, init_from=str(tmp_path / "a"))
  # The loaded parameters stay on the host until they go to their shards (no device holds the
  # whole model), and no random state is built to be thrown away.
  placed, random_inits = [], []
  with_params, create = state_lib.with_params, state_lib.create_sharded_state
  monkeypatch.setattr(
    state_lib, "with_params", lambda p, *a: placed.extend(jax.tree.leaves(p)) or with_params(p, *a)
  )
  monkeypatch.setattr(
    state_lib, "create_sharded_state", lambda *a: random_inits.append(1) or create(*a)
  )
  first = train_and_evaluate(fresh, str(tmp_path / "b"))
  monkeypatch.undo()
  assert placed and all(type(x) is np.ndarray for x in placed) and not random_inits
  assert first["learning_rate"] == 0.0
  assert first["eval_loss"] == pytest.approx(last["eval_loss"], rel=1e-5)
  assert sorted(losses(tmp_path / "b")) == [1]
  # Into a model with the other layer layout (layers_0.. instead of one stacked subtree).
  unscanned = config(steps=1, eval_every=1, init_from=str(tmp_path / "a"))
  unscanned.model.scan_layers = not trained.model.scan_layers
  again = train_and_evaluate(unscanned, str(tmp_path / "c"))
  assert again["eval_loss"] == pytest.approx(last["eval_loss"], rel=1e-5)
  # A damaged newest checkpoint: the parameters come from the one before; none left: one error.
  for step in (4, 2):
    _truncate(tmp_path / "a" / "checkpoints" / str(step) / "state")
    if step == 4:
      _, older = restore_params(str(tmp_path / "a"))
      assert _eval_loss(trained, older) != pytest.approx(last["eval_loss"], rel=1e-5)
  with pytest.raises(ValueError, match=r"No checkpoint in .* restores \(step 4: .*; step 2: "):
    restore_params(str(tmp_path / "a"))
  (tmp_path / "a" / "config.json").write_text('{"model": {"embed_dim": 6')  # cut off
  with pytest.raises(ValueError, match=r"config.json is not a run's config .*copy it back from"):
    restore_params(str(tmp_path / "a"))
  (tmp_path / "p").mkdir()
  (tmp_path / "p" / "model_config.json").write_text("{}")  # What model.hf import writes.
  with pytest.raises(FileNotFoundError, match="parameters from model.hf import; use the Hugging"):
    restore_params(str(tmp_path / "p"))


def test_watchdog_dumps_stacks_and_exits_nonzero():
  code = (
    "import time\n"
    "from trainer.watchdog import Watchdog\n"
    "w = Watchdog(1.0)\n"
    "w.beat(7)\n"
    "time.sleep(60)\n"
  )
  result = subprocess.run(
    [sys.executable, "-c", code],
    capture_output=True,
    text=True,
    timeout=120,
    cwd=Path(__file__).parent.parent,
  )
  assert result.returncode == 70
  assert "after step 7" in result.stderr
  assert "Thread" in result.stderr and "time.sleep(60)" not in result.stdout
  assert 'File "<string>", line 5' in result.stderr  # The main thread's stack, where it hangs.
