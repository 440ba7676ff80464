"""The local launcher: N processes act as one JAX cluster, stop together and fail fast."""

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from launch import local
from tests.common import is_running, wait_until
from trainer import distributed

REPO = pathlib.Path(__file__).resolve().parents[1]

# Two hosts of four devices; host p holds rows 10*(p+1) + [0, 1, 2, 3] of an 8-row global array.
_CLUSTER_PAYLOAD = """
from trainer.distributed import maybe_initialize
maybe_initialize()
maybe_initialize()  # a second call must be harmless
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
mesh = Mesh(np.array(jax.devices()), ("d",))
local = 10.0 * (jax.process_index() + 1) + np.arange(4, dtype=np.float32)
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("d")), local, (8,))
replicated = NamedSharding(mesh, P())
total, weighted = jax.jit(
  lambda x: (jnp.sum(x), jnp.dot(x, jnp.arange(8.0))), out_shardings=(replicated, replicated)
)(x)
print("RESULT", jax.process_index(), jax.process_count(), jax.device_count(),
      jax.local_device_count(), float(total), float(weighted))
"""

# Process 1 dies the way a crash does (no JAX shutdown barrier); process 0 would sleep for
# minutes and, with jax.distributed up, even ignores SIGTERM (jax takes it as a preemption notice).
_FAILING_PAYLOAD = """
import os, time
from trainer.distributed import maybe_initialize
maybe_initialize()
import jax
print("PID", os.getpid(), flush=True)
if jax.process_index() == 1:
  print("failing", flush=True)
  os._exit(1)
time.sleep(300)
print("woke up", flush=True)
"""

_SIGNAL_PAYLOAD = """
import os, signal, sys, time
def stop(signum, _):
  print("got", signal.Signals(signum).name, flush=True)
  if signum == signal.SIGINT:  # As the trainer: save (process 1 takes longer), then exit 130.
    time.sleep(2 * int(os.environ["LLAMA_PROCESS_ID"]))
    print("saved", flush=True)
    sys.exit(130)
  sys.exit(0)
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
print("ready", flush=True)
time.sleep(60)
"""


def _launcher_env() -> dict[str, str]:
  env = dict(os.environ, PYTHONPATH=str(REPO))
  for k in distributed.LAUNCHER_VARS:
    env.pop(k, None)
  return env


def _launch(
  tmp_path, payload: str, *flags: str, timeout: float = 60
) -> subprocess.CompletedProcess:
  script = tmp_path / "payload.py"
  script.write_text(textwrap.dedent(payload))
  cmd = [sys.executable, "-m", "launch.local", *flags, "--", sys.executable, str(script)]
  return subprocess.run(
    cmd, cwd=REPO, env=_launcher_env(), capture_output=True, text=True, timeout=timeout
  )


def test_two_processes_form_one_cluster_with_prefixed_output(tmp_path):
  r = _launch(tmp_path, _CLUSTER_PAYLOAD, "--processes=2", "--devices_per_process=4")
  assert r.returncode == 0, r.stdout + r.stderr
  lines = r.stdout.splitlines()
  assert lines and all(line.startswith(("[p0] ", "[p1] ", "[launch] ")) for line in lines), lines
  results = {line.split()[2]: line.split() for line in lines if line.split()[1:2] == ["RESULT"]}
  assert set(results) == {"0", "1"}, r.stdout
  global_x = np.concatenate([10.0 + np.arange(4), 20.0 + np.arange(4)])
  for pid, fields in results.items():
    assert fields[0] == f"[p{pid}]"  # each line carries the prefix of the process that wrote it
    # process_count, device_count, local_device_count: the pytest env's 8 devices were replaced.
    assert fields[3:6] == ["2", "8", "4"]
    assert float(fields[6]) == global_x.sum()
    assert float(fields[7]) == global_x @ np.arange(8.0)  # rows in host order, not just summed


def test_one_failing_process_stops_the_others_quickly(tmp_path):
  start = time.monotonic()
  r = _launch(tmp_path, _FAILING_PAYLOAD, "--processes=2", "--devices_per_process=1", "--grace_s=1")
  elapsed = time.monotonic() - start
  assert r.returncode == 1, r.stdout + r.stderr
  assert elapsed < 30, elapsed
  assert "[p1] failing" in r.stdout
  assert "[launch] process 1 exited with 1" in r.stdout
  assert "woke up" not in r.stdout
  pids = [int(line.split()[2]) for line in r.stdout.splitlines() if line.split()[1:2] == ["PID"]]
  assert len(pids) == 2, r.stdout
  for pid in pids:  # nothing left running
    with pytest.raises(ProcessLookupError):
      os.kill(pid, 0)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_a_signal_to_the_launcher_reaches_every_process(tmp_path, sig, code):
  """After a Ctrl-C, a process that exits 130 first is not a failure: the others finish saving."""
  script = tmp_path / "payload.py"
  script.write_text(_SIGNAL_PAYLOAD)
  cmd = [sys.executable, "-m", "launch.local", "--processes=2", "--devices_per_process=1", "--"]
  proc = subprocess.Popen(
    [*cmd, sys.executable, str(script)],
    cwd=REPO,
    env=_launcher_env(),
    stdout=subprocess.PIPE,
    text=True,
  )
  try:
    ready = set()
    while len(ready) < 2:
      line = proc.stdout.readline()
      assert line, "launcher ended before both processes were ready"
      if line.endswith("ready\n"):
        ready.add(line.split()[0])
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=20)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == code, out
  assert f"[p0] got {sig.name}" in out and f"[p1] got {sig.name}" in out
  assert "stopping the others" not in out
  if sig == signal.SIGINT:
    assert "[p1] saved" in out


def test_child_env_replaces_the_device_count_and_keeps_other_flags():
  base = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_dump_to=/tmp/x", "A": "1"}
  env = local.child_env(base, "127.0.0.1:1234", 3, 2, 4)
  assert env["XLA_FLAGS"].split() == [
    "--xla_dump_to=/tmp/x",
    "--xla_force_host_platform_device_count=4",
  ]
  assert env["A"] == "1" and env["JAX_PLATFORMS"] == "cpu"
  assert distributed.launcher_spec(env) == ("127.0.0.1:1234", 3, 2)


def test_bare_flags_run_the_trainer():
  assert local.resolve_command(["--config=configs/tiny.py"])[1:] == [
    "-m",
    "trainer.train",
    "--config=configs/tiny.py",
  ]
  # `python` is this interpreter: the PATH's may be one without the project (no venv active).
  assert local.resolve_command(["python", "x.py"]) == [sys.executable, "x.py"]
  assert local.resolve_command(["sh", "-c", "true"]) == ["sh", "-c", "true"]
  with pytest.raises(ValueError, match="after `--`"):
    local.resolve_command([])
  with pytest.raises(ValueError, match="'no-such-cmd' is not a command on PATH"):
    local.resolve_command(["no-such-cmd"])


def test_launcher_spec_rejects_partial_or_bad_variables():
  assert distributed.launcher_spec({}) is None
  with pytest.raises(ValueError, match="LLAMA_PROCESS_ID"):
    distributed.launcher_spec({"LLAMA_COORDINATOR_ADDRESS": "h:1", "LLAMA_NUM_PROCESSES": "2"})
  bad_id = {"LLAMA_COORDINATOR_ADDRESS": "h:1", "LLAMA_NUM_PROCESSES": "2", "LLAMA_PROCESS_ID": "2"}
  with pytest.raises(ValueError, match=r"must be in \[0"):
    distributed.launcher_spec(bad_id)


def test_tpu_vm_is_told_apart_by_pci_device(tmp_path):
  def device(name: str, vendor: str, dev: str) -> None:
    (tmp_path / name).mkdir()
    (tmp_path / name / "vendor").write_text(vendor + "\n")
    (tmp_path / name / "device").write_text(dev + "\n")

  device("0000:00:04.0", "0x1ae0", "0x0042")  # Google gVNIC: every GCE VM has one
  assert not distributed.on_tpu_cluster({}, pci_root=str(tmp_path))
  assert distributed.on_tpu_cluster({"TPU_WORKER_HOSTNAMES": "a,b"}, pci_root=str(tmp_path))
  device("0000:00:05.0", "0x1ae0", "0x006f")  # a v6e chip
  assert distributed.on_tpu_cluster({}, pci_root=str(tmp_path))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the death signal is Linux-only")
def test_kill_9_of_the_launcher_takes_the_processes_with_it(tmp_path):
  script = tmp_path / "payload.py"
  script.write_text("import os, time\nprint('PID', os.getpid(), flush=True)\ntime.sleep(60)\n")
  cmd = [sys.executable, "-m", "launch.local", "--processes=2", "--devices_per_process=1", "--"]
  proc = subprocess.Popen(
    [*cmd, sys.executable, str(script)], cwd=REPO, env=_launcher_env(), stdout=subprocess.PIPE
  )
  pids = []
  try:
    while len(pids) < 2:
      line = proc.stdout.readline().decode()
      assert line, "launcher ended before both processes started"
      if line.split()[1:2] == ["PID"]:
        pids.append(int(line.split()[2]))
    proc.kill()
    proc.wait(timeout=10)
    assert wait_until(lambda: not any(map(is_running, pids)), 10)
  finally:
    for p in filter(is_running, pids):
      os.kill(p, signal.SIGKILL)
