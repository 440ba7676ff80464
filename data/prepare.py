"""Corpus -> packed ArrayRecord rows: python -m data.prepare --input=GLOB --seq_len=N --output=DIR

Tokenizes in worker processes, adds BOS/EOS, packs documents into rows of seq_len + 1 tokens with
segment ids and positions, holds out every k-th document for eval, and writes train-*/eval-*
ArrayRecord shards, the tokenizer file and metadata.json.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import fractions
import glob
import hashlib
import json
import os
import shutil
import signal
import socket
import sys
import time
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np

from data.packing import Packer, encode_rows, record_bytes, row_dtypes
from data.sources import STAT_KEYS, Chunk, Source, no_field_error, open_source, read_chunk
from data.tokenizers import ByteTokenizer, Tokenizer, load_tokenizer, train_bpe
from data.workers import ordered_map

FORMAT_VERSION = 1
# Snappy: fast enough for the byte tokenizer's ~100 MB/s of rows; zstd would be the bottleneck.
_WRITER_OPTIONS = "group_size:1,snappy"
_WORKER: dict[str, Any] = {}
# With no document yet, this many JSON lines without the text field mean the field is wrong.
_NO_FIELD_LIMIT = 1000


def _init_worker(tokenizer_spec: str, dtype: str) -> None:
  os.environ["TOKENIZERS_PARALLELISM"] = "false"  # Parallelism comes from the processes.
  _WORKER["tok"], _WORKER["dtype"] = load_tokenizer(tokenizer_spec), dtype


def _tokenize(chunk: Chunk) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
  """(BOS + tokens + EOS of every document, concatenated; their lengths; read stats)."""
  tok: Tokenizer = _WORKER["tok"]
  docs, stats = read_chunk(chunk)
  if isinstance(tok, ByteTokenizer):
    ids = [tok.encode_array(d) for d in docs]
  else:
    ids = [np.asarray(i, np.int64) for i in tok.encode_batch(docs)]
  bos, eos = np.array([tok.bos_id]), np.array([tok.eos_id])
  parts = [p for i in ids for p in (bos, i, eos)]
  flat = np.concatenate(parts).astype(_WORKER["dtype"]) if parts else np.zeros(0, _WORKER["dtype"])
  return flat, np.array([len(i) + 2 for i in ids], np.int64), stats


class _ShardWriter:
  """Writes records into `prefix-NNNNN.array_record` shards and hashes them in order."""

  def __init__(self, directory: str, prefix: str, rows_per_shard: int):
    self.directory, self.prefix, self.rows_per_shard = directory, prefix, rows_per_shard
    self.files: list[str] = []
    self.num_rows, self._in_shard, self._writer = 0, 0, None
    self.hash = hashlib.sha256()

  def write(self, records: np.ndarray) -> None:
    """Writes each row of `records` (uint8 [R, record_bytes]) as one record."""
    from array_record.python.array_record_module import ArrayRecordWriter

    self.hash.update(records)  # Hashing the concatenation equals hashing record by record.
    for record in records:
      if self._writer is None or self._in_shard == self.rows_per_shard:
        self.close()
        self.files.append(f"{self.prefix}-{len(self.files):05d}.array_record")
        self._writer = ArrayRecordWriter(
          os.path.join(self.directory, self.files[-1]), _WRITER_OPTIONS
        )
      self._writer.write(record.tobytes())
      self._in_shard += 1
      self.num_rows += 1

  def close(self) -> None:
    """Finishes the current shard."""
    if self._writer is not None:
      self._writer.close()
    self._writer, self._in_shard = None, 0


def prepare(
  input: str,
  output: str,
  *,
  seq_len: int,
  tokenizer: str | None = None,  # None: the byte tokenizer, or the one --train_tokenizer trains.
  train_tokenizer: int = 0,
  text_field: str = "text",
  data_dir: str = "",
  eval_fraction: float = 0.01,
  num_workers: int | None = None,
  chunk_bytes: int = 2 << 20,
  shard_bytes: int = 256 << 20,
  tokenizer_train_bytes: int = 200 << 20,
  overwrite: bool = False,
  progress: bool = True,
  source: Source | None = None,
) -> dict[str, Any]:
  """Prepares `input` into `output` (see the module docstring); returns the metadata written."""
  if seq_len < 1:
    raise ValueError(f"--seq_len={seq_len} must be positive.")
  if not 0 <= eval_fraction < 1:
    raise ValueError(f"--eval_fraction={eval_fraction} must be at least 0 and below 1.")
  if num_workers is not None and num_workers < 0:
    raise ValueError(
      f"--num_workers={num_workers} must be 0 (tokenize in this process) or more; leave it unset "
      f"for one per CPU."
    )
  if train_tokenizer and tokenizer is not None:
    raise ValueError(
      f"--train_tokenizer={train_tokenizer} trains a new tokenizer, so --tokenizer={tokenizer!r} "
      f"would be ignored; pass only one of them."
    )
  tokenizer = "byte" if tokenizer is None else tokenizer
  if os.path.exists(output) and not os.path.isdir(output):
    raise FileExistsError(f"--output={output} is a file; give the path of a directory to write.")
  prepared_before = os.path.exists(os.path.join(output, "metadata.json"))
  if prepared_before and not overwrite:
    raise FileExistsError(f"{output} is already prepared; pass --overwrite to replace it.")
  if not prepared_before and os.path.isdir(output) and os.listdir(output):
    # Never delete a directory we did not write.
    raise FileExistsError(f"{output} exists and is not a prepared dataset; pick another --output.")
  source = source or open_source(input, text_field, data_dir)
  start = time.perf_counter()
  output = output.rstrip("/") or output
  _remove_stale_tmp(output)
  tmp = f"{output}{_TMP}{socket.gethostname()}-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  old = f"{tmp}-replaced"  # Where an --overwrite'n output waits until the new one is in place.
  try:
    meta = _prepare_into(
      source,
      tmp,
      input=input,
      seq_len=seq_len,
      tokenizer=tokenizer,
      train_tokenizer=train_tokenizer,
      eval_fraction=eval_fraction,
      num_workers=(os.cpu_count() or 1) if num_workers is None else num_workers,
      chunk_bytes=chunk_bytes,
      shard_bytes=shard_bytes,
      tokenizer_train_bytes=tokenizer_train_bytes,
      progress=progress,
      start=start,
    )
    # Readers only ever see a complete directory: the rename is the commit. An old output is
    # moved aside first and deleted last, so a failure in between can put it back.
    if os.path.exists(output):
      os.replace(output, old)
    os.replace(tmp, output)
  except BaseException:
    if os.path.exists(old) and not os.path.exists(output):
      os.replace(old, output)
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  shutil.rmtree(old, ignore_errors=True)
  if progress:
    print(_summary(meta, output), file=sys.stderr)
  return meta


_TMP = ".tmp-"  # A run writes OUTPUT.tmp-HOST-PID and renames it to OUTPUT when complete.


def _remove_stale_tmp(output: str) -> None:
  """Deletes OUTPUT.tmp-HOST-PID dirs that this host's dead processes (killed runs) left."""
  prefix = f"{output}{_TMP}{socket.gethostname()}-"
  for path in glob.glob(glob.escape(prefix) + "*"):
    pid = path[len(prefix) :]
    if pid.isdigit() and not _alive(int(pid)):
      shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Someone else's process.
    return True
  return True


def _prepare_into(source: Source, out: str, *, input: str, start: float, **kw: Any) -> dict:
  seq_len, row_len = kw["seq_len"], kw["seq_len"] + 1
  vocab = kw["train_tokenizer"]
  if kw["tokenizer"].startswith("bpe:"):
    vocab = int(kw["tokenizer"][4:])
  if vocab:
    if kw["progress"]:
      print(f"training a BPE tokenizer (vocab {vocab}) on {source.name}", file=sys.stderr)
    tok: Tokenizer = train_bpe(
      source.iter_texts(kw["tokenizer_train_bytes"]), vocab, os.path.join(out, "tokenizer.json")
    )
  else:
    tok = load_tokenizer(kw["tokenizer"])
  tok_spec = tok.save(out)
  dtypes = row_dtypes(tok.vocab_size, row_len)
  row_bytes = record_bytes(row_len, dtypes)
  rows_per_shard = max(1, kw["shard_bytes"] // row_bytes)
  writers = {s: _ShardWriter(out, s, rows_per_shard) for s in ("train", "eval")}
  packers = {
    s: Packer(row_len, tok.pad_id, np.dtype(dtypes["tokens"]), np.dtype(dtypes["segment_ids"]))
    for s in writers
  }
  counts = {s: collections.Counter() for s in writers}
  stats = dict.fromkeys(STAT_KEYS, 0)
  frac = kw["eval_fraction"]
  text_field = getattr(source, "text_field", "text")
  num_docs = read = 0
  from tqdm import tqdm

  bar = tqdm(
    total=source.total_bytes, unit="B", unit_scale=True, desc="tokenize+pack",
    disable=not kw["progress"], file=sys.stderr, mininterval=1.0, smoothing=0.1,
  )  # fmt: skip
  init = (tok.path or "byte", dtypes["tokens"])
  tokenize_start = time.perf_counter()
  results = ordered_map(
    _tokenize, source.chunks(kw["chunk_bytes"]), kw["num_workers"], _init_worker, init
  )
  # closing(): an error in this loop's body also stops the workers (the generator's cleanup),
  # and the bar is closed first, so an error's line is the last one printed.
  with contextlib.closing(results), contextlib.closing(bar):
    for flat, lengths, chunk_stats in results:
      for k in STAT_KEYS:
        stats[k] += chunk_stats[k]
      bar.update(chunk_stats["num_bytes"])
      if source.num_examples and source.total_bytes is None:
        # A dataset of known length: the total (so the ETA) from the bytes per example so far.
        read += len(lengths) + chunk_stats["num_empty"] + chunk_stats["num_not_text"]
        bar.total = round(bar.n / max(read, 1) * source.num_examples)
      is_eval = eval_documents(np.arange(num_docs, num_docs + len(lengths)), frac)
      num_docs += len(lengths)
      if num_docs == 0 and stats["num_no_field"] >= _NO_FIELD_LIMIT:
        raise no_field_error(source.name, text_field, first=_NO_FIELD_LIMIT)
      for split, mask in (("train", ~is_eval), ("eval", is_eval)):
        if mask.any():
          tokens = flat if mask.all() else _select_documents(flat, lengths, mask)
          counts[split].update(documents=int(mask.sum()), tokens=len(tokens))
          rows = packers[split].add(tokens, lengths[mask])
          writers[split].write(encode_rows(rows, dtypes))
  if num_docs == 0 and stats["num_no_field"]:
    raise no_field_error(source.name, text_field)
  if num_docs == 0:
    raise ValueError(
      f"--input={input or source.name!r} has no non-empty documents ({stats['num_empty']} empty, "
      f"{stats['num_bad_lines']} bad JSON lines, {stats['num_no_field']} without the text field, "
      f"{stats['num_not_text']} not text, {stats['num_binary_files']} binary files); check the "
      "path and --text_field."
    )
  for split in writers:
    writers[split].write(encode_rows(packers[split].finish(), dtypes))
    writers[split].close()
  fp = hashlib.sha256(f"v{FORMAT_VERSION}:{row_len}:{tok.fingerprint}:{dtypes}".encode())
  for w in writers.values():
    fp.update(w.hash.digest())
  end = time.perf_counter()
  seconds, tokenize_seconds = end - start, end - tokenize_start
  meta = {
    "format_version": FORMAT_VERSION,
    "input": input or source.name,
    "seq_len": seq_len,
    "row_len": row_len,
    "num_rows": writers["train"].num_rows,
    "num_eval_rows": writers["eval"].num_rows,
    "num_documents": counts["train"]["documents"],
    "num_eval_documents": counts["eval"]["documents"],
    "num_tokens": counts["train"]["tokens"],
    "num_eval_tokens": counts["eval"]["tokens"],
    **stats,
    "eval_fraction": frac,
    "dtypes": dtypes,
    "train_files": writers["train"].files,
    "eval_files": writers["eval"].files,
    "tokenizer": tok_spec,
    "fingerprint": fp.hexdigest()[:16],
    "seconds": round(seconds, 2),  # All of it, tokenizer training included.
    "tokenize_seconds": round(tokenize_seconds, 2),
    # Throughput of reading + tokenizing + packing + writing (worker start-up included).
    "mb_per_s": round(stats["num_bytes"] / 1e6 / max(tokenize_seconds, 1e-9), 2),
  }
  with open(os.path.join(out, "metadata.json"), "w") as f:
    json.dump(meta, f, indent=2)
  return meta


def eval_documents(index: np.ndarray, fraction: float) -> np.ndarray:
  """Which of the documents numbered `index` (0, 1, ... in corpus order) are held out for eval.

  Document k >= 1 is, when ceil(k f) > ceil((k - 1) f): documents 1, 1 + 1/f, 1 + 2/f, ... for
  f = 1/n. Exactly ceil((N - 1) f) of the first N are held out, so any corpus of two or more
  documents has an eval split, and the choice depends on the order alone, not on the workers.
  """
  if fraction <= 0:
    return np.zeros(index.shape, bool)
  f = fractions.Fraction(fraction).limit_denominator(1 << 20)
  if f == 0:
    raise ValueError(f"--eval_fraction={fraction} is too small; use at least 1e-6, or 0 for none.")
  k = index.astype(np.int64)
  ceil = lambda x: -(-x * f.numerator // f.denominator)  # noqa: E731
  return (k >= 1) & (ceil(k) > ceil(k - 1))


def _select_documents(flat: np.ndarray, lengths: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Tokens of the documents where `mask` is set, copied run by run rather than token by token."""
  ends = np.cumsum(lengths)
  idx = np.flatnonzero(mask)
  runs = np.split(idx, np.flatnonzero(np.diff(idx) != 1) + 1)
  return np.concatenate([flat[ends[r[0]] - lengths[r[0]] : ends[r[-1]]] for r in runs])


def _summary(meta: dict[str, Any], output: str) -> str:
  skipped = [
    f"{meta[key]} {what}"
    for key, what in (
      ("num_empty", "empty documents"),
      ("num_bad_lines", "JSON lines that do not parse"),
      ("num_no_field", "JSON lines without the text field"),
      ("num_not_text", "texts that are not strings (numbers, lists, objects)"),
      ("num_binary_files", "binary file(s)"),
    )
    if meta[key]
  ]
  return (
    f"prepared {output}: {meta['num_documents']} + {meta['num_eval_documents']} eval documents, "
    f"{meta['num_tokens']} tokens in {meta['num_rows']} + {meta['num_eval_rows']} eval rows of "
    f"{meta['row_len']}; {meta['num_bytes'] / 1e6:.1f} MB tokenized in "
    f"{meta['tokenize_seconds']:.1f}s ({meta['mb_per_s']:.1f} MB/s), {meta['seconds']:.1f}s in all"
    + (f"; skipped {', '.join(skipped)}" if skipped else "")
    + (
      f"; {meta['num_invalid_utf8']} had invalid UTF-8 (replaced with U+FFFD)"
      if meta["num_invalid_utf8"]
      else ""
    )
  )


def main(argv: list[str] | None = None) -> None:
  """The command line; see the module docstring."""
  p = argparse.ArgumentParser(prog="python -m data.prepare", description=__doc__.splitlines()[0])
  arg = p.add_argument
  arg("--input", required=True, help="glob (.txt .jsonl[.gz] .parquet), tfds:NAME:SPLIT, hf:...")
  arg("--output", required=True, help="directory to write")
  arg("--seq_len", type=int, required=True, help="tokens per training sequence")
  arg("--tokenizer", help="byte (default) | tokenizer.json | tokenizer.model | bpe:VOCAB")
  arg("--train_tokenizer", type=int, default=0, help="train a BPE of this vocab size on the input")
  arg("--text_field", default="text", help="JSONL field / Parquet column / dataset feature")
  arg("--data_dir", default="", help="TFDS data_dir (may be gs://...)")
  arg("--eval_fraction", type=float, default=0.01, help="fraction of documents held out")
  arg("--num_workers", type=int, default=None, help="tokenizer processes (default: CPUs)")
  arg("--overwrite", action="store_true", help="replace an existing output")
  a = p.parse_args(argv)
  signal.signal(signal.SIGTERM, _interrupt)  # `kill` cleans up as Ctrl-C does.
  try:
    prepare(
      a.input, a.output, seq_len=a.seq_len, tokenizer=a.tokenizer,
      train_tokenizer=a.train_tokenizer, text_field=a.text_field, data_dir=a.data_dir,
      eval_fraction=a.eval_fraction, num_workers=a.num_workers, overwrite=a.overwrite,
    )  # fmt: skip
  except (ValueError, OSError, ImportError) as e:  # OSError: no permission, a full disk.
    sys.exit(f"error: {e}")
  except BrokenProcessPool:
    sys.exit(
      f"error: a tokenizer worker died (out of memory?); {a.output} is as it was before this "
      "run; rerun with fewer --num_workers."
    )
  except KeyboardInterrupt:
    sys.exit(f"interrupted: {a.output} is as it was before this run; partial output removed.")


def _interrupt(signum: int, frame: Any) -> None:
  raise KeyboardInterrupt


if __name__ == "__main__":
  main()
