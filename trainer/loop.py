"""`train_and_evaluate`: the training loop, from config to checkpoints and metrics."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax
from clu import periodic_actions
from etils import epath

from data import create_pipeline
from data.batching import gather_json
from model import Llama3
from model.attention import describe_attention
from trainer import flops, optimizer, tpu_flags
from trainer import state as state_lib
from trainer import step as step_lib
from trainer.checkpoint import Checkpointer, absolute
from trainer.checks import check_batch_fits_mesh, validate
from trainer.log_window import LogWindow
from trainer.mesh import create_mesh, mesh_context
from trainer.metrics import create_writers, read_jsonl, truncate_events, truncate_jsonl
from trainer.watchdog import Preemption, SavedInterrupt, Watchdog


def train_and_evaluate(config: Any, workdir: str) -> dict[str, float]:
  """Trains `config` in `workdir`, resuming from its newest checkpoint; returns last metrics."""
  validate(config)
  if not str(workdir).strip():
    raise ValueError("--workdir is empty; give a directory for the run (it is created).")
  workdir = absolute(workdir)
  if workdir.exists() and not workdir.is_dir():
    raise ValueError(f"--workdir={workdir} is a file; give a directory for the run.")
  try:
    workdir.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise ValueError(
      f"--workdir={workdir} cannot be created ({e.strerror or e}); give a directory you can write."
    ) from None
  mesh = create_mesh(config.mesh)
  check_batch_fits_mesh(config, mesh)
  rules = state_lib.logical_rules(config)
  mcfg = state_lib.model_config(config)
  lead = jax.process_index() == 0
  logging.info(
    "Mesh %s over %d devices (%d processes).", dict(mesh.shape), mesh.size, jax.process_count()
  )

  pipeline = create_pipeline(config, mesh)
  tokenizer = pipeline.tokenizer
  if tokenizer is not None and tokenizer.vocab_size > mcfg.vocab_size:
    raise ValueError(
      f"The tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is "
      f"{mcfg.vocab_size}; set --config.model.vocab_size={tokenizer.vocab_size}."
    )
  model = Llama3(mcfg)
  attention = describe_attention(
    mcfg.attention, head_dim=mcfg.head_dim, seq_len=config.seq_len, dtype=mcfg.dtype
  )
  logging.info("Attention: %s.", attention)
  if jax.default_backend() == "tpu":
    logging.info("%s=%r.", tpu_flags.ENV, os.environ.get(tpu_flags.ENV, ""))
  schedule = optimizer.learning_rate_schedule(config)
  tx = optimizer.make_optimizer(config)
  shardings, abstract = state_lib.state_layout(model, tx, mesh, rules)

  ckpt = Checkpointer(str(workdir), max_to_keep=config.max_to_keep, keep_period=config.keep_period)
  restored = ckpt.restore_latest(abstract, mcfg, config.optimizer.to_dict())
  if restored is not None:
    state, data_state, start_step = restored
    saved_fp = data_state.get("fingerprint")
    if saved_fp and pipeline.fingerprint.startswith(f"{saved_fp}:"):
      # Saved before text streams fingerprinted their file list: the rest of it matches.
      saved_fp = pipeline.fingerprint
    if saved_fp != pipeline.fingerprint and not config.data.allow_new_data:
      raise ValueError(
        f"This run was trained on data {saved_fp!r} but the configured "
        f"data (data.source, data.path, seq_len, tokenizer) is {pipeline.fingerprint!r}; "
        "configure the data the run used, or set --config.data.allow_new_data=True to continue "
        "on new data."
      )
    if saved_fp != pipeline.fingerprint:  # allow_new_data: read the new data from its start.
      origin = {"origin": [start_step, 0], "global_batch": config.global_batch_size}
      data_state = {"iterators": [origin]}  # Streams ignore it, and so start afresh.
    _restore_data_position(pipeline, data_state)
    logging.info("Resumed from step %d in %s.", start_step, ckpt.directory)
    if start_step >= config.steps:
      # Killed after its last save but before its final evaluation ended: evaluate now. Process
      # 0 reads the metrics and decides for all, since the evaluation is a collective.
      final_eval_missing = bool(config.eval_every) and lead and not _evaluated(workdir, start_step)
      if gather_json(final_eval_missing)[0]:
        eval_step = step_lib.jit_eval_step(config, model, mesh, rules, shardings.params)
        writer, _ = create_writers(str(workdir))
        eval_loss = _evaluate(eval_step, state.params, pipeline, writer, start_step)
        writer.close()
        ckpt.close()
        return {"eval_loss": eval_loss}
      logging.info(
        "%s is already trained to step %d (steps=%d); raise --config.steps to train on (the "
        "cosine decay follows steps unless optimizer.decay_steps is set).",
        workdir,
        start_step,
        config.steps,
      )
      ckpt.close()
      return {}
  else:
    start_step = 0
    if config.init_from:  # No random state to build and throw away: the params come from there.
      state = state_lib.init_from(config.init_from, mcfg, tx, shardings, abstract.params)
    else:
      state, _ = state_lib.create_sharded_state(model, tx, mesh, rules, config.seed, shardings)
  if lead:  # Steps logged after the restored one (all, from scratch) are trained again.
    dropped = truncate_jsonl(str(workdir / "metrics.jsonl"), start_step)
    if dropped:
      logging.info("Dropped %d metrics.jsonl records after step %d.", dropped, start_step)
    dropped = truncate_events(str(workdir), start_step)
    if dropped:
      logging.info("Dropped %d TensorBoard events after step %d.", dropped, start_step)

  config_dict = json.loads(config.to_json_best_effort())
  if lead:
    (workdir / "config.json").write_text(json.dumps(config_dict, indent=2))
    if tokenizer is not None and hasattr(tokenizer, "save"):
      tokenizer.save(str(workdir / "tokenizer"))
  writer, board = create_writers(str(workdir))
  if start_step == 0:
    writer.write_hparams(_flatten(config_dict))

  # From here a SIGTERM or Ctrl-C, even during the compile, saves at the next step's end: every
  # host of a run must get past its compile to agree on that step.
  preemption = Preemption()
  watchdog = batches = None
  try:
    train_step = step_lib.jit_train_step(config, model, tx, schedule, mesh, rules, shardings)
    eval_step = step_lib.jit_eval_step(config, model, mesh, rules, shardings.params)
    batches = pipeline.train_batches(start_step)
    batch = next(batches)
    t0 = time.perf_counter()
    with mesh_context(mesh):
      compiled = train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    tokens = config.global_batch_size * config.seq_len
    model_flops = flops.model_flops_per_token(mcfg, config.seq_len) * tokens
    xla_flops = _xla_flops(compiled)
    logging.info(
      "Compiled the train step in %.1f s. Model FLOPs/step %.3e; XLA's count %s%s.",
      compile_s,
      model_flops,
      f"{xla_flops:.3e}" if xla_flops else "n/a",
      " (scanned layers are counted once by XLA)" if mcfg.scan_layers else "",
    )
    try:
      peak = flops.device_peak_flops()
    except ValueError as e:  # An accelerator missing from the table: no MFU, but train.
      logging.warning("%s MFU is logged as NaN.", e)
      peak = float("nan")

    # Only process 0 writes the data item, so it holds every process's position (a streaming
    # source's hosts each read their own shard); all processes call this at the same steps.
    data_fn = lambda: {
      "step": None,
      "fingerprint": pipeline.fingerprint,
      "iterators": gather_json(pipeline.state()),
    }
    hooks = (
      [
        periodic_actions.ReportProgress(
          num_train_steps=config.steps, writer=board, every_steps=config.log_every
        )
      ]
      if lead
      else []
    )
    if config.profile_steps and lead:
      hooks.append(
        periodic_actions.Profile(
          logdir=str(workdir),
          num_profile_steps=config.profile_steps,
          first_profile=config.profile_start_step,
        )
      )
    watchdog = Watchdog(config.watchdog_timeout_s)
    sampler = _Sampler(config, model, tokenizer, writer) if config.sample_every else None

    pending = None
    window = LogWindow(config, mcfg, mesh.size, peak, writer)
    last: dict[str, float] = {}
    step = start_step
    log_due = 0  # A step to log once its metrics are in: read after the next step's dispatch.
    while step < config.steps:
      state, metrics = compiled(state, batch)
      step += 1
      if pending is not None:
        window.collect(*pending)
      pending = (step, metrics)
      for hook in hooks:
        hook(step)
      watchdog.beat(step)
      preempted = preemption.reached(step)
      log = step % config.log_every == 0 or step == config.steps or preempted
      # Saving, evaluating and sampling need this step's state, so they wait for it; a log line
      # alone does not: it is written after the next step is dispatched.
      sync = (
        step == config.steps
        or preempted
        or (config.eval_every and step % config.eval_every == 0)
        or (config.checkpoint_every and step % config.checkpoint_every == 0)
        or (config.sample_every and step % config.sample_every == 0)
      )
      if log_due:
        last, log_due = window.log(log_due), 0
      if log and not sync:
        log_due, log = step, False
      if sync:
        window.collect(*pending)
        pending = None
      if log:  # A preempted run logs its partial window: a resume starts a new one.
        last = window.log(step)
      pause_start = time.perf_counter()
      # Save first: an evaluation or sample that fails then loses no training.
      if (
        (config.checkpoint_every and step % config.checkpoint_every == 0)
        or step == config.steps
        or preempted
      ):
        ckpt.save(step, state, {**data_fn(), "step": step}, config_dict)
      if not preempted:
        if config.eval_every and (step % config.eval_every == 0 or step == config.steps):
          last["eval_loss"] = _evaluate(eval_step, state.params, pipeline, writer, step)
        if sampler and (step % config.sample_every == 0 or step == config.steps):
          sampler(step, state.params)
      window.paused += time.perf_counter() - pause_start
      if step != config.steps and not preempted:
        batch = next(batches)
      if preempted:
        ckpt.wait()
        logging.warning(
          "%s (%s): saved step %d in %s; rerun the same command to resume.",
          "Interrupted" if preemption.cause == "Ctrl-C" else "Preempted",
          preemption.cause,
          step,
          ckpt.directory,
        )
        if preemption.cause == "Ctrl-C":
          raise SavedInterrupt
        break
  finally:
    preemption.close()
    if watchdog is not None:
      watchdog.stop()
    if batches is not None:
      batches.close()  # Stops data workers and frees their shared memory now, not at exit.
    ckpt.close()
    writer.close()
  return last


def _restore_data_position(pipeline: Any, data_state: dict[str, Any]) -> None:
  """Hands every process's saved data position to the pipeline, which takes its own (synthetic
  data saves none)."""
  positions = data_state.get("iterators")
  if positions is None:  # Saved by one process before positions were gathered.
    positions = [data_state.get("iterator") or {}]
  if any(positions):
    pipeline.restore(positions)


def _evaluated(workdir: Any, step: int) -> bool:
  """Whether metrics.jsonl in `workdir` records an evaluation at `step`."""
  path = str(workdir / "metrics.jsonl")
  if not epath.Path(path).exists():
    return False
  return any(r.get("step") == step and "eval_loss" in r for r in read_jsonl(path))


def _evaluate(eval_step: Any, params: Any, pipeline: Any, writer: Any, step: int) -> float:
  """The eval loss of `params` on the held-out batches, written and logged at `step`."""
  total = None
  for batch in pipeline.eval_batches():
    m = eval_step(params, batch)
    total = m if total is None else total.merge(m)
  eval_loss = float(total.compute()["eval_loss"]) if total is not None else float("nan")
  writer.write_scalars(step, {"eval_loss": eval_loss})
  logging.info("step %d: eval loss %.4f", step, eval_loss)
  return eval_loss


def _xla_flops(compiled: Any) -> float | None:
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost.get("flops", 0.0)) or None
  except Exception:  # noqa: BLE001 - not every backend offers a cost model.
    return None


class _Sampler:
  """Writes a generated sample to TensorBoard every `sample_every` steps."""

  def __init__(self, config: Any, model: Llama3, tokenizer: Any, writer: Any):
    self.config, self.model, self.tokenizer, self.writer = config, model, tokenizer, writer

  def __call__(self, step: int, params: Any) -> None:
    if self.tokenizer is None:
      return
    from model.generate import sample_text  # noqa: PLC0415

    text = sample_text(
      self.model.config,
      params,
      self.tokenizer,
      self.config.sample_prompt,
      max_new_tokens=self.config.sample_max_new_tokens,
    )
    logging.info("Sample at step %d: %r", step, text)
    self.writer.write_texts(step, {"sample": text})


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "."))
    elif isinstance(v, bool | int | float | str):
      out[key] = v
    else:
      out[key] = str(v)
  return out
