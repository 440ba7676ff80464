"""A hang watchdog and a preemption flag, so a pod run never hangs and never loses work."""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

import jax


class Watchdog:
  """Dumps every thread's stack and exits non-zero when no step finishes for `timeout_s`."""

  def __init__(self, timeout_s: float, exit_code: int = 70):
    self.timeout_s, self.exit_code = float(timeout_s), exit_code
    self._last = time.monotonic()
    self._step = -1
    self._stop = threading.Event()
    self._thread = None
    if self.timeout_s > 0:
      self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)
      self._thread.start()

  def beat(self, step: int) -> None:
    """Progress: `step` just ended, so the clock starts again."""
    self._last, self._step = time.monotonic(), step

  def _run(self) -> None:
    while not self._stop.wait(min(5.0, self.timeout_s / 4)):
      idle = time.monotonic() - self._last
      if idle > self.timeout_s:
        logging.error(
          "Watchdog: no step finished for %.0f s after step %d (limit "
          "watchdog_timeout_s=%.0f); a collective may be stuck or a host dead. "
          "Stacks follow; exiting.",
          idle,
          self._step,
          self.timeout_s,
        )
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        os._exit(self.exit_code)

  def stop(self) -> None:
    """Ends the watching thread."""
    self._stop.set()


class SavedInterrupt(KeyboardInterrupt):
  """A Ctrl-C after which the run saved its state (and said so)."""


class Preemption:
  """Turns SIGTERM, and the first Ctrl-C (SIGINT), into 'save at the next step boundary', agreed
  on by every host; a second Ctrl-C stops at once."""

  def __init__(self):
    self._flag = threading.Event()
    self.cause = "SIGTERM"
    self._multihost = jax.process_count() > 1
    self._previous: dict[int, Any] = {}
    if threading.current_thread() is not threading.main_thread():
      return
    if not self._multihost:
      self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, lambda *_: self._flag.set())
    # With several hosts, JAX's coordination service owns SIGTERM and agrees on the step to stop
    # at, so a Ctrl-C (which reaches the hosts at different steps) is passed on to it as one.
    self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_sigint)

  def _on_sigint(self, *_: Any) -> None:
    if self.cause == "Ctrl-C" or self._flag.is_set():
      raise KeyboardInterrupt
    self.cause = "Ctrl-C"
    if self._multihost:
      os.kill(os.getpid(), signal.SIGTERM)
    else:
      self._flag.set()
    print(
      "Interrupted: saving at the end of this step (Ctrl-C again stops sooner, without it).",
      file=sys.stderr,
      flush=True,
    )

  def reached(self, step: int) -> bool:
    """True at the step boundary where every host should save and exit."""
    if self._multihost:
      from jax.experimental import multihost_utils  # noqa: PLC0415

      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:
        return False
    return self._flag.is_set()

  def close(self) -> None:
    """Gives the signals back to the handlers they had before."""
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}
