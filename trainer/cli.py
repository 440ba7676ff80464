"""Command-line plumbing shared by the trainer, the benchmark and the planner: flags and config
files whose errors end in one line, the one line for a device out of memory, and progress lines
(no heavy imports, as in trainer.checks)."""

from __future__ import annotations

import os
import re
import sys
import time
from typing import Any


def _raised_in_config_file(argv: list[str], error: BaseException) -> str | None:
  """'FILE line N raised X: ...' when `error`, or an exception it wraps, came from the code of the
  --config file itself (ml_collections wraps what get_config() raises)."""
  import traceback  # noqa: PLC0415

  paths = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
  if not paths:
    return None
  path = os.path.realpath(paths[-1].split(":", 1)[0])
  todo, seen, innermost = [error], set(), error
  while todo:
    e = todo.pop()
    if id(e) in seen:
      continue
    seen.add(id(e))
    innermost = e
    frames = traceback.extract_tb(e.__traceback__)
    mine = [f for f in frames if os.path.realpath(f.filename) == path]
    if mine:
      return f"{mine[-1].filename} line {mine[-1].lineno} raised {type(e).__name__}: {e}"
    todo += [x for x in (e.__cause__, e.__context__, *e.args) if isinstance(x, BaseException)]
  if "Error whilst parsing config file" in str(error):  # e.g. get_config() with parameters
    return f"loading {paths[-1]} raised {type(innermost).__name__}: {innermost}"
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing where a bad flag or config key ends in one line, not a traceback."""
  from absl import flags  # noqa: PLC0415

  try:
    return flags.FLAGS(argv)
  except SyntaxError as e:  # The config file is Python, loaded while the flags are parsed.
    sys.exit(f"error: {e.filename} line {e.lineno} does not parse ({e.msg}); fix the file.")
  except Exception as e:  # noqa: BLE001 - one line whatever the flags or the config file raise.
    raised = _raised_in_config_file(argv, e)
    if raised:
      sys.exit(f"error: {raised}; fix the file.")
    # A bad key arrives as AttributeError(KeyError(message)); str() of a KeyError is a repr.
    while e.args and isinstance(e.args[0], BaseException):
      e = e.args[0]
    text = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
    message = "; ".join(" ".join(line.split()) for line in text.splitlines() if line.strip())
    if "has no attribute 'get_config'" in message:
      sys.exit(
        "error: the --config file has no get_config(); define one that returns an "
        "ml_collections.ConfigDict, as configs/*.py do."
      )
    if isinstance(e, KeyError | AttributeError):
      message = f"unknown config key: {message}"
    fixed = re.search(
      r"Type <class '(\w+)'> of field config\.(\S+) is not supported for over", message
    )
    if fixed:  # ml_collections cannot override a None (or other such) value from the flags.
      kind = "None" if fixed.group(1) == "NoneType" else f"a {fixed.group(1)}"
      hint = (
        " (model.rope_scaling: --config.model.rope_scaling.factor=1.0 on a config that has "
        "Llama 3.1 scaling turns it off)"
        if fixed.group(2) == "model.rope_scaling"
        else ""
      )
      sys.exit(
        f"error: {fixed.group(2)} is {kind} in this config file, which cannot be changed on the "
        f"command line; set it in the config file{hint}."
      )
    sys.exit(
      f"error: {message} (run with --helpfull for the flags; config keys are in configs/base.py)"
    )


def out_of_memory(error: BaseException) -> str | None:
  """The one line for a device out-of-memory error (at compile or at run time), else None."""
  text = str(error)
  if "RESOURCE_EXHAUSTED" not in text:
    return None
  first = " ".join(text.strip().splitlines()[0].split())
  return (
    f"The train step does not fit in device memory ({first[:300]}); set "
    "--config.model.remat=full, raise --config.grad_accum_steps or lower "
    "--config.global_batch_size (`python -m launch.plan` sizes a TPU run before it starts)."
  )


def load_config(flag: Any) -> Any:
  """The config of a `--config` flag, loaded now (it loads lazily, on first use); a file that
  does not load is one ValueError."""
  try:
    config = flag.value
    config.steps  # noqa: B018
  except OSError as e:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    raise ValueError(f"--config does not load ({lines[-1]}); pass a configs/*.py file.") from None
  return config


def progress(message: str) -> None:
  """A timestamped line on stderr, for work that runs minutes (compiles, benchmark rounds)."""
  print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
