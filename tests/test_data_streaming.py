"""Streaming sources: host shards, tokenize + grain packing, and exact resume from JSON state."""

import gzip
import json

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from configs.base import SHARDING_RULES
from data.batching import batch_sharding
from data.streaming import (
  FileDocuments,
  StreamingPipeline,
  host_shard,
  own_position,
  shard_of,
)

B, T = 8, 32


@pytest.fixture(scope="module")
def jsonl_files(tmp_path_factory):
  d = tmp_path_factory.mktemp("stream")
  rng = np.random.default_rng(0)
  docs = []
  for f in range(3):
    with gzip.open(d / f"part{f}.jsonl.gz", "wt") as out:
      for i in range(30):
        text = f"f{f}d{i} " + " ".join(
          rng.choice(["llama", "tpu", "pod"], int(rng.integers(0, 20)))
        )
        docs.append(text)
        out.write(json.dumps({"text": text}) + "\n")
  return str(d / "*.jsonl.gz"), docs


def _mesh():
  return Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))


def _pipeline(source, path, **kw):
  return StreamingPipeline(
    source, path, tokenizer="byte", seed=0, global_batch=B, seq_len=T,
    sharding=batch_sharding(_mesh(), SHARDING_RULES), **kw,
  )  # fmt: skip


def test_shard_of_groups_hosts_by_rows():
  blocks = {0: {0, 1, 2, 3}, 1: {4, 5, 6, 7}}
  assert [shard_of(blocks, p) for p in (0, 1)] == [(0, 2), (1, 2)]
  shared = {0: set(range(8)), 1: set(range(8))}  # tensor axis across hosts: same rows, same data
  assert [shard_of(shared, p) for p in (0, 1)] == [(0, 1), (0, 1)]
  pairs = {0: {0, 1}, 1: {2, 3}, 2: {0, 1}, 3: {2, 3}}
  assert [shard_of(pairs, p) for p in range(4)] == [(0, 2), (1, 2), (0, 2), (1, 2)]
  # One process holds everything.
  assert host_shard(batch_sharding(_mesh(), SHARDING_RULES), B, T) == (0, 1)


@pytest.mark.parametrize("num_shards", [2, 5])  # By file (3 files >= 2), or by document (3 < 5).
def test_file_shards_are_disjoint_and_cover_an_epoch(jsonl_files, num_shards):
  pattern, docs = jsonl_files
  from data.sources import expand_input

  files = expand_input(pattern)
  seen = []
  for shard in range(num_shards):
    seen += list(FileDocuments(files, "text", shard, num_shards, seed=0, repeat=False))
  assert sorted(seen) == sorted(docs)


def test_text_stream_resumes_exactly_from_json_state(jsonl_files):
  pattern, docs = jsonl_files
  p = _pipeline("text", pattern)
  it = p.train_batches(0)
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(p.state()))  # The trainer stores it as JSON.
  assert (state["shard"], state["num_shards"], state["rows"]) == (0, 1, B)
  expected = [np.asarray(next(it)["inputs"]) for _ in range(12)]  # Crosses an epoch.
  resumed = _pipeline("text", pattern)
  resumed.restore([state])
  it2 = resumed.train_batches(3)
  for want in expected:
    np.testing.assert_array_equal(np.asarray(next(it2)["inputs"]), want)
  text = p.tokenizer.decode(expected[0].ravel())
  assert any(d.split()[0] in text for d in docs)
  with pytest.raises(ValueError, match="data.eval_path"):
    next(p.eval_batches())


def test_each_host_resumes_its_own_shards_position():
  def pos(shard, num_shards=2, rows=4):
    return {"shard": shard, "num_shards": num_shards, "rows": rows, "iterator": {"at": shard}}

  # Found by shard, whichever process saved it: after a new mesh, or when hosts share a shard.
  assert own_position([pos(0), pos(1)], 1, 2, 4) == {"at": 1}
  assert own_position([pos(1), pos(0), pos(1), pos(0)], 0, 2, 4) == {"at": 0}
  assert own_position([{}, {}], 0, 1, 8) == {}  # Step-indexed data saves no position.
  for shard, num_shards, rows in [(0, 1, 8), (0, 4, 2), (1, 2, 2)]:
    with pytest.raises(ValueError, match="read as 2 host shard.s. of 4 rows each, and each"):
      own_position([pos(0), pos(1)], shard, num_shards, rows)
  with pytest.raises(ValueError, match="have none for host shard 1 of 2; .* incomplete"):
    own_position([pos(0), pos(0)], 1, 2, 4)
  # grain's state has another form with worker processes: a change is an error, not a crash.
  with_workers = [{**pos(0), "workers": 2}, {**pos(1), "workers": 2}]
  assert own_position(with_workers, 1, 2, 4, workers=2) == {"at": 1}
  with pytest.raises(ValueError, match="with data.num_workers=2, .*--config.data.num_workers=2"):
    own_position(with_workers, 1, 2, 4, workers=0)
  # Prepared data's position (a switch to streaming with allow_new_data): nothing to resume.
  assert own_position([{"origin": [4, 32], "global_batch": 8}], 0, 1, 8) == {}
  # Saved before positions named their shard: one per process (this test is one process).
  assert own_position([{"file": 3}], 0, 1, 8) == {"file": 3}
  with pytest.raises(ValueError, match="saved by 2 processes.*resume it on 2 processes"):
    own_position([{"file": 1}, {"file": 2}], 0, 1, 8)


def test_text_stream_packs_with_segments(jsonl_files):
  pattern, _ = jsonl_files
  batch = next(_pipeline("text", pattern).train_batches(0))
  seg, pos, mask = (np.asarray(batch[k]) for k in ("segment_ids", "positions", "loss_mask"))
  assert seg.min() >= 1 and (seg[:, 1:] >= seg[:, :-1]).all()
  starts = np.ones_like(seg, bool)
  starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
  assert (pos[starts] == 0).all() and (pos[~starts] > 0).all()
  assert mask.sum() > 0.8 * mask.size


def test_tfds_stream(tmp_path):
  import tensorflow_datasets as tfds

  with tfds.testing.mock_data(num_examples=40):
    p = _pipeline("tfds", "lm1b:train", eval_steps=2)
    it = p.train_batches(0)
    next(it)
    state = json.loads(json.dumps(p.state()))
    want = [np.asarray(next(it)["inputs"]) for _ in range(3)]
    again = _pipeline("tfds", "lm1b:train")
    again.restore([state])
    it2 = again.train_batches(1)
    for w in want:
      np.testing.assert_array_equal(np.asarray(next(it2)["inputs"]), w)
    evals = [[np.asarray(b["inputs"]) for b in p.eval_batches()] for _ in range(2)]
    assert len(evals[0]) == 2
    np.testing.assert_array_equal(evals[0][1], evals[1][1])


def test_hf_saved_dirs_splits_and_their_eval_split(tmp_path, monkeypatch):
  """`hf:DIR[:SPLIT]` of a saved DatasetDict or Dataset (a stand-in for the optional extra)."""
  import sys
  import types

  from data.catalog import open_hf, with_split

  class DatasetDict(dict):
    pass

  def rows(name, n=40):
    return [{"text": f"{name} document {i} " * 3} for i in range(n)]

  (tmp_path / "dict").mkdir()
  (tmp_path / "plain").mkdir()
  saved = {
    str(tmp_path / "dict"): DatasetDict(train=rows("train"), validation=rows("validation")),
    str(tmp_path / "plain"): rows("plain"),
  }
  fake = types.SimpleNamespace(DatasetDict=DatasetDict, load_from_disk=saved.__getitem__)
  monkeypatch.setitem(sys.modules, "datasets", fake)
  d, plain = tmp_path / "dict", tmp_path / "plain"
  assert open_hf(f"hf:{d}")[0]["text"].startswith("train ")
  assert open_hf(f"hf:{d}:validation")[0]["text"].startswith("validation ")
  with pytest.raises(ValueError, match=r"holds the splits train, validation, not 'test'; name one"):
    open_hf(f"hf:{d}:test")
  assert open_hf(f"hf:{plain}")[0]["text"].startswith("plain ")
  with pytest.raises(ValueError, match=r"one saved Dataset without splits, so ':train' names"):
    open_hf(f"hf:{plain}:train")
  for spec, want in [
    (f"hf:{d}", f"hf:{d}:test"),
    (f"hf:{d}:train", f"hf:{d}:test"),
    ("hf:org/name", "hf:org/name:test"),
    ("hf:org/name:train", "hf:org/name:test"),
    ("hf:org/name:en:train", "hf:org/name:en:test"),
    ("tfds:c4/en", "tfds:c4/en:test"),
    ("tfds:c4/en:train[:90%]", "tfds:c4/en:test"),
  ]:
    assert with_split(spec, "test") == want
  # Evaluation finds the saved dict's validation split, and the plain dataset has none.
  _pipeline("hf", f"hf:{d}", eval_steps=1).check_eval()
  with pytest.raises(ValueError, match="has no validation or test split; set data.eval_path"):
    _pipeline("hf", f"hf:{plain}").check_eval()
  with pytest.raises(ValueError, match=r"examples have no field 'content' \(have \['text'\]\)"):
    next(_pipeline("hf", f"hf:{d}", text_field="content").train_batches(0))


def test_text_fingerprint_follows_the_files_and_eval_is_checked_early(tmp_path):
  for i in range(2):
    (tmp_path / f"a{i}.jsonl").write_text(json.dumps({"text": f"doc {i}"}) + "\n")
  glob = str(tmp_path / "*.jsonl")
  before = _pipeline("text", glob).fingerprint
  assert _pipeline("text", glob).fingerprint == before
  # A file added to the glob changes the file order a saved position points into.
  (tmp_path / "a2.jsonl").write_text(json.dumps({"text": "doc 2"}) + "\n")
  assert _pipeline("text", glob).fingerprint != before
  with pytest.raises(ValueError, match="needs data.eval_path .* or set eval_every=0"):
    _pipeline("text", glob).check_eval()
  with pytest.raises(FileNotFoundError, match="data.eval_path='.*held-out-.*' matches no files"):
    _pipeline("text", glob, eval_path=str(tmp_path / "held-out-*.jsonl")).check_eval()
  # Too little held-out text for eval_steps batches fails at start-up, not at the first eval.
  with pytest.raises(ValueError, match="eval data .*a0.jsonl' has fewer than eval_steps=1 batch"):
    _pipeline("text", glob, eval_path=str(tmp_path / "a0.jsonl")).check_eval()
  (tmp_path / "long.txt").write_text("held-out text " * 60)  # 840 bytes: 3 batches of 8 x 33.
  _pipeline("text", glob, eval_path=str(tmp_path / "long.txt"), eval_steps=3).check_eval()
  with pytest.raises(ValueError, match="fewer than eval_steps=4 batches"):
    _pipeline("text", glob, eval_path=str(tmp_path / "long.txt"), eval_steps=4).check_eval()


def test_file_documents_skip_odd_lines_and_warn_of_a_wrong_field(tmp_path, capsys):
  from data.sources import iter_file_documents

  lines = [{"text": "a"}, {"body": "b"}, {"text": 7}, {"text": "c"}]
  (tmp_path / "x.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
  assert list(iter_file_documents(str(tmp_path / "x.jsonl"))) == ["a", "c"]
  assert capsys.readouterr().err == ""
  # A file none of whose lines has the field is skipped with a warning (a whole stream of such
  # files fails in train_batches, naming data.text_field).
  assert list(iter_file_documents(str(tmp_path / "x.jsonl"), "content")) == []
  assert "no JSON line has a field 'content'; set --text_field" in capsys.readouterr().err
