"""The distributed trainer: mesh equivalence, sharding rules, accumulation, metrics, errors."""

import json
import logging
import re
import shutil

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from configs.base import SHARDING_RULES
from data import create_pipeline
from data.batching import batch_sharding
from model import Llama3
from tests.common import tiny_config
from trainer import optimizer
from trainer import state as state_lib
from trainer import step as step_lib
from trainer.checks import check_batch_fits_mesh, validate
from trainer.loop import train_and_evaluate
from trainer.mesh import MeshError, create_mesh, mesh_context
from trainer.metrics import create_writers, read_jsonl


def build_step(config, devices):
  """(mesh, sharded initial state, state shardings, jitted train step, batch iterator)."""
  mesh = create_mesh(config.mesh, devices)
  rules = state_lib.logical_rules(config)
  model = Llama3(state_lib.model_config(config))
  tx = optimizer.make_optimizer(config)
  state, shardings = state_lib.create_sharded_state(model, tx, mesh, rules, config.seed)
  step_fn = step_lib.jit_train_step(
    config, model, tx, optimizer.learning_rate_schedule(config), mesh, rules, shardings
  )
  return mesh, state, shardings, step_fn, create_pipeline(config, mesh).train_batches(0)


def run_steps(config, devices, num_steps: int, *, repeat_batch: bool = False) -> list[float]:
  """Losses of `num_steps` train steps of `config` on a mesh over `devices`."""
  return [m["loss"] for m in run_metrics(config, devices, num_steps, repeat_batch=repeat_batch)]


def run_metrics(config, devices, num_steps: int, *, repeat_batch: bool = False) -> list[dict]:
  """Loss and gradient norm of `num_steps` train steps of `config` on a mesh over `devices`."""
  mesh, state, _, step_fn, batches = build_step(config, devices)
  steps = []
  with mesh_context(mesh):
    batch = next(batches)
    for _ in range(num_steps):
      state, metrics = step_fn(state, batch)
      steps.append({k: float(metrics[k]) for k in ("loss", "grad_norm")})
      if not repeat_batch:
        batch = next(batches)
  return steps


@pytest.fixture(scope="module")
def single_device_run():
  """Six steps on one device: the state before each step (on the host), the state after the
  last, and each step's loss and gradient norm."""
  mesh, state, _, step_fn, batches = build_step(tiny_config(), jax.devices()[:1])
  states, losses, grad_norms = [], [], []
  with mesh_context(mesh):
    for _ in range(6):
      states.append(jax.device_get(state))  # Before the step: the step donates its input.
      state, metrics = step_fn(state, next(batches))
      losses.append(float(metrics["loss"]))
      grad_norms.append(float(metrics["grad_norm"]))
  states.append(jax.device_get(state))
  return states, losses, grad_norms


def _rules(**axes) -> tuple:
  """configs/base.py's sharding rules with the given logical axes mapped to other mesh axes."""
  return tuple((name, axes.get(name, rule)) for name, rule in SHARDING_RULES)


@pytest.mark.parametrize(
  ("shape", "batch_over"),
  [((8, 1, 1), None), ((2, 2, 2), None), ((1, 4, 2), None), ((2, 2, 2), ("data",))],
  ids=["8x1x1", "2x2x2", "1x4x2", "2x2x2-batch-over-data"],
)
def test_meshes_give_the_same_steps(shape, batch_over, single_device_run):
  """Each step on the mesh, started from the single-device state, gives its loss, gradient norm
  and next state.

  Steps are compared one at a time, not as free-running runs: Adam's first updates are about
  lr * sign(g) wherever |g| >> eps, so a gradient entry at rounding level can flip sign under
  another summation order, and later losses then drift apart by more than rounding (1.2e-5
  relative after five steps here on an Intel Xeon, while every single step agreed to 6e-7).
  """
  states, losses, grad_norms = single_device_run
  overrides = {"mesh.data": shape[0], "mesh.fsdp": shape[1], "mesh.tensor": shape[2]}
  if batch_over:  # The input rows follow the config's 'batch' rule.
    overrides["sharding_rules"] = _rules(batch=batch_over)
  config = tiny_config(**overrides)
  mesh, _, shardings, step_fn, batches = build_step(config, jax.devices())
  flipped = 0
  with mesh_context(mesh):
    for k in range(6):
      batch = next(batches)
      assert batch["inputs"].sharding.spec == PartitionSpec(batch_over or ("data", "fsdp"), None)
      state, metrics = step_fn(jax.device_put(states[k], shardings), batch)
      np.testing.assert_allclose(float(metrics["loss"]), losses[k], rtol=1e-5)
      np.testing.assert_allclose(float(metrics["grad_norm"]), grad_norms[k], rtol=1e-5)
      got = jax.tree.leaves(jax.device_get(state.params))
      want = jax.tree.leaves(states[k + 1].params)
      assert [a.shape for a in got] == [b.shape for b in want]
      diff = np.concatenate([np.abs(a - b).ravel() for a, b in zip(got, want, strict=True)])
      flipped += int(np.sum(diff > 1e-5))
      assert diff.max() <= 2 * config.optimizer.learning_rate  # A flip moves one entry by 2 lr.
  # Sign flips are rare (one of 106,816 entries in six steps, measured): a few at most.
  assert flipped <= 4, f"{flipped} parameter entries differ from the single-device run"
  assert losses[0] != losses[-1]


def test_parameter_shardings_follow_the_rules():
  config = tiny_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
  mesh = create_mesh(config.mesh)
  model = Llama3(state_lib.model_config(config))
  tx = optimizer.make_optimizer(config)
  state, shardings = state_lib.create_sharded_state(
    model, tx, mesh, state_lib.logical_rules(config), 0
  )
  p = state.params
  assert p["embed"].sharding.spec == PartitionSpec("tensor", "fsdp")
  assert p["lm_head"].sharding.spec == PartitionSpec("fsdp", "tensor")
  attn, mlp = p["layers"]["attn"], p["layers"]["mlp"]
  assert attn["q"]["kernel"].sharding.spec == PartitionSpec(None, "fsdp", "tensor", None)
  assert attn["k"]["kernel"].sharding.spec == PartitionSpec(None, "fsdp", "tensor", None)
  assert attn["o"]["kernel"].sharding.spec == PartitionSpec(None, "tensor", None, "fsdp")
  assert mlp["gate"]["kernel"].sharding.spec == PartitionSpec(None, "fsdp", "tensor")
  assert mlp["down"]["kernel"].sharding.spec == PartitionSpec(None, "tensor", "fsdp")
  assert p["final_norm"]["scale"].sharding.spec in (PartitionSpec(), PartitionSpec(None))
  # Adam moments live exactly where their parameters do.
  mu = state.opt_state[1][0].mu
  assert mu["layers"]["mlp"]["up"]["kernel"].sharding.spec == PartitionSpec(None, "fsdp", "tensor")
  # Each device holds 1/8 of the q kernel: fsdp x tensor split it four ways, data replicates.
  q = attn["q"]["kernel"]
  assert q.addressable_shards[0].data.size == q.size // 4


@pytest.mark.parametrize("unroll", [False, True], ids=["loop", "unrolled"])
def test_gradient_accumulation_equals_the_large_batch(unroll):
  # The gradient norm too: clipping and Adam hide a wrongly scaled gradient from the losses.
  plain = run_metrics(tiny_config(), jax.devices()[:2], 3)
  accum = tiny_config(grad_accum_steps=4, grad_accum_unroll=unroll)
  accum = run_metrics(accum, jax.devices()[:2], 3)
  for key in ("loss", "grad_norm"):
    np.testing.assert_allclose([m[key] for m in accum], [m[key] for m in plain], rtol=1e-5)


def test_loss_falls_on_repeated_data():
  losses = run_steps(tiny_config(), jax.devices(), 15, repeat_batch=True)
  assert losses[-1] < 0.5 * losses[0], losses


def test_an_explicit_attention_kernel_does_not_break_parameter_init():
  """Parameter shapes come from a short dummy batch that splash (128-token tiles) would refuse."""
  config = tiny_config(**{"model.attention": "splash", "model.head_dim": 64, "seq_len": 128})
  model = Llama3(state_lib.model_config(config))
  shapes = jax.eval_shape(lambda: state_lib._init_params(model, jax.random.key(0)))
  assert shapes["layers"]["attn"]["q"]["kernel"].value.shape[-1] == 64


def test_parameters_that_do_not_split_over_the_mesh_are_one_clear_error():
  config = tiny_config(**{"mesh.tensor": 8, "mesh.fsdp": 1})  # 2 kv heads over 8 devices.
  mesh = create_mesh(config.mesh, jax.devices())
  model = Llama3(state_lib.model_config(config))
  with pytest.raises(ValueError, match=r"attn/k/kernel has 2 along 'kv_heads', .* of size 8; "):
    state_lib.param_shardings(model, mesh, state_lib.logical_rules(config))


def test_mesh_that_does_not_fit_is_one_clear_error():
  config = tiny_config(**{"mesh.data": 3, "mesh.fsdp": 1, "mesh.tensor": 1})
  with pytest.raises(MeshError, match="needs 3 devices but 8 are available"):
    create_mesh(config.mesh)
  with pytest.raises(MeshError, match="num_slices=3 does not divide the 8 devices; set it to"):
    create_mesh(tiny_config(**{"mesh.num_slices": 3}).mesh)
  with pytest.raises(MeshError, match="num_slices=2 needs TPU slices .* cpu devices have none"):
    create_mesh(tiny_config(**{"mesh.num_slices": 2}).mesh)


def test_a_batch_that_does_not_split_over_its_rules_is_one_clear_error():
  """Rows split over the 'batch' rule's axes (the input) and 'activation_batch' (the model)."""
  mesh = create_mesh(tiny_config(**{"mesh.data": 2, "mesh.fsdp": 4}).mesh)
  fits = lambda rows, **axes: check_batch_fits_mesh(
    tiny_config(global_batch_size=rows, sharding_rules=_rules(**axes)), mesh
  )
  with pytest.raises(ValueError, match=r"batch of 4 rows .* over data x fsdp = 8 devices; make"):
    fits(4)
  with pytest.raises(ValueError, match=r"over data \(batch\) and data x fsdp \(activation_batch\)"):
    fits(4, batch="data")  # The input would split, the activations would not.
  fits(8, batch="data")
  fits(4, batch="data", activation_batch="data")
  with pytest.raises(ValueError, match=r"batch of 6 rows .* over fsdp = 4 devices; .* of 4\."):
    fits(6, batch="fsdp", activation_batch="fsdp")
  with pytest.raises(ValueError, match="sharding_rules maps 'batch' to 'dp', which is not a mesh"):
    validate(tiny_config(sharding_rules=_rules(batch=("dp",))))
  with pytest.raises(ValueError, match=r"no 'batch' entry .*; add \('batch', \('data', 'fsdp'\)\)"):
    batch_sharding(mesh, SHARDING_RULES[1:])


def test_train_writes_tensorboard_jsonl_and_checkpoints(tmp_path, monkeypatch, caplog):
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

  from trainer import loop

  config = tiny_config(steps=6, log_every=2, eval_every=3, checkpoint_every=3)
  monkeypatch.chdir(tmp_path)  # A relative --workdir, as `make train` passes.
  written = []  # What the writers were handed, by reference: TensorBoard's writes later.

  def recording_writers(workdir):
    writer, board = create_writers(workdir)
    write = writer.write_scalars
    writer.write_scalars = lambda step, scalars: (
      written.append((step, {**scalars, "drawn": len(drawn)})),
      write(step, scalars),
    )
    return writer, board

  drawn = []  # Batches the loop has taken when each train metrics line is written.

  def counting_pipeline(config, mesh):
    pipeline = create_pipeline(config, mesh)
    train_batches = pipeline.train_batches

    def counted(start_step):
      for batch in train_batches(start_step):
        drawn.append(1)
        yield batch

    pipeline.train_batches = counted
    return pipeline

  monkeypatch.setattr(loop, "create_writers", recording_writers)
  monkeypatch.setattr(loop, "create_pipeline", counting_pipeline)
  with caplog.at_level(logging.INFO):
    train_and_evaluate(config, "run")
  # Step 6 logs and evaluates: each eval_loss is written once, and no dict changed after.
  assert [step for step, scalars in written if "eval_loss" in scalars] == [3, 6]
  # Steps 2 and 4 only log, so the next step was dispatched (its batch taken) before their
  # metrics were read: the device does not wait for a log line. Step 6 is the last.
  logged = [(step, scalars["drawn"]) for step, scalars in written if "loss" in scalars]
  assert logged == [(2, 3), (4, 5), (6, 6)]
  # The kernel that ran, as the model selected it (XLA on CPU, whatever model.attention says).
  assert "Attention: xla (blockwise causal attention" in caplog.text
  # The console shows progress: one line per logged step with the rate and the time left.
  assert re.search(
    r"step 4/6: loss \d+\.\d{4}, [\d,]+ tokens/s, MFU .*, ETA 0:00:\d\d", caplog.text
  )
  tmp_path = tmp_path / "run"
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["3", "6"]
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in records if "loss" in r]
  assert [r["step"] for r in train] == [2, 4, 6]
  for r in train:
    assert {"loss", "learning_rate", "grad_norm", "tokens_per_sec", "mfu"} <= set(r)
    assert np.isfinite(r["loss"]) and r["tokens_per_sec"] > 0 and 0 < r["mfu"] < 1
  assert [r["step"] for r in records if "eval_loss" in r] == [3, 6]
  acc = EventAccumulator(str(tmp_path))
  acc.Reload()
  tags = acc.Tags()["tensors"] + acc.Tags()["scalars"]
  assert "loss" in tags
  events = acc.Tensors("loss") if "loss" in acc.Tags()["tensors"] else acc.Scalars("loss")
  assert [e.step for e in events] == [2, 4, 6]
  assert (tmp_path / "config.json").exists()
  # Killed during the final evaluation, after the last save: the rerun evaluates, then no more.
  final = records[-1]
  assert final["step"] == 6 and "eval_loss" in final
  kept = [json.dumps(r) for r in records[:-1]]
  (tmp_path / "metrics.jsonl").write_text("\n".join(kept) + "\n")
  monkeypatch.chdir(tmp_path.parent)
  again = train_and_evaluate(config, "run")
  np.testing.assert_allclose(again["eval_loss"], final["eval_loss"], rtol=1e-6)
  assert read_jsonl(str(tmp_path / "metrics.jsonl"))[-1] == {"step": 6, **again}
  with caplog.at_level(logging.INFO):
    assert train_and_evaluate(config, "run") == {}  # Finished: nothing more to do, and it says so.
  assert "is already trained to step 6 (steps=6); raise --config.steps" in caplog.text


def test_a_resumed_run_logs_each_step_once(tmp_path):
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

  config = tiny_config(steps=6, log_every=2, eval_every=0, checkpoint_every=3)
  train_and_evaluate(config, str(tmp_path))
  shutil.rmtree(tmp_path / "checkpoints" / "6")  # Killed after logging step 6, before saving it.
  (events,) = tmp_path.glob("events.out.tfevents.*")
  with open(events, "ab") as f:
    f.write(b"\x17\x00\x00")  # And a record torn mid-write.
  train_and_evaluate(config, str(tmp_path))
  assert [r["step"] for r in read_jsonl(str(tmp_path / "metrics.jsonl"))] == [2, 4, 6]
  acc = EventAccumulator(str(tmp_path))
  acc.Reload()
  loss = acc.Tensors("loss") if "loss" in acc.Tags()["tensors"] else acc.Scalars("loss")
  assert [e.step for e in loss] == [2, 4, 6]  # Not 2, 4, 6, 4, 6.


def test_bad_values_fail_before_training(tmp_path):
  for key, value, message in (
    ("log_every", 0, "log_every=0 must be positive"),
    ("eval_every", -1, "eval_every=-1 must be positive, or 0 for never"),
    ("grad_accum_steps", 0, r"grad_accum_steps=0 must be at least 1 \(1: no accumulation\)"),
    ("eval_steps", 0, "eval_steps=0 must be positive when eval_every=2; set eval_every=0"),
    ("max_to_keep", -1, "max_to_keep=-1 must be positive, or 0 .keep all."),
    ("optimizer.learning_rate", -1.0, "optimizer.learning_rate=-1.0 must be positive"),
    ("optimizer.grad_clip", -1.0, "optimizer.grad_clip=-1.0 must be 0 or more"),
    ("optimizer.b2", 1.0, "optimizer.b2=1.0 must be at least 0 and below 1"),
    ("optimizer.end_lr_ratio", 1.5, "optimizer.end_lr_ratio=1.5 must be between 0 and 1"),
  ):
    with pytest.raises(ValueError, match=message):
      train_and_evaluate(tiny_config(**{"eval_every": 2, key: value}), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()  # Refused before anything was written.
  (tmp_path / "file").write_text("")
  with pytest.raises(ValueError, match="--workdir=.*file is a file; give a directory"):
    train_and_evaluate(tiny_config(), str(tmp_path / "file"))
  with pytest.raises(ValueError, match="--workdir=.*file/run cannot be created .*; give a dir"):
    train_and_evaluate(tiny_config(), str(tmp_path / "file" / "run"))
  with pytest.raises(ValueError, match="^--workdir is empty; give a directory"):
    train_and_evaluate(tiny_config(), "")


def test_nan_loss_stops_the_run_naming_the_step(tmp_path):
  from trainer.log_window import TrainingError

  # An infinite learning rate turns every parameter into NaN after the first update.
  config = tiny_config(**{"optimizer.learning_rate": float("inf"), "optimizer.grad_clip": 0.0})
  with pytest.raises(TrainingError, match="at step 2"):
    train_and_evaluate(config, str(tmp_path))


@pytest.mark.parametrize("remote", [False, True])
def test_metrics_jsonl_survives_a_torn_line_and_object_stores(tmp_path, remote):
  from trainer.metrics import JsonlWriter

  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')  # killed mid-write
  writer = JsonlWriter(str(path), remote_flush_s=3600.0, remote=remote)
  writer.write_scalars(3, {"loss": np.float32(1.5)})
  writer.write_scalars(4, {"loss": 1.25})
  writer.close()
  lines = path.read_text().splitlines()
  assert lines[0] == '{"step": 1, "loss": 2.0}' and lines[1] == '{"step": 2, "lo'
  assert [json.loads(x) for x in lines[2:]] == [{"step": 3, "loss": 1.5}, {"step": 4, "loss": 1.25}]
  assert [r["step"] for r in read_jsonl(str(path))] == [1, 3, 4]


def test_saved_stream_positions_reach_the_pipeline():
  from trainer.loop import _restore_data_position

  class Stream:
    restored = None

    def restore(self, positions):
      self.restored = positions

  s = Stream()
  _restore_data_position(s, {"iterators": [{"file": 3}, {"file": 4}]})
  assert s.restored == [{"file": 3}, {"file": 4}]  # All of them: the pipeline finds its own.
  _restore_data_position(s, {"iterator": {"file": 4}})  # Saved before positions were gathered.
  assert s.restored == [{"file": 4}]
  s.restored = None
  _restore_data_position(s, {"iterators": [{}, {}]})  # Step-indexed data: nothing to restore.
  assert s.restored is None
