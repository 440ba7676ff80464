"""An ordered map over worker processes that stop with their parent, however it ends."""

from __future__ import annotations

import collections
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any


def ordered_map(
  fn: Callable[[Any], Any],
  items: Iterable[Any],
  num_workers: int,
  initializer: Callable[..., None],
  initargs: tuple,
) -> Iterator[Any]:
  """fn over items in worker processes, in input order, with at most 2 items per worker queued.

  With `num_workers` <= 0 everything runs here. Closing the iterator, or an error in it, ends the
  workers at once; a worker whose parent is killed (SIGKILL, the OOM killer) exits by itself.
  """
  if num_workers <= 0:
    initializer(*initargs)
    yield from map(fn, items)
    return
  # spawn, not fork: the caller may be a trainer with JAX threads running. An executor, not a
  # Pool: a worker that dies (OOM) raises BrokenProcessPool instead of hanging forever.
  ctx = multiprocessing.get_context("spawn")
  start_args = (os.getpid(), initializer, *initargs)
  ex = ProcessPoolExecutor(num_workers, ctx, initializer=_start_worker, initargs=start_args)
  pending: collections.deque = collections.deque()
  try:
    for item in items:
      pending.append(ex.submit(fn, item))
      if len(pending) >= 2 * num_workers:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()
  except BaseException:
    # Stopped (an error, Ctrl-C, SIGTERM): drop the queued work and end the workers now rather
    # than after the items they hold.
    processes = list(getattr(ex, "_processes", {}).values())
    ex.shutdown(wait=False, cancel_futures=True)
    for proc in processes:
      proc.terminate()
    raise
  ex.shutdown()


def _start_worker(parent: int, initializer: Callable[..., None], *initargs: Any) -> None:
  threading.Thread(target=exit_with_parent, args=(parent,), daemon=True).start()
  initializer(*initargs)


def exit_with_parent(parent: int) -> None:
  """Ends this worker process once its parent `parent` has died without stopping it (SIGKILL,
  the OOM killer); run it in a daemon thread."""
  while os.getppid() == parent:
    time.sleep(1.0)
  os._exit(1)
