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
  from trainer.loop import TrainingError, train_and_evaluate  # noqa: PLC0415

  logging.getLogger().setLevel(logging.INFO)
  logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax and CLU are chatty at INFO.
  from trainer.checks import load_config  # noqa: PLC0415

  try:
    train_and_evaluate(load_config(_CONFIG), _WORKDIR.value)
  except (ValueError, FileNotFoundError, TrainingError) as e:
    if os.environ.get("LLAMA_TRACEBACK"):
      raise
    sys.exit(f"error: {e}")


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing where a bad flag or config key ends in one line, not a traceback."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    # A bad key arrives as AttributeError(KeyError(message)); str() of a KeyError is a repr.
    while e.args and isinstance(e.args[0], BaseException):
      e = e.args[0]
    text = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
    message = "; ".join(" ".join(line.split()) for line in text.splitlines() if line.strip())
    if isinstance(e, KeyError | AttributeError):
      message = f"unknown config key: {message}"
    sys.exit(
      f"error: {message} (run with --helpfull for the flags; config keys are in configs/base.py)"
    )


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
