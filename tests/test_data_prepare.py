"""data.prepare: corpora in every format, the counts, the bad inputs, the saved tokenizer."""

import gzip
import json
import os

import numpy as np
import pytest

from data.loader import read_metadata, rows_dataset
from data.prepare import main, prepare
from data.tokenizers import load_tokenizer

REQUIRED = ("num_rows", "seq_len", "num_documents", "num_tokens", "tokenizer", "fingerprint")


def _all_rows(path, split):
  meta = read_metadata(path)
  ds = rows_dataset(path, meta, split)
  n = meta["num_rows" if split == "train" else "num_eval_rows"]
  return [np.stack(parts) for parts in zip(*ds._getitems(list(range(n))))]


def _documents(path, split):
  """The token streams of the documents in a split, split at BOS."""
  tok, seg, _ = _all_rows(path, split)
  flat = tok[seg > 0]
  bos = load_tokenizer(path).bos_id
  starts = np.flatnonzero(flat == bos)
  return [flat[a:b] for a, b in zip(starts, list(starts[1:]) + [len(flat)])]


@pytest.fixture
def text_corpus(tmp_path):
  d = tmp_path / "corpus"
  d.mkdir()
  texts = [f"document {i}: " + "word " * (i * 7 % 50) for i in range(30)]
  for i, t in enumerate(texts):
    (d / f"doc{i:02d}.txt").write_text(t)
  (d / "empty.txt").write_text("")
  (d / "blank.txt").write_text("  \n\t ")
  (d / "latin1.txt").write_bytes(b"caf\xe9 au lait \xff")  # Not UTF-8.
  return d, texts


def test_text_files_round_trip(text_corpus, tmp_path):
  d, texts = text_corpus
  out = str(tmp_path / "out")
  meta = prepare(str(d / "*.txt"), out, seq_len=16, eval_fraction=0.1, num_workers=0)
  for key in REQUIRED:
    assert key in meta
  assert meta["num_empty"] == 2 and meta["num_invalid_utf8"] == 1
  assert meta["num_documents"] + meta["num_eval_documents"] == 31
  assert meta["num_eval_documents"] == 3  # Every 10th document.
  assert meta == read_metadata(out)
  tok = load_tokenizer(out)
  expected = sorted(texts + ["caf\ufffd au lait \ufffd"])
  got = [tok.decode(d) for split in ("train", "eval") for d in _documents(out, split)]
  assert sorted(got) == expected
  docs = _documents(out, "train")
  assert all(d[0] == tok.bos_id and d[-1] == tok.eos_id for d in docs)
  assert meta["num_tokens"] == sum(len(d) for d in docs)
  assert meta["num_rows"] == -(-meta["num_tokens"] // 17)


def test_workers_do_not_change_the_output(text_corpus, tmp_path):
  d, _ = text_corpus
  a = prepare(str(d), str(tmp_path / "a"), seq_len=8, num_workers=0, chunk_bytes=64)
  b = prepare(str(d), str(tmp_path / "b"), seq_len=8, num_workers=2, chunk_bytes=64)
  assert a["fingerprint"] == b["fingerprint"] and a["num_rows"] == b["num_rows"]
  c = prepare(str(d), str(tmp_path / "c"), seq_len=9, num_workers=0)
  assert c["fingerprint"] != a["fingerprint"]


def test_jsonl_gz_and_parquet(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq

  lines = [json.dumps({"body": f"line {i} " * 3, "n": i}) for i in range(20)]
  lines += ["not json at all", json.dumps({"body": ""}), "", json.dumps({"body": "\ud800x"})]
  with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
    f.write("\n".join(lines) + "\n")
  pq.write_table(
    pa.table({"body": [f"row {i}" for i in range(5)] + [None]}), tmp_path / "b.parquet"
  )
  meta = prepare(
    str(tmp_path / "*.*"), str(tmp_path / "out"), seq_len=32, text_field="body", num_workers=0,
    eval_fraction=0, chunk_bytes=100,
  )  # fmt: skip
  assert meta["num_documents"] == 20 + 1 + 5
  assert meta["num_bad_lines"] == 1 and meta["num_empty"] == 2
  assert meta["num_invalid_utf8"] == 1  # The lone surrogate, replaced.
  got = sorted(
    load_tokenizer(str(tmp_path / "out")).decode(d)
    for d in _documents(str(tmp_path / "out"), "train")
  )
  assert got == sorted(
    [f"line {i} " * 3 for i in range(20)] + ["\ufffdx"] + [f"row {i}" for i in range(5)]
  )
  with pytest.raises(ValueError, match="no field 'text'"):
    prepare(str(tmp_path / "a.jsonl.gz"), str(tmp_path / "o2"), seq_len=8, num_workers=0)


def test_trained_bpe_is_saved_with_the_data(text_corpus, tmp_path):
  d, texts = text_corpus
  out = str(tmp_path / "bpe")
  meta = prepare(str(d), out, seq_len=16, tokenizer="bpe:300", num_workers=0, eval_fraction=0)
  assert meta["tokenizer"]["kind"] == "hf" and meta["tokenizer"]["vocab_size"] == 300
  assert os.path.exists(os.path.join(out, "tokenizer.json"))
  tok = load_tokenizer(out)
  assert sorted(tok.decode(x) for x in _documents(out, "train")) == sorted(
    texts + ["caf\ufffd au lait \ufffd"]
  )


def test_tfds_source(tmp_path):
  import tensorflow_datasets as tfds

  with tfds.testing.mock_data(num_examples=12):
    meta = prepare("tfds:lm1b:train", str(tmp_path / "t"), seq_len=16, num_workers=0)
  assert meta["num_documents"] + meta["num_eval_documents"] + meta["num_empty"] == 12


def test_bad_inputs(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"nothing-\*\.txt.*matches no files"):
    prepare(str(tmp_path / "nothing-*.txt"), str(tmp_path / "o"), seq_len=8)
  (tmp_path / "e1.txt").write_text("")
  (tmp_path / "e2.txt").write_text(" \n")
  with pytest.raises(ValueError, match=r"e\*\.txt.*no non-empty documents \(2 empty"):
    prepare(str(tmp_path / "e*.txt"), str(tmp_path / "o"), seq_len=8, num_workers=0)
  assert not os.path.exists(tmp_path / "o")  # Nothing half-written is left behind.
  (tmp_path / "ok.txt").write_text("hello")
  prepare(str(tmp_path / "ok.txt"), str(tmp_path / "o"), seq_len=8, num_workers=0)
  with pytest.raises(FileExistsError, match="--overwrite"):
    prepare(str(tmp_path / "ok.txt"), str(tmp_path / "o"), seq_len=8, num_workers=0)
  with pytest.raises(SystemExit, match="error: .*matches no files"):
    main(["--input", str(tmp_path / "none*"), "--output", str(tmp_path / "x"), "--seq_len", "8"])


def test_hf_source_specs(tmp_path, monkeypatch):
  """hf:NAME[:CONFIG]:SPLIT reaches datasets.load_dataset (a stand-in: no network, no extra)."""
  import sys
  import types

  calls = []

  def load_dataset(name, config=None, split=None):
    calls.append((name, config, split))
    return [{"text": f"{name} {config} {split} {i}"} for i in range(4)]

  fake = types.SimpleNamespace(load_dataset=load_dataset, DatasetDict=dict)
  monkeypatch.setitem(sys.modules, "datasets", fake)
  meta = prepare("hf:org/corpus:en:train", str(tmp_path / "a"), seq_len=8, num_workers=0)
  assert calls == [("org/corpus", "en", "train")] and meta["num_documents"] == 4
  prepare("hf:corpus:test", str(tmp_path / "b"), seq_len=8, num_workers=0, eval_fraction=0)
  assert calls[-1] == ("corpus", None, "test")
  docs = _documents(str(tmp_path / "b"), "train")
  assert [load_tokenizer(str(tmp_path / "b")).decode(d) for d in docs][0] == "corpus None test 0"


def test_never_deletes_a_foreign_output_dir(tmp_path):
  (tmp_path / "ok.txt").write_text("hello")
  precious = tmp_path / "home"
  precious.mkdir()
  (precious / "notes.txt").write_text("keep me")
  with pytest.raises(FileExistsError, match="not a prepared dataset"):
    prepare(str(tmp_path / "ok.txt"), str(precious), seq_len=8, num_workers=0, overwrite=True)
  assert (precious / "notes.txt").read_text() == "keep me"
