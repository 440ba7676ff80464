"""Run one command as N hosts of a JAX cluster on this machine, M fake CPU devices each.

  python -m launch.local --processes=2 --devices_per_process=4 -- python my_script.py
  python -m launch.local --processes=2 --devices_per_process=4 -- --config=configs/tiny.py \
      --workdir=runs/tiny2

A command that starts with a flag is taken as arguments of `python -m trainer.train`. Each child
learns its place from the variables in `trainer.distributed`, which `maybe_initialize()` reads.
Output is prefixed `[pI]`. If a child fails, the others get SIGTERM, then SIGKILL after
`--grace_s`; SIGTERM/SIGINT sent to the launcher are forwarded to every child (a simulated
preemption), and on Linux a kill -9 of the launcher kills them too. Exit status: 0 when every
child exits 0, else the first failure's.
"""

import argparse
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TextIO

from trainer.distributed import launcher_env

_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
_POLL_S = 0.05
_PR_SET_PDEATHSIG = 1


PREEMPTION_GRACE_S = 120.0


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on right now."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def child_env(
  base: Mapping[str, str], coordinator: str, processes: int, process_id: int, devices: int
) -> dict[str, str]:
  """`base` plus the cluster variables; keeps other XLA flags, replaces any device count."""
  env = dict(base)
  env.update(launcher_env(coordinator, processes, process_id, devices))
  kept = [f for f in base.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_COUNT_FLAG)]
  env["XLA_FLAGS"] = " ".join([*kept, env["XLA_FLAGS"]])
  # Children write into pipes; unbuffered output is what makes the stream live.
  env["PYTHONUNBUFFERED"] = "1"
  return env


def resolve_command(command: Sequence[str]) -> list[str]:
  """The command to run; bare flags mean the trainer, and `python` this interpreter."""
  if not command:
    raise ValueError("Nothing to run: put the command after `--`, e.g. `-- python script.py`.")
  if command[0].startswith("-"):
    return [sys.executable, "-m", "trainer.train", *command]
  if command[0] in ("python", "python3"):
    # The PATH's python may be another environment without this project (no venv activated).
    return [sys.executable, *command[1:]]
  if shutil.which(command[0]) is None:
    raise ValueError(f"{command[0]!r} is not a command on PATH; check the command after `--`.")
  return list(command)


def _exit_status(returncode: int) -> int:
  # A child killed by signal S has returncode -S; shells report that as 128 + S.
  return 128 - returncode if returncode < 0 else returncode


class _Printer:
  """Copies each child's output to `out` line by line, prefixed with its process index."""

  def __init__(self, out: TextIO):
    self._out = out
    self._lock = threading.Lock()

  def write(self, line: str) -> None:
    with self._lock:
      self._out.write(line)
      self._out.flush()

  def pump(self, index: int, pipe) -> threading.Thread:
    def run() -> None:
      with pipe:
        for raw in iter(pipe.readline, b""):
          text = raw.decode("utf-8", errors="replace").rstrip("\n")
          self.write(f"[p{index}] {text}\n")

    thread = threading.Thread(target=run, name=f"launch-p{index}", daemon=True)
    thread.start()
    return thread


def _die_with_launcher() -> Callable[[], None] | None:
  """A `preexec_fn` that has Linux SIGKILL the child when the launcher dies, even by SIGKILL."""
  if not sys.platform.startswith("linux"):
    return None
  prctl = ctypes.CDLL(None, use_errno=True).prctl  # Looked up here, not in the forked child.
  launcher = os.getpid()

  def preexec() -> None:
    prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != launcher:  # The launcher died before prctl took effect.
      os._exit(1)

  return preexec


def _signal_all(procs: Sequence[subprocess.Popen], sig: int) -> None:
  for p in procs:
    if p.poll() is None:
      try:
        p.send_signal(sig)
      except ProcessLookupError:
        pass


def _stop(procs: Sequence[subprocess.Popen], grace_s: float, sig: int = signal.SIGTERM) -> None:
  """Send `sig` to the children still running, then SIGKILL whatever outlives the grace period.

  JAX catches SIGTERM once `jax.distributed` is up (it is its preemption notice), so a child
  stuck in a collective with a dead peer only ever leaves through SIGKILL.
  """
  _signal_all(procs, sig)
  deadline = time.monotonic() + grace_s
  while time.monotonic() < deadline and any(p.poll() is None for p in procs):
    time.sleep(_POLL_S)
  _signal_all(procs, signal.SIGKILL)
  for p in procs:
    p.wait()


def run(
  command: Sequence[str],
  processes: int,
  devices_per_process: int,
  *,
  grace_s: float = 10.0,
  out: TextIO | None = None,
  env: Mapping[str, str] | None = None,
) -> int:
  """Runs `command` as `processes` cluster hosts; returns the exit status to report."""
  if processes < 1 or devices_per_process < 1:
    raise ValueError("--processes and --devices_per_process must be at least 1.")
  argv = resolve_command(command)
  printer = _Printer(out if out is not None else sys.stdout)
  base = dict(os.environ if env is None else env)
  coordinator = f"127.0.0.1:{free_port()}"

  received: list[int] = []

  def forward(signum: int, frame) -> None:
    received.append(signum)

  in_main_thread = threading.current_thread() is threading.main_thread()
  previous = {}
  if in_main_thread:
    # Installed before the children start so no signal falls between the two.
    for sig in (signal.SIGTERM, signal.SIGINT):
      previous[sig] = signal.signal(sig, forward)

  procs: list[subprocess.Popen] = []
  pumps: list[threading.Thread] = []
  try:
    # All children are forked before any reader thread starts: a preexec_fn is only safe to run
    # in a child forked from a process without other threads. Until then the pipes buffer.
    preexec = _die_with_launcher()
    for i in range(processes):
      p = subprocess.Popen(
        argv,
        env=child_env(base, coordinator, processes, i, devices_per_process),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        # Own session: a Ctrl-C in the terminal reaches the children once, through us. A kill -9
        # of the launcher reaches them through the death signal set by `preexec`.
        start_new_session=True,
        preexec_fn=preexec,
      )
      procs.append(p)
    pumps = [printer.pump(i, p.stdout) for i, p in enumerate(procs)]

    failure: int | None = None
    forwarded = 0
    stop_deadline: float | None = None
    while True:
      while forwarded < len(received):
        sig = received[forwarded]
        forwarded += 1
        if forwarded > 1:  # A second signal means: stop now.
          printer.write("[launch] a second signal: SIGKILL to all processes\n")
          _signal_all(procs, signal.SIGKILL)
        else:
          printer.write(f"[launch] forwarding {signal.Signals(sig).name} to all processes\n")
          _signal_all(procs, sig)
          # A forwarded SIGTERM is a preemption notice: the trainers save first, so they get the
          # time a cloud VM would give them, not just the crash grace.
          stop_deadline = time.monotonic() + max(grace_s, PREEMPTION_GRACE_S)
      codes = [p.poll() for p in procs]
      # After a forwarded Ctrl-C, exit status 130 is each trainer's answer (it saved), not a
      # failure to stop the others for: they are finishing the same save.
      done = (None, 0, 130) if received[:1] == [signal.SIGINT] else (None, 0)
      failed = [(i, c) for i, c in enumerate(codes) if c not in done]
      if failed:
        i, code = failed[0]
        failure = _exit_status(code)
        if any(c is None for c in codes):
          printer.write(f"[launch] process {i} exited with {failure}; stopping the others\n")
          _stop(procs, grace_s)
        break
      if all(c is not None for c in codes):
        break
      if stop_deadline is not None and time.monotonic() > stop_deadline:
        printer.write("[launch] processes still running long after the signal: SIGKILL\n")
        _signal_all(procs, signal.SIGKILL)
        stop_deadline = None
      time.sleep(_POLL_S)
  finally:
    # Whatever happened above (even an exception here), leave no child behind.
    _stop(procs, grace_s)
    for t in pumps:
      t.join(timeout=5.0)
    for sig, handler in previous.items():
      signal.signal(sig, handler)
  if failure is not None:
    return failure
  statuses = [_exit_status(p.returncode) for p in procs]
  return next((s for s in statuses if s != 0), 0)


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry: flags before `--`, the command after it."""
  argv = list(sys.argv[1:] if argv is None else argv)
  cut = argv.index("--") if "--" in argv else len(argv)
  parser = argparse.ArgumentParser(
    prog="python -m launch.local", description=__doc__.split("\n")[0]
  )
  parser.add_argument("--processes", type=int, default=2, help="number of simulated hosts")
  parser.add_argument("--devices_per_process", type=int, default=4, help="fake CPU devices each")
  parser.add_argument("--grace_s", type=float, default=10.0, help="SIGTERM to SIGKILL, seconds")
  args = parser.parse_args(argv[:cut])
  try:
    return run(argv[cut + 1 :], args.processes, args.devices_per_process, grace_s=args.grace_s)
  except ValueError as e:
    parser.error(str(e))


if __name__ == "__main__":
  sys.exit(main())
