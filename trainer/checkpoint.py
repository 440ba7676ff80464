"""Orbax checkpoints: async saves of state + data state + config, restore with fallback."""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from data.batching import on_every_host
from model import ModelConfig
from model.config import SIZE_FIELDS

# Fields that change the parameter shapes; any difference makes a checkpoint incompatible.
_SHAPE_FIELDS = (*SIZE_FIELDS, "tie_embeddings", "scan_layers")


def absolute(path: str) -> epath.Path:
  """`path` made absolute when local (Orbax refuses relative paths); URLs pass through."""
  return epath.Path(path if "://" in str(path) else os.path.abspath(path))


class CheckpointMismatchError(ValueError):
  """A checkpoint written for a different model shape."""


def shape_mismatch(saved_model: dict[str, Any], model: ModelConfig) -> list[str]:
  """'field: saved -> now' for every shape-defining field that differs."""
  now = model.to_dict()
  return [
    f"{k}: {saved_model.get(k)!r} -> {now[k]!r}"
    for k in _SHAPE_FIELDS
    if k in saved_model and saved_model[k] != now[k]
  ]


class Checkpointer:
  """One CheckpointManager under WORKDIR/checkpoints; saves are asynchronous."""

  def __init__(
    self, workdir: str, *, max_to_keep: int = 3, keep_period: int = 0, async_save: bool = True
  ):
    self.directory = absolute(workdir) / "checkpoints"
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep or None,
      keep_period=keep_period or None,
      create=True,
      enable_async_checkpointing=async_save,
      # A save killed mid-write leaves a *.orbax-checkpoint-tmp dir; the next run removes it.
      cleanup_tmp_directories=True,
    )
    # Handlers named up front, so that a step's state metadata (its tree) reads without
    # restoring it.
    handlers = {
      "state": ocp.StandardCheckpointHandler(),
      "data": ocp.JsonCheckpointHandler(),
      "config": ocp.JsonCheckpointHandler(),
    }
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def all_steps(self) -> list[int]:
    """Steps with a checkpoint on disk, oldest first."""
    return sorted(self.manager.all_steps())

  def save(
    self,
    step: int,
    state: Any,
    data_state: dict[str, Any],
    config_dict: dict[str, Any],
    *,
    force: bool = True,
  ) -> bool:
    """Starts an asynchronous save; returns at once while the write goes on."""
    return self.manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config_dict),
      ),
      force=force,
    )

  def saved_config(self, step: int) -> dict[str, Any]:
    """The run config saved with the checkpoint of `step`."""
    return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))[
      "config"
    ]

  def restore_latest(
    self, abstract_state: Any, model: ModelConfig, optimizer: dict[str, Any] | None = None
  ) -> tuple[Any, dict[str, Any], int] | None:
    """(state, data_state, step) of the newest checkpoint that restores, or None if none.

    A checkpoint that fails to restore (truncated or corrupted files) is reported in one line,
    set aside in checkpoints_corrupt/ and the previous one is tried; nothing is deleted. When
    none restores, that is an error rather than a fresh start. A checkpoint of a different
    model shape, or whose optimizer state has other entries (`optimizer`, the run's optimizer
    settings, names what changed), is an error, not a fallback.
    """
    set_aside, failed_reads = [], []
    with _quiet_unraisable(failed_reads):
      restored = self._restore_newest(
        abstract_state, model, optimizer or {}, set_aside, failed_reads
      )
    if restored is None and set_aside:
      raise ValueError(
        f"No checkpoint in {self.directory} restores: steps {set_aside} were moved to "
        f"{self.directory.parent / 'checkpoints_corrupt'}. Rerun to train this --workdir from "
        "step 0 (its metrics start over too), or use a new --workdir."
      )
    return restored

  def _restore_newest(
    self,
    abstract_state: Any,
    model: ModelConfig,
    optimizer: dict[str, Any],
    set_aside: list,
    failed_reads: list,
  ) -> tuple[Any, dict[str, Any], int] | None:
    """The newest checkpoint that restores (see restore_latest); appends the steps set aside to
    `set_aside` and every read that failed on this host to `failed_reads`."""
    for step in reversed(self.all_steps()):
      saved, error = None, None
      try:
        saved = self.saved_config(step)
      except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back.
        error = e
        failed_reads.append(step)
      # Every host takes the same branch, or the ones that did not would wait in a collective.
      if not on_every_host(error is None):
        # Set aside like a failed restore: left in place, the step would block the save of
        # the same step later in this run.
        self._fall_back(step, "is unreadable", error)
        set_aside.append(step)
        continue
      saved_model = saved.get("model", {})
      diff = shape_mismatch(saved_model, model)
      if diff:
        raise CheckpointMismatchError(
          f"The checkpoint in {self.directory} (step {step}) is of another model "
          f"({'; '.join(diff)}); use a new --workdir or the matching --config.model values."
        )
      dtype = saved_model.get("param_dtype")
      if dtype is not None and dtype != model.param_dtype:
        raise CheckpointMismatchError(
          f"The checkpoint in {self.directory} (step {step}) holds {dtype} parameters but "
          f"model.param_dtype is {model.param_dtype}; set --config.model.param_dtype={dtype}, "
          f"or start a new --workdir with --config.init_from={self.directory.parent}."
        )
      entries = self._state_entries_differ(step, abstract_state, failed_reads)
      if not on_every_host(not entries):
        changed = [
          f"optimizer.{k}: {v!r} -> {optimizer[k]!r}"
          for k, v in saved.get("optimizer", {}).items()
          if k in optimizer and v != optimizer[k]
        ]
        shown = entries[:1] + [e for e in entries if e.startswith("config only")][:1]
        raise CheckpointMismatchError(
          f"The checkpoint in {self.directory} (step {step}) holds a training state with other "
          f"entries than this config's ({'; '.join(dict.fromkeys(shown)) or 'seen on another host'}"
          f"; changed: {', '.join(changed) or 'no optimizer setting'}); resume with the run's "
          f"settings ({self.directory.parent / 'config.json'}), or start a new --workdir with "
          f"--config.init_from={self.directory.parent}."
        )
      restored = None
      try:
        restored = self.manager.restore(
          step,
          args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
          ),
        )
      except Exception as e:  # noqa: BLE001
        error = e
        failed_reads.append(step)
      if not on_every_host(error is None):
        self._fall_back(step, "failed to restore", error)
        set_aside.append(step)
        continue
      return restored["state"], restored["data"], step
    return None

  def _state_entries_differ(self, step: int, abstract_state: Any, failed_reads: list) -> list[str]:
    """The state entries (paths) that only one of step `step` and `abstract_state` has; empty
    when they match or when the saved tree cannot be read (the restore then says why; the
    failed read is appended to `failed_reads`)."""
    try:
      saved = self.manager.item_metadata(step)["state"]
    except Exception:  # noqa: BLE001 - unreadable metadata is the restore's failure to report.
      failed_reads.append(step)
      return []
    if saved is None:
      return []
    saved_paths, now_paths = _leaf_paths(getattr(saved, "tree", saved)), _leaf_paths(abstract_state)
    return [f"saved only: {p}" for p in sorted(saved_paths - now_paths)] + [
      f"config only: {p}" for p in sorted(now_paths - saved_paths)
    ]

  def _fall_back(self, step: int, what: str, error: BaseException | None) -> None:
    """Sets `step` aside, saying why (`error` is None where another host failed)."""
    logging.warning(
      "Checkpoint at step %d %s (%s); moved it to %s and trying an older one.",
      step,
      what,
      _first_line(error) if error else "on another host",
      self._set_aside(step),
    )

  def _set_aside(self, step: int) -> epath.Path:
    """Moves an unrestorable step out of the manager's sight (never deletes it)."""
    target = self.directory.parent / "checkpoints_corrupt" / f"{step}-{int(time.time())}"
    if jax.process_index() == 0:
      target.parent.mkdir(parents=True, exist_ok=True)
      (self.directory / str(step)).rename(target)
    self._sync("set_aside")
    self.manager.reload()
    return target

  def _sync(self, name: str) -> None:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # noqa: PLC0415

      multihost_utils.sync_global_devices(f"checkpoint_{name}")

  def wait(self) -> None:
    """Blocks until every save in flight is on disk."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    """Waits for saves in flight, then releases the manager."""
    self.manager.wait_until_finished()
    self.manager.close()


def _leaf_paths(tree: Any) -> set[str]:
  """'opt_state/1/mu/embed'-style paths of a tree's leaves: a NamedTuple's field and a dict's
  key of the same name count as the same entry (the saved tree has only dicts and lists)."""
  paths = set()
  for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
    parts = []
    for k in path:
      parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
    paths.add("/".join(parts))
  return paths


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  # TensorStore appends a bound-method repr of its spec to the message; the cause says more.
  first = re.split(r"\.?\s*See full TensorStore details", text[0] if text else "")[0]
  cause = e.__cause__ or e.__context__
  if cause is not None and str(cause).strip():
    first += f" ({str(cause).strip().splitlines()[0]})"
  return f"{type(e).__name__}: {first}"[:300]


@contextlib.contextmanager
def _log_level(name: str, level: int) -> Iterator[None]:
  """Logger `name` at `level` inside the block, at its own level again after it."""
  logger = logging.getLogger(name)
  before = logger.level
  logger.setLevel(level)
  try:
    yield
  finally:
    logger.setLevel(before)


@contextlib.contextmanager
def _quiet_unraisable(failures: list) -> Iterator[None]:
  """Drops the 'Exception ignored in: <coroutine ...>' reports that a failed Orbax read leaves
  for the garbage collector (each with a full TensorStore spec); the failure itself is logged.
  The caller appends to `failures` for each failed read: only then is there garbage to collect
  here (a full collection took half a second per run in the test process)."""
  hook = sys.unraisablehook
  sys.unraisablehook = lambda unraisable: None
  # Orbax's reads run as asyncio tasks; a failed one is also logged as never retrieved.
  with _log_level("asyncio", logging.CRITICAL):
    try:
      yield
    finally:
      if failures:
        gc.collect()
      sys.unraisablehook = hook


def restore_params(
  workdir: str, step: int | None = None, *, on_host: bool = False
) -> tuple[ModelConfig, Any]:
  """(ModelConfig, params) of a training run's newest (or given) checkpoint, on this host.

  Only the parameters are read (not the optimizer moments), onto the first local device, or
  with `on_host` into numpy arrays (for a caller that places them itself).
  """
  import flax.linen as nn  # noqa: PLC0415

  from model import Llama3  # noqa: PLC0415

  run_dir = absolute(workdir)
  config_path = run_dir / "config.json"
  if not config_path.exists():
    hint = (
      "it holds parameters from model.hf import; use the Hugging Face dir they came from"
      if (run_dir / "model_config.json").exists()
      else "pass the --workdir of a training run"
    )
    raise FileNotFoundError(f"{config_path} does not exist; {hint}.")
  try:
    mcfg = ModelConfig(**json.loads(config_path.read_text())["model"])
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(
      f"{config_path} is not a run's config ({type(e).__name__}: {e}); copy it back from the "
      f"one each checkpoint holds ({run_dir / 'checkpoints' / 'STEP' / 'config' / 'metadata'})."
    ) from None
  with _log_level("absl", logging.ERROR):  # Orbax warns that a read-only directory is so.
    manager = ocp.CheckpointManager(
      run_dir / "checkpoints",
      item_names=("state", "data", "config"),
      options=ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False),
    )
  steps = sorted(manager.all_steps())
  if not steps:
    manager.close()
    raise FileNotFoundError(
      f"{workdir} has no checkpoints yet; train first or pass another run's dir."
    )
  device = jax.local_devices()[0]
  sharding = jax.sharding.SingleDeviceSharding(device)
  model = Llama3(mcfg.replace(attention="xla"))  # Shapes only: any kernel gives the same.
  shapes = jax.eval_shape(
    lambda: nn.unbox(model.init(jax.random.key(0), jax.numpy.zeros((1, 8), "int32")))
  )["params"]
  item = {
    "params": jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes
    )
  }
  restore_args = ocp.checkpoint_utils.construct_restore_args(item)
  if on_host:
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
  args = ocp.args.Composite(
    state=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
  )
  if step is not None and step not in steps:
    manager.close()
    raise FileNotFoundError(f"{workdir} has no checkpoint of step {step}; it has {steps}.")
  errors = []
  try:
    with _quiet_unraisable(errors):
      for s in [step] if step is not None else reversed(steps):
        try:
          params = manager.restore(s, args=args)["state"]["params"]
          logging.info("Read the parameters of step %d from %s.", s, run_dir / "checkpoints")
          return mcfg, params
        except Exception as e:  # noqa: BLE001 - a corrupt checkpoint falls back to an older one.
          # Reads still in flight finish into Orbax's closed event loop and print a traceback
          # each; let them land while those reports are muted.
          time.sleep(0.5)
          errors.append(f"step {s}: {_first_line(e)}")
          logging.warning("Checkpoint at step %d failed to restore (%s).", s, _first_line(e))
  finally:
    manager.close()
  raise ValueError(
    f"No checkpoint in {run_dir / 'checkpoints'} restores ({'; '.join(errors)}); "
    f"pass another run's dir."
  )
