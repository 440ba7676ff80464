"""The trainer's command line: bad flags, config files and meshes, and a device out of memory,
each end in one line naming the fix, with no traceback."""

import subprocess
import sys


def _train_cli(tmp_path, *flags, config="configs/tiny.py"):
  cmd = [
    sys.executable,
    "-m",
    "trainer.train",
    f"--config={config}",
    f"--workdir={tmp_path}",
    *flags,
  ]
  return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_unknown_config_key_is_one_clear_line(tmp_path):
  result = _train_cli(tmp_path, "--config.model.num_layer=2")
  assert result.returncode != 0
  assert "error: unknown config key: 'num_layer'; Did you mean" in result.stderr
  assert "Traceback" not in result.stderr
  result = _train_cli(tmp_path, "--config.model.rope_scaling=None")  # None in tiny.py
  assert result.returncode != 0 and "Traceback" not in result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: model.rope_scaling is None in this config file, which cannot")
  assert "--config.model.rope_scaling.factor=1.0 on a config that has Llama 3.1 scaling" in last
  result = _train_cli(tmp_path, "--config=configs/nope.py")
  assert result.returncode != 0 and "Traceback" not in result.stderr
  assert "error: --config does not load ([Errno 2] No such file" in result.stderr
  # A config file is Python: its own errors are one line naming the file and line.
  for name, code, message in (
    ("syntax.py", "def get_config(:\n", "syntax.py line 1 does not parse (invalid syntax)"),
    ("raises.py", "def get_config():\n  return nope\n", "raises.py line 2 raised NameError"),
    ("value.py", "def get_config():\n  return int('x')\n", "value.py line 2 raised ValueError"),
    ("key.py", "def get_config():\n  return {}['model']\n", "key.py line 2 raised KeyError"),
    ("none.py", "X = 1\n", "the --config file has no get_config(); define one"),
  ):
    (tmp_path / name).write_text(code)
    result = _train_cli(tmp_path / "run", config=tmp_path / name)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert message in result.stderr.strip().splitlines()[-1]


def test_device_out_of_memory_is_one_line_naming_the_fixes(tmp_path):
  from trainer.cli import out_of_memory

  assert out_of_memory(RuntimeError("INTERNAL: something else")) is None
  # What XLA raises when the step does not fit (here raised by a stand-in for the training).
  oom = "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 17179869184 bytes."
  code = (
    "import runpy, sys, jax; import trainer.loop as loop\n"
    "def boom(*args):\n"
    f"  raise jax.errors.JaxRuntimeError({oom!r} + '\\nBuffer assignment: ...')\n"
    "loop.train_and_evaluate = boom\n"
    f"sys.argv = ['trainer.train', '--config=tests/tiny_run.py', '--workdir={tmp_path}']\n"
    "runpy.run_module('trainer.train', run_name='__main__')\n"
  )
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1] == (
    f"error: The train step does not fit in device memory ({oom}); set "
    "--config.model.remat=full, raise --config.grad_accum_steps or lower "
    "--config.global_batch_size (`python -m launch.plan` sizes a TPU run before it starts)."
  )


def test_mesh_mismatch_on_the_command_line_is_one_clear_line(tmp_path):
  result = _train_cli(tmp_path, "--config.mesh.data=3", "--config.data.source=synthetic")
  assert result.returncode != 0
  assert "Traceback" not in result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error:") and "3 devices" in last, result.stderr[-2000:]
