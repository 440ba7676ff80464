"""data.prepare: corpora in every format, the counts, the bad inputs, the saved tokenizer."""

import gzip
import json
import os

import numpy as np
import pytest

from data.loader import read_metadata, rows_dataset
from data.prepare import _summary, eval_documents, main, prepare
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
  pq.write_table(pa.table({"body": [[1, 2], [3]]}), tmp_path / "c.parquet")  # Not text.
  meta = prepare(
    str(tmp_path / "*.*"), str(tmp_path / "out"), seq_len=32, text_field="body", num_workers=0,
    eval_fraction=0, chunk_bytes=100,
  )  # fmt: skip
  assert meta["num_documents"] == 20 + 1 + 5
  assert meta["num_bad_lines"] == 1 and meta["num_empty"] == 2 and meta["num_not_text"] == 2
  assert meta["num_invalid_utf8"] == 1  # The lone surrogate, replaced.
  got = sorted(
    load_tokenizer(str(tmp_path / "out")).decode(d)
    for d in _documents(str(tmp_path / "out"), "train")
  )
  assert got == sorted(
    [f"line {i} " * 3 for i in range(20)] + ["\ufffdx"] + [f"row {i}" for i in range(5)]
  )
  with pytest.raises(ValueError, match="no JSON line has a field 'text'; set --text_field"):
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


def test_tfds_source(tmp_path, capsys):
  import tensorflow_datasets as tfds

  with tfds.testing.mock_data(num_examples=12):
    meta = prepare("tfds:lm1b:train", str(tmp_path / "t"), seq_len=16, num_workers=0)
  assert meta["num_documents"] + meta["num_eval_documents"] + meta["num_empty"] == 12
  assert "100%" in capsys.readouterr().err  # The dataset's length gives the bar a total.


def test_unknown_tfds_dataset_is_one_line(tmp_path):
  """Not the TFDS error, which lists every registered dataset; nothing is downloaded."""
  out = str(tmp_path / "o")
  args = ["--tokenizer=byte", "--seq_len=64", f"--output={out}"]
  with pytest.raises(SystemExit) as e:
    main(["--input=tfds:nonexistent_zz:train", *args])
  assert str(e.value) == (
    "error: tfds dataset 'nonexistent_zz' is not registered (no registered name is close); "
    "check the name (tfds.list_builders())."
  )
  with pytest.raises(FileNotFoundError, match=r"^tfds dataset 'lmb1' is not .*did you mean lm1b\?"):
    prepare("tfds:lmb1/en:train", out, seq_len=8, num_workers=0)
  with pytest.raises(FileNotFoundError, match=r"^tfds dataset 'c4' has no config 'zzz'; use one "):
    prepare("tfds:c4/zzz:train", out, seq_len=8, num_workers=0)
  assert not os.path.exists(out)


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
  assert calls == [("org/corpus", "en", "train")]
  assert (meta["num_documents"], meta["num_eval_documents"]) == (3, 1)  # Document 1 held out.
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


def test_eval_documents_hold_out_the_exact_fraction():
  for f in (0.01, 0.1, 0.25, 0.6, 1 / 3):
    for n in (1, 2, 3, 10, 101, 1000):
      held = eval_documents(np.arange(n), f)
      assert held.sum() == int(np.ceil(round((n - 1) * f, 9))), (f, n)
  # Two documents are enough for an eval split; one stays for training.
  assert eval_documents(np.arange(2), 0.01).tolist() == [False, True]
  assert not eval_documents(np.arange(1), 0.5).any()
  assert not eval_documents(np.arange(50), 0).any()
  # The choice of a document does not depend on how the corpus was chunked.
  whole = eval_documents(np.arange(1000), 0.03)
  parts = np.concatenate([eval_documents(np.arange(a, a + 7), 0.03) for a in range(0, 1001, 7)])
  assert (parts[:1000] == whole).all()


def test_json_gz_binary_and_odd_lines(tmp_path):
  d = tmp_path / "in"
  d.mkdir()
  good = [f"doc {i} " * 4 for i in range(6)]
  odd = [{"body": "no text field"}, {"text": 123}, {"text": ["a"]}, "not json"]
  lines = [json.dumps({"text": t}) for t in good[:3]] + [
    o if isinstance(o, str) else json.dumps(o) for o in odd
  ]
  (d / "a.jsonl").write_text("\n".join(lines) + "\n")
  (d / "b.json").write_text(json.dumps([{"text": good[3]}, good[4], {"other": 1}]))
  with gzip.open(d / "c.txt.gz", "wt") as f:
    f.write(good[5])
  with gzip.open(d / "e.json.gz", "wt") as f:  # A gzipped JSON array.
    json.dump([{"text": "from a gzipped array"}], f)
  (d / "d.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
  out = str(tmp_path / "out")
  meta = prepare(str(d), out, seq_len=16, num_workers=0, eval_fraction=0)
  assert meta["num_documents"] == 7
  counts = ("num_bad_lines", "num_no_field", "num_not_text", "num_binary_files")
  assert tuple(meta[k] for k in counts) == (1, 2, 2, 1)
  assert _summary(meta, out).endswith(
    "; skipped 1 JSON lines that do not parse, 2 JSON lines without the text field, 2 texts that "
    "are not strings (numbers, lists, objects), 1 binary file(s)"
  )
  tok = load_tokenizer(out)
  assert sorted(tok.decode(x) for x in _documents(out, "train")) == sorted(
    [*good, "from a gzipped array"]
  )
  (tmp_path / "broken.txt.gz").write_bytes(gzip.compress(b"hello world")[:-6])
  with pytest.raises(ValueError, match="broken.txt.gz is not a readable gzip file"):
    prepare(str(tmp_path / "broken.txt.gz"), str(tmp_path / "o2"), seq_len=8, num_workers=0)
  garbled = bytearray(gzip.compress(b"hello world " * 100))
  garbled[12:20] = b"\xff" * 8  # Inside the deflate stream: a zlib error, not a gzip one.
  (tmp_path / "garbled.txt.gz").write_bytes(bytes(garbled))
  with pytest.raises(ValueError, match="garbled.txt.gz is not a readable gzip file"):
    prepare(str(tmp_path / "garbled.txt.gz"), str(tmp_path / "o2"), seq_len=8, num_workers=0)
  (tmp_path / "bad.json").write_text('[{"text": "a"},')
  with pytest.raises(ValueError, match="bad.json is not valid JSON"):
    prepare(str(tmp_path / "bad.json"), str(tmp_path / "o3"), seq_len=8, num_workers=0)
  (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really parquet")
  with pytest.raises(ValueError, match="bad.parquet is not a readable Parquet file"):
    prepare(str(tmp_path / "bad.parquet"), str(tmp_path / "o4"), seq_len=8, num_workers=0)
  assert not os.path.exists(tmp_path / "o4")


def test_byte_order_marks_odd_paths_and_symlinks(tmp_path):
  """Files saved with a UTF-8 BOM (Windows tools) read like any other; a directory with glob
  characters in its name is taken literally; a file reached twice through a symlink counts once."""
  from data.sources import expand_input

  d = tmp_path / "corpus[2024]"
  (d / "sub").mkdir(parents=True)
  bom = b"\xef\xbb\xbf"
  (d / "a.jsonl").write_bytes(bom + b'{"text": "first line"}\n{"text": "second line"}\n')
  (d / "b.json").write_bytes(bom + json.dumps([{"text": "in an array"}]).encode())
  (d / "c.txt").write_bytes(bom + b"a text file")
  os.symlink(d / "c.txt", d / "sub" / "again.txt")
  assert expand_input(str(d)) == [str(d / f) for f in ("a.jsonl", "b.json", "c.txt")]
  # A glob below such a directory: its name is literal, the part after it a pattern.
  assert expand_input(str(d / "*.json*")) == [str(d / f) for f in ("a.jsonl", "b.json")]
  assert expand_input(str(d / "*" / "*.txt")) == [str(d / "sub" / "again.txt")]
  out = str(tmp_path / "out")
  meta = prepare(str(d), out, seq_len=16, num_workers=0, eval_fraction=0)
  assert (meta["num_documents"], meta["num_bad_lines"]) == (4, 0)
  tok = load_tokenizer(out)
  assert sorted(tok.decode(x) for x in _documents(out, "train")) == [
    "a text file", "first line", "in an array", "second line",
  ]  # fmt: skip


def test_bad_arguments_fail_before_any_work(tmp_path):
  (tmp_path / "ok.txt").write_text("hello")
  (tmp_path / "afile").write_text("precious")
  ok = str(tmp_path / "ok.txt")
  with pytest.raises(FileExistsError, match="--output=.*afile is a file"):
    prepare(ok, str(tmp_path / "afile"), seq_len=8, num_workers=0)
  assert (tmp_path / "afile").read_text() == "precious"
  with pytest.raises(ValueError, match="--eval_fraction=1e-08 is too small"):
    prepare(ok, str(tmp_path / "o"), seq_len=8, eval_fraction=1e-8, num_workers=0)
  for f in (1.0, 1.5, -0.1):
    with pytest.raises(ValueError, match=f"--eval_fraction={f} must be at least 0 and below 1"):
      prepare(ok, str(tmp_path / "o"), seq_len=8, eval_fraction=f)
  with pytest.raises(ValueError, match="pass only one of them"):
    prepare(ok, str(tmp_path / "o"), seq_len=8, tokenizer="bpe:300", train_tokenizer=300)
  args = ["--input", ok, "--output", str(tmp_path / "o"), "--seq_len=8"]
  with pytest.raises(SystemExit, match="--tokenizer='byte' would be ignored; pass only one of"):
    main([*args, "--train_tokenizer=300", "--tokenizer=byte"])
  with pytest.raises(SystemExit, match=r"^error: --num_workers=-3 must be 0 \(tokenize in this"):
    main([*args, "--num_workers=-3"])
  (tmp_path / "tokenizer.json").write_text('{"foo": 1}')
  with pytest.raises(ValueError, match="is not a tokenizer.json the `tokenizers` library can"):
    prepare(ok, str(tmp_path / "o"), seq_len=8, tokenizer=str(tmp_path / "tokenizer.json"))
  assert sorted(os.listdir(tmp_path)) == ["afile", "ok.txt", "tokenizer.json"]  # No leftovers.
