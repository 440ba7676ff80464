"""The prepared-data loader: (seed, step) fixes each batch; hosts read disjoint rows; resume."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from configs import base
from configs.base import SHARDING_RULES
from data import create_pipeline
from data.batching import batch_sharding
from data.loader import PreparedPipeline, read_metadata, record_indices, rows_dataset
from data.prepare import prepare
from data.stdlib import ensure_stdlib_prepared, stdlib_files
from tests.common import child_pids, is_running, wait_until, write_tiktoken

B, T = 8, 16


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  d = tmp_path_factory.mktemp("data")
  (d / "corpus").mkdir()
  rng = np.random.default_rng(0)
  for i in range(40):
    words = rng.choice(["alpha", "beta", "gamma", "delta", "\n"], int(rng.integers(1, 40)))
    (d / "corpus" / f"{i}.txt").write_text(f"doc {i} " + " ".join(words))
  out = str(d / "prepared")
  prepare(str(d / "corpus"), out, seq_len=T, eval_fraction=0.1, num_workers=0, progress=False)
  return out


def _mesh(shape=(2, 2, 2), devices=None):
  devices = jax.devices() if devices is None else devices
  return Mesh(np.array(devices).reshape(shape), ("data", "fsdp", "tensor"))


def _pipeline(path, mesh, seed=0, **kw):
  return PreparedPipeline(
    path, seed=seed, global_batch=B, seq_len=T, sharding=batch_sharding(mesh, SHARDING_RULES), **kw
  )


def _rows_of(sharding, devices):
  """Global rows held by a simulated host owning `devices` (any mesh layout)."""
  rows = set()
  for device, idx in sharding.devices_indices_map((B, T)).items():
    if device in devices:
      rows.update(range(*idx[0].indices(B)))
  return np.array(sorted(rows))


@pytest.mark.parametrize("layout", ["blocks", "scattered"])
def test_two_hosts_read_disjoint_rows_that_make_the_batch(prepared, layout):
  devices = jax.devices()
  # Scattered: host A's devices (0-3) sit at mesh rows 0-1 and 4-5, so its rows are no one block.
  order = {"blocks": range(8), "scattered": (0, 1, 4, 5, 2, 3, 6, 7)}[layout]
  p = _pipeline(prepared, _mesh(devices=[devices[i] for i in order]))
  rows_a, rows_b = _rows_of(p.sharding, set(devices[:4])), _rows_of(p.sharding, set(devices[4:]))
  assert not set(rows_a) & set(rows_b)
  assert sorted(set(rows_a) | set(rows_b)) == list(range(B))
  assert (np.diff(rows_a).max() > 1) == (layout == "scattered")
  for step in (0, 7, 1000):
    full = p.read_rows(step, np.arange(B))
    part_a, part_b = p.read_rows(step, rows_a), p.read_rows(step, rows_b)
    for key in full:
      np.testing.assert_array_equal(part_a[key], full[key][rows_a])
      np.testing.assert_array_equal(part_b[key], full[key][rows_b])


def test_hosts_split_along_tensor_read_the_same_rows(prepared):
  devices = jax.devices()
  # Each tensor pair spans both hosts, so both hosts must hold (and read) every row.
  p = _pipeline(prepared, _mesh(devices=[devices[i] for i in (0, 4, 1, 5, 2, 6, 3, 7)]))
  rows_a, rows_b = _rows_of(p.sharding, set(devices[:4])), _rows_of(p.sharding, set(devices[4:]))
  assert list(rows_a) == list(rows_b) == list(range(B))


def test_global_batches_match_the_pure_function(prepared):
  mesh = _mesh()
  p = _pipeline(prepared, mesh)
  meta = read_metadata(prepared)
  it = p.train_batches(3)
  for step in (3, 4, 5):
    batch = next(it)
    expected = p.read_rows(step, np.arange(B))
    for key in ("inputs", "targets", "positions", "segment_ids", "loss_mask"):
      assert batch[key].shape == (B, T) and batch[key].sharding == p.sharding
      np.testing.assert_array_equal(np.asarray(batch[key]), expected[key])
    # Row r of the step is record record_indices(seed, step)[r] of the unshuffled rows.
    records = rows_dataset(prepared, meta, "train")
    for r, i in enumerate(record_indices(0, step, np.arange(B), B, meta["num_rows"])):
      np.testing.assert_array_equal(records[int(i)][0][:-1], expected["inputs"][r])
  # Resuming at step 4 gives the same batches as continuing (the step is the whole state).
  again = p.train_batches(4)
  np.testing.assert_array_equal(
    np.asarray(next(again)["inputs"]), p.read_rows(4, np.arange(B))["inputs"]
  )


def test_a_resume_with_another_batch_size_continues_from_the_next_sample(prepared, capsys):
  """Batch-size ramps (as Llama 3's pretraining did): step 4 of a run resumed with twice the
  batch reads the samples steps 4 and 5 would have read, not those of a step 8 at batch 8."""
  mesh = _mesh()
  before = _pipeline(prepared, mesh)
  saved = json.loads(json.dumps(before.state()))  # As the checkpoint stores it.
  want = [before.read_rows(s, np.arange(B))["inputs"] for s in (4, 5, 6, 7)]
  doubled = PreparedPipeline(
    prepared, seed=0, global_batch=2 * B, seq_len=T, sharding=batch_sharding(mesh, SHARDING_RULES)
  )
  doubled.restore([saved, saved])  # One per process, all the same.
  it = doubled.train_batches(4)
  for step in (4, 5):
    got = np.asarray(next(it)["inputs"])
    np.testing.assert_array_equal(got, np.concatenate(want[2 * (step - 4) : 2 * (step - 3)]))
  assert "global_batch_size changed from 8 to 16: step 4 continues from sample 32" in (
    capsys.readouterr().err
  )
  # Saved again and resumed at the old batch: still the next unread samples.
  back = _pipeline(prepared, mesh)
  back.restore([json.loads(json.dumps(doubled.state()))])
  resumed = np.asarray(next(back.train_batches(6))["inputs"])  # Samples 32 + 2 x 16 = 64...
  np.testing.assert_array_equal(resumed, before.read_rows(8, np.arange(B))["inputs"])


def test_seed_fixes_the_order_and_epochs_reshuffle(prepared):
  n = read_metadata(prepared)["num_rows"]
  steps = range(2 * n // B + 1)
  order = lambda seed: np.concatenate([record_indices(seed, s, np.arange(B), B, n) for s in steps])
  a, b, c = order(0), order(0), order(1)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  # Each epoch visits every record exactly once, in a new order.
  assert sorted(a[:n]) == list(range(n)) == sorted(a[n : 2 * n]) == sorted(c[:n])
  assert not np.array_equal(a[:n], a[n : 2 * n])
  mesh = _mesh()
  p0, p0b, p1 = (_pipeline(prepared, mesh, seed=s) for s in (0, 0, 1))
  r0, r0b, r1 = (p.read_rows(2, np.arange(B))["inputs"] for p in (p0, p0b, p1))
  np.testing.assert_array_equal(r0, r0b)
  assert not np.array_equal(r0, r1)


def test_worker_processes_give_the_same_batches(prepared):
  mesh = _mesh((8, 1, 1))
  plain = _pipeline(prepared, mesh).train_batches(10)
  workers = _pipeline(prepared, mesh, num_workers=1).train_batches(10)
  for _ in range(3):
    a, b = next(plain), next(workers)
    np.testing.assert_array_equal(np.asarray(a["inputs"]), np.asarray(b["inputs"]))
  # A terminal's Ctrl-C reaches the workers too; they leave it to the trainer (which saves).
  tasks = Path(f"/proc/{os.getpid()}/task").iterdir()
  children = [pid for t in tasks for pid in (t / "children").read_text().split()]
  ignored = [
    int(line.split()[1], 16) & (1 << (signal.SIGINT - 1))
    for pid in children
    for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    if line.startswith("SigIgn:")
  ]
  assert ignored and all(ignored), children
  workers.close()


_KILLED_READER = """
import sys
import numpy as np, jax
from jax.sharding import Mesh
from configs.base import SHARDING_RULES
from data.batching import batch_sharding
from data.loader import PreparedPipeline
if __name__ == "__main__":  # The workers are spawned: they import this module again.
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(8, 1, 1), ("data", "fsdp", "tensor"))
  p = PreparedPipeline(sys.argv[1], seed=0, global_batch=8, seq_len=16,
                       sharding=batch_sharding(mesh, SHARDING_RULES), num_workers=2)
  batches = p.train_batches(0)  # Kept: closing it would stop the workers.
  next(batches)
  print("READING", flush=True)
  sys.stdin.read()  # Until killed.
"""


def test_workers_exit_when_their_reader_is_killed(prepared, tmp_path):
  """SIGKILL (or the OOM killer, or the watchdog's exit) gives the trainer no chance to stop its
  grain workers: they notice and exit by themselves."""
  proc = subprocess.Popen(
    [sys.executable, "-c", _KILLED_READER, prepared],
    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1],
  )  # fmt: skip
  assert proc.stdout.readline().strip() == "READING"
  workers = child_pids(proc.pid)  # grain's workers and multiprocessing's resource tracker.
  assert len(workers) >= 2, workers
  proc.kill()
  proc.wait()
  gone = wait_until(lambda: not any(map(is_running, workers)), 30)
  for pid in filter(is_running, workers):  # Leave nothing behind, even when the test fails.
    os.kill(pid, signal.SIGKILL)
  assert gone
  # A worker still starting when its trainer died runs init_worker with the trainer gone: it
  # must leave at once (here its parent is this test, not the pid it was given).
  late = "import time; from data.batching import init_worker; init_worker(parent=1); time.sleep(60)"
  done = subprocess.run(
    [sys.executable, "-c", late], cwd=Path(__file__).parents[1], capture_output=True, timeout=50
  )
  assert done.returncode == 1 and b"Traceback" not in done.stderr, done.stderr


def _document_names(rows):
  """The 'doc N' openings of documents that start in `rows` (byte tokens after BOS), when whole."""
  names = set()
  for tokens, _, _ in rows:
    for start in np.flatnonzero(tokens == 256):  # The byte tokenizer's BOS.
      words = bytes(int(t) for t in tokens[start + 1 : start + 8] if t < 256).decode().split(" ")
      if len(words) > 2:  # The opening is not cut off by the end of the row.
        names.add(" ".join(words[:2]))
  return names


def test_eval_batches_are_held_out_and_repeatable(prepared):
  p = _pipeline(prepared, _mesh(), eval_steps=3)
  first = [np.asarray(b["inputs"]) for b in p.eval_batches()]
  second = [np.asarray(b["inputs"]) for b in p.eval_batches()]
  assert len(first) == 3
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a, b)
  meta = read_metadata(prepared)
  train = rows_dataset(prepared, meta, "train")._getitems(list(range(meta["num_rows"])))
  held_out = rows_dataset(prepared, meta, "eval")._getitems(list(range(meta["num_eval_rows"])))
  # Documents begin "doc N ": no document has a start in both splits.
  train_docs, eval_docs = _document_names(train), _document_names(held_out)
  assert meta["num_eval_documents"] == 4  # ceil(39 * 0.1) of 40.
  assert eval_docs and len(train_docs) >= 10 and not train_docs & eval_docs
  # Eval batch i holds eval rows i*B.. in order (wrapping around the small eval split).
  first_row = rows_dataset(prepared, meta, "eval")[0][0]
  np.testing.assert_array_equal(first[0][0], first_row[:-1])


def test_errors_name_the_fix(prepared, tmp_path):
  sharding = batch_sharding(_mesh(), SHARDING_RULES)
  with pytest.raises(ValueError, match="--config.seq_len=16"):
    PreparedPipeline(prepared, seed=0, global_batch=B, seq_len=32, sharding=sharding)
  with pytest.raises(FileNotFoundError, match="data.prepare"):
    _pipeline(str(tmp_path / "nope"), _mesh())
  # A metadata.json cut short, or from another tool: one error naming the file and the fix.
  import shutil

  copy = shutil.copytree(prepared, tmp_path / "copy")
  meta = (copy / "metadata.json").read_text()
  for text, message in (
    (meta[: len(meta) // 2], r"metadata.json is not valid JSON \(.*\); prepare it again"),
    ('{"seq_len": 16}', r"metadata.json lacks row_len, dtypes, .*; prepare it again \(python"),
  ):
    (copy / "metadata.json").write_text(text)
    with pytest.raises(ValueError, match=message):
      _pipeline(str(copy), _mesh())
  from data.tokenizers import tokenizer_from_prepared

  with pytest.raises(ValueError, match="metadata.json lacks tokenizer; prepare the data again"):
    tokenizer_from_prepared(str(copy))


def test_create_pipeline_and_stdlib_cache(prepared, tmp_path):
  c = base.get_config()
  c.global_batch_size, c.seq_len, c.eval_steps = B, T, 1
  c.data.source, c.data.path = "prepared", prepared
  p = create_pipeline(c, _mesh())
  assert p.fingerprint == read_metadata(prepared)["fingerprint"]
  assert next(p.train_batches(0))["inputs"].shape == (B, T)
  # Prepared data brings its own tokenizer: another one named beside it is not quietly ignored.
  c.data.tokenizer = write_tiktoken(tmp_path / "tokenizer.model", [b"th"])
  with pytest.raises(ValueError, match=r"tokenizer.model' is not the tokenizer .* prepared with"):
    create_pipeline(c, _mesh())
  c.data.tokenizer = "bpe:4096"  # configs/tiny.py's, for its stdlib data: named, not trained.
  with pytest.raises(ValueError, match=r"'bpe:4096' is not .*\(byte, 259 ids\); .*tokenizer=byte"):
    create_pipeline(c, _mesh())
  c.data.tokenizer = "byte"
  c.data.source, c.data.path = "nope", ""
  with pytest.raises(ValueError, match="data.source='nope' is unknown"):
    create_pipeline(c, _mesh())
  kw = dict(tokenizer="byte", seq_len=T, max_bytes=100_000, progress=False)
  path = ensure_stdlib_prepared(str(tmp_path), **kw)
  meta = read_metadata(path)
  assert meta["num_documents"] > 3 and meta["num_bytes"] >= 100_000
  assert ensure_stdlib_prepared(str(tmp_path), **kw) == path  # Reused, not prepared again.
  assert read_metadata(path)["fingerprint"] == meta["fingerprint"]
  # Every document piece in a batch is a slice of one of the chosen stdlib files.
  sources = b"\0".join(open(f, "rb").read() for f in stdlib_files(100_000))
  ex = _pipeline(path, _mesh()).read_rows(0, np.arange(B))
  for tokens, segments in zip(ex["inputs"], ex["segment_ids"]):
    for s in np.unique(segments[segments > 0]):
      piece = bytes(int(t) for t in tokens[segments == s] if t < 256)
      assert piece in sources


def test_missing_eval_data_fails_before_training(prepared, tmp_path, capsys):
  (tmp_path / "one.txt").write_text("one document: no eval split")
  no_eval = str(tmp_path / "no_eval")
  prepare(str(tmp_path / "one.txt"), no_eval, seq_len=T, num_workers=0, progress=False)
  assert read_metadata(no_eval)["num_eval_rows"] == 0
  c = base.get_config()
  c.global_batch_size, c.seq_len, c.eval_steps = B, T, 1
  c.data.source, c.data.path = "prepared", no_eval
  with pytest.raises(ValueError, match="has no eval rows; .*or set eval_every=0"):
    create_pipeline(c, _mesh())  # At start-up, not at the first evaluation.
  capsys.readouterr()
  c.eval_every = 0
  create_pipeline(c, _mesh())
  assert "fewer than one batch of 8; every batch repeats rows" in capsys.readouterr().err
  # Another prepared dir's eval rows serve; too few of them for eval_steps is a warning.
  c.eval_every, c.eval_steps, c.data.eval_path = 10, 50, prepared
  create_pipeline(c, _mesh())
  assert "an evaluation repeats rows" in capsys.readouterr().err
