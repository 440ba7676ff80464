"""data.prepare stopped or failing part-way: SIGTERM, SIGKILL, a dead worker, a full disk, a
dead run's leftovers. Nothing half-written is left, and no worker outlives its run."""

import os
import signal
import subprocess
import sys

import pytest

from data.prepare import prepare
from tests.common import child_pids, command_of, is_running, wait_until

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dead_runs_temporary_dirs_are_removed(tmp_path):
  import socket

  (tmp_path / "ok.txt").write_text("hello")
  host = socket.gethostname()
  dead = tmp_path / f"out.tmp-{host}-{2**22 + 12345}"  # Above Linux's pid_max default: unused.
  live = tmp_path / f"out.tmp-{host}-1"  # pid 1 is alive.
  other = tmp_path / f"out.tmp-{host}x-{2**22 + 12345}"  # Another host's: not ours to judge.
  for p in (dead, live, other):
    p.mkdir()
  prepare(str(tmp_path / "ok.txt"), str(tmp_path / "out"), seq_len=8, num_workers=0)
  assert not dead.exists() and live.exists() and other.exists()


_STOPPABLE = """
import signal, sys, time
from data import prepare as P
from data.sources import Chunk, Source

class Slow(Source):
  name = "slow"
  def chunks(self, chunk_bytes):
    yield Chunk("texts", ["hello world"] * 10, "slow")
    time.sleep(300)
    yield Chunk("texts", ["never read"], "slow")

signal.signal(signal.SIGTERM, P._interrupt)
try:
  P.prepare("slow", sys.argv[1], seq_len=8, num_workers=2, source=Slow(), progress=False)
except KeyboardInterrupt:
  sys.exit("interrupted")
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_a_stopped_run_leaves_no_workers_and_no_partial_output(tmp_path, sig):
  """SIGTERM: the run removes its partial output and stops its workers; SIGKILL: the workers
  notice their parent is gone and exit by themselves."""
  out = tmp_path / "out"
  proc = subprocess.Popen(
    [sys.executable, "-c", _STOPPABLE, str(out)], cwd=REPO, stderr=subprocess.PIPE, text=True
  )
  try:
    # Workers are the children other than multiprocessing's resource tracker.
    def workers():
      return [c for c in child_pids(proc.pid) if b"resource_tracker" not in command_of(c)]

    assert wait_until(
      lambda: workers() and any(p.name.startswith("out.tmp-") for p in tmp_path.iterdir()), 120
    )
    started = workers()
    proc.send_signal(getattr(signal, sig))
    proc.wait(timeout=60)
    assert wait_until(lambda: not any(map(is_running, started)), 30)
    if sig == "SIGTERM":
      assert proc.returncode == 1 and "interrupted" in proc.stderr.read()
      assert os.listdir(tmp_path) == []  # The partial OUTPUT.tmp-* is gone, OUTPUT never made.
  finally:
    proc.kill()


_WORKER_DIES = """
import os, sys
from data import prepare as P
from data.sources import Chunk, Source

class Blocking(Source):
  name = "fifo"
  def chunks(self, chunk_bytes):  # The worker blocks reading a FIFO no one writes to.
    yield Chunk("files", [sys.argv[2]], "fifo")

P.open_source = lambda *args: Blocking()
P.main(["--input=fifo", f"--output={sys.argv[1]}", "--seq_len=8", "--num_workers=1"])
"""


def test_a_killed_worker_is_one_line_and_leaves_no_output(tmp_path):
  """A tokenizer worker killed (as by the OOM killer) ends the run with one line, not a
  BrokenProcessPool traceback, and nothing half-written."""
  os.mkfifo(tmp_path / "fifo")
  out = tmp_path / "out"
  cmd = [sys.executable, "-c", _WORKER_DIES, str(out), str(tmp_path / "fifo")]
  proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, text=True)
  try:
    workers = lambda: [c for c in child_pids(proc.pid) if b"resource_tracker" not in command_of(c)]
    assert wait_until(workers, 120)
    os.kill(workers()[0], signal.SIGKILL)
    assert proc.wait(timeout=60) == 1
    last = proc.stderr.read().strip().splitlines()[-1]
    assert last == (
      f"error: a tokenizer worker died (out of memory?); {out} is as it was before this run; "
      "rerun with fewer --num_workers."
    )
    assert os.listdir(tmp_path) == ["fifo"]
  finally:
    proc.kill()


def test_a_full_disk_is_one_line(tmp_path, monkeypatch):
  from data import prepare as P

  def full(*args, **kwargs):
    raise OSError(28, "No space left on device", str(tmp_path / "out.tmp-1"))

  monkeypatch.setattr(P, "prepare", full)
  with pytest.raises(SystemExit, match=r"^error: \[Errno 28\] No space left on device: '/"):
    P.main(["--input=x", f"--output={tmp_path / 'out'}", "--seq_len=8"])
