"""Entry point: python -m trainer.train --config=configs/NAME.py --workdir=DIR [--config.K=V]."""

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, metrics.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  from trainer import distributed, tpu_flags  # noqa: PLC0415 - before anything touches devices.

  tpu_flags.init_args()
  distributed.maybe_initialize()
  from trainer.log_window import TrainingError  # noqa: PLC0415
  from trainer.loop import train_and_evaluate  # noqa: PLC0415
  from trainer.watchdog import SavedInterrupt  # noqa: PLC0415

  logging.getLogger().setLevel(logging.INFO)
  logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax and CLU are chatty at INFO.
  import jax  # noqa: PLC0415

  from trainer.cli import load_config, out_of_memory  # noqa: PLC0415

  try:
    train_and_evaluate(load_config(_CONFIG), _WORKDIR.value)
  except (ValueError, FileNotFoundError, TrainingError, jax.errors.JaxRuntimeError) as e:
    oom = out_of_memory(e)
    if os.environ.get("LLAMA_TRACEBACK") or (isinstance(e, RuntimeError) and not oom):
      raise
    _exit(1, f"error: {oom or e}")
  except KeyboardInterrupt as e:
    if isinstance(e, SavedInterrupt):  # Every host saved together and said so.
      sys.exit(130)
    _exit(130, "Interrupted; rerun the same command to resume from the newest checkpoint.")


def _exit(code: int, message: str) -> None:
  """Exits with `message` on stderr. A host of a multi-host run leaves at once: at a normal exit
  it would wait for the other hosts at JAX's shutdown barrier, while they wait for it in theirs."""
  import jax  # noqa: PLC0415

  print(message, file=sys.stderr)
  if jax.process_count() == 1:
    sys.exit(code)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


if __name__ == "__main__":
  from trainer.cli import parse_flags

  app.run(main, flags_parser=parse_flags)
