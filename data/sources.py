"""Corpus sources: text files, JSONL(.gz), Parquet, TFDS and HF datasets, read as work chunks."""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import gzip
import json
import os
import re
import sys
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

from data.catalog import open_hf, open_tfds

_SURROGATES = re.compile("[\ud800-\udfff]")
_BOM = b"\xef\xbb\xbf"
# Bytes read; documents with invalid UTF-8 (replaced), empty documents, JSON lines that do not
# parse or whose text is not a string, JSON lines without the text field, binary files skipped.
STAT_KEYS = (
  "num_bytes", "num_invalid_utf8", "num_empty", "num_bad_lines", "num_no_field", "num_not_text",
  "num_binary_files",
)  # fmt: skip


@dataclasses.dataclass
class Chunk:
  """A unit of work for one tokenizer worker: file paths, a block of JSONL lines, or texts."""

  kind: str  # 'files' | 'jsonl' | 'texts'
  payload: Any  # list of paths | bytes of whole lines | list of str/bytes
  origin: str  # what to name in error messages
  text_field: str = "text"


def file_kind(path: str) -> str:
  """'jsonl', 'json' (JSON Lines or one array), 'parquet' or 'text' (a document per file)."""
  name = path.lower()
  if name.endswith((".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz")):
    return "jsonl"
  if name.endswith((".json", ".json.gz")):
    return "json"
  if name.endswith(".parquet"):
    return "parquet"
  return "text"


def _open_bytes(path: str) -> Any:
  """The file opened for reading bytes; `.gz` files decompressed on the fly."""
  return gzip.open(path, "rb") if path.lower().endswith(".gz") else open(path, "rb")


@contextlib.contextmanager
def _gzip_errors(path: str) -> Iterator[None]:
  """Turns a damaged `.gz` file's errors, wherever it is read, into one ValueError naming it."""
  try:
    yield
  except (gzip.BadGzipFile, EOFError, zlib.error) as e:
    raise ValueError(f"{path} is not a readable gzip file ({e}); fix or remove it.") from e


def read_text_file(path: str) -> bytes | None:
  """The bytes of a one-document file (gunzipped), or None for a binary file (NULs in its head)."""
  with _gzip_errors(path), _open_bytes(path) as f:
    head = f.read(8192)
    return None if b"\0" in head else head + f.read()


def _is_json_array(path: str) -> bool:
  with _gzip_errors(path), _open_bytes(path) as f:
    head = f.read(4096).removeprefix(_BOM).lstrip()
  return head.startswith(b"[")


def _json_array_lines(path: str) -> list[bytes]:
  """The elements of a file holding one JSON array, one JSON line each."""
  with _gzip_errors(path), _open_bytes(path) as f:
    try:
      items = json.loads(f.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"{path} is not valid JSON ({e}); fix it or write it as JSON Lines.") from e
  return [json.dumps(item).encode() for item in items]


def clean_text(raw: bytes | str | None) -> tuple[str, bool]:
  """(text, had_invalid_utf8): bytes decode with replacement; lone surrogates are replaced; a
  leading byte-order mark (which Windows tools write) is dropped."""
  if raw is None:
    return "", False
  if isinstance(raw, bytes):
    raw = raw.removeprefix(_BOM)
    try:
      return raw.decode("utf-8"), False
    except UnicodeDecodeError:
      return raw.decode("utf-8", "replace"), True
  raw = raw.removeprefix("\ufeff")
  try:
    raw.encode("utf-8")
    return raw, False
  except UnicodeEncodeError:  # JSON may hold "\ud800"; tokenizers reject such strings.
    return _SURROGATES.sub("\ufffd", raw), True


def _json_text(line: bytes, field: str) -> tuple[Any, str, bool]:
  """(text or None, why not, had_invalid_utf8) of one JSON line.

  Why not: '' (a text), 'bad' (not JSON), 'no_field' (no such field), 'not_text' (the field's
  value is not a string).
  """
  text, bad_utf8 = clean_text(line)
  try:
    obj = json.loads(text)
  except json.JSONDecodeError:
    return None, "bad", bad_utf8
  if isinstance(obj, str):  # A line (or array element) that is the text itself.
    return obj, "", bad_utf8
  if not isinstance(obj, dict) or field not in obj:
    return None, "no_field", bad_utf8
  if not isinstance(obj[field], str):
    return None, "not_text", bad_utf8
  return obj[field], "", bad_utf8


def no_field_error(origin: str, field: str, first: int = 0) -> ValueError:
  """The error for JSON records none of which (or none of the `first`) has the text field."""
  which = f"none of the first {first} JSON lines has" if first else "no JSON line has"
  return ValueError(
    f"{origin}: {which} a field {field!r}; set --text_field (data.text_field) to the field that "
    f"holds the text."
  )


def _json_lines(path: str) -> Iterator[bytes]:
  if file_kind(path) == "json" and _is_json_array(path):
    yield from _json_array_lines(path)
    return
  with _gzip_errors(path), _open_bytes(path) as f:
    yield from f


def iter_file_documents(path: str, text_field: str = "text") -> Iterator[Any]:
  """Raw documents of one file, in order.

  Lines that are not JSON, or whose field is missing or not a string, are skipped, with a
  warning for a file where no line has the field. Binary text files yield nothing.
  """
  kind = file_kind(path)
  if kind == "text":
    raw = read_text_file(path)
    if raw is not None:
      yield raw
  elif kind in ("jsonl", "json"):
    found, missing = False, 0
    for line in _json_lines(path):
      if line.strip():
        raw, why, _ = _json_text(line, text_field)
        found |= why in ("", "not_text")
        missing += why == "no_field"
        if raw is not None:
          yield raw
    if missing and not found:
      print(f"warning: {no_field_error(path, text_field)} Its lines are skipped.", file=sys.stderr)
  else:
    for batch in _parquet_batches(path, text_field):
      yield from batch


def _parquet_batches(path: str, field: str) -> Iterator[list[Any]]:
  import pyarrow as pa
  import pyarrow.parquet as pq

  # A damaged file fails on opening (no footer) or mid-read (a bad page): one error naming it.
  try:
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if field not in names:
      raise ValueError(f"{path} has no column {field!r} (has {names}); set --text_field.")
    for batch in pf.iter_batches(columns=[field], batch_size=1024):
      yield batch.column(0).to_pylist()
  except (pa.ArrowException, OSError) as e:
    raise ValueError(f"{path} is not a readable Parquet file ({e}); fix or remove it.") from e


def read_chunk(chunk: Chunk) -> tuple[list[str], dict[str, int]]:
  """The non-empty documents of a chunk, and its counts (`STAT_KEYS`)."""
  stats = dict.fromkeys(STAT_KEYS, 0)
  raws: list[Any] = []
  if chunk.kind == "files":
    for path in chunk.payload:
      raw = read_text_file(path)
      if raw is None:
        stats["num_binary_files"] += 1
      else:
        raws.append(raw)
  elif chunk.kind == "jsonl":
    stats["num_bytes"] = len(chunk.payload)
    for line in chunk.payload.splitlines():
      if line.strip():
        raw, why, bad = _json_text(line, chunk.text_field)
        stats["num_invalid_utf8"] += bad
        if why == "bad":
          stats["num_bad_lines"] += 1
        elif why in ("no_field", "not_text"):
          stats[f"num_{why}"] += 1
        else:
          raws.append(raw)
  else:
    for raw in chunk.payload:
      if raw is None or isinstance(raw, (str, bytes)):
        raws.append(raw)
      else:  # A number, list or dict where the text should be.
        stats["num_not_text"] += 1
  docs = []
  for raw in raws:
    text, bad = clean_text(raw)
    stats["num_invalid_utf8"] += bad
    if chunk.kind != "jsonl":
      stats["num_bytes"] += len(raw) if isinstance(raw, bytes) else len(text.encode("utf-8"))
    if text.strip():
      docs.append(text)
    else:
      stats["num_empty"] += 1
  return docs, stats


def expand_input(pattern: str, flag: str = "--input") -> list[str]:
  """Sorted files matching a glob (or several, comma-separated); a dir means every file in it.

  An existing path is taken as it is, even with glob characters or commas in its name, and so is
  the existing directory a glob starts from (`corpus[2024]/*.txt`). A file reached twice (through
  symlinks) is read once. `flag` is the setting to name when nothing matches.
  """
  expanded = os.path.expanduser(pattern)
  parts = [expanded] if os.path.exists(expanded) else pattern.split(",")
  paths: set[str] = set()
  for part in (os.path.expanduser(p.strip()) for p in parts if p.strip()):
    is_dir = os.path.isdir(part)
    part = _escape_existing(part)
    if is_dir:
      part = os.path.join(part, "**", "*")
    paths.update(p for p in glob.glob(part, recursive=True) if os.path.isfile(p))
  if not paths:
    raise FileNotFoundError(
      f"{flag}={pattern!r} matches no files; check the path (quote globs so the shell keeps them)."
    )
  unique: dict[str, str] = {}
  for p in sorted(paths):
    unique.setdefault(os.path.realpath(p), p)
  return sorted(unique.values())


def _escape_existing(pattern: str) -> str:
  """`pattern` with its longest leading path that exists escaped: glob characters there (a
  directory 'corpus[2024]') are part of a name, not a pattern."""
  head, tail = pattern, ""
  while head and not os.path.exists(head):
    up, name = os.path.split(head)
    if up == head:
      return pattern
    head, tail = up, os.path.join(name, tail) if tail else name
  if not head:
    return pattern
  return os.path.join(glob.escape(head), tail) if tail else glob.escape(head)


class Source:
  """A corpus that yields chunks of work; `total_bytes` is known for local files only."""

  name = ""
  total_bytes: int | None = None
  num_examples: int | None = None  # Known for TFDS and HF datasets.

  def chunks(self, chunk_bytes: int) -> Iterator[Chunk]:
    """Work units of about `chunk_bytes` each, in a fixed order."""
    raise NotImplementedError

  def iter_texts(self, max_bytes: int) -> Iterator[str]:
    """Documents from the start of the corpus, up to about `max_bytes` (tokenizer training)."""
    seen = 0
    for chunk in self.chunks(1 << 20):
      docs, stats = read_chunk(chunk)
      yield from docs
      seen += stats["num_bytes"]
      if seen >= max_bytes:
        return


class FileSource(Source):
  """Local files: text (one document each), JSON Lines or a JSON array, Parquet; `.gz` too."""

  def __init__(self, paths: Sequence[str], text_field: str = "text", name: str = ""):
    self.paths, self.text_field = list(paths), text_field
    self.name = name or ",".join(self.paths[:3]) + (",..." if len(self.paths) > 3 else "")
    # Compressed sizes say little about text bytes: then the progress bar shows no total.
    packed = any(p.lower().endswith((".gz", ".parquet")) for p in self.paths)
    self.total_bytes = None if packed else sum(os.path.getsize(p) for p in self.paths)

  def chunks(self, chunk_bytes: int) -> Iterator[Chunk]:
    """Groups of text files, blocks of JSONL lines, Parquet record batches; in path order."""
    group, size = [], 0
    for path in self.paths:
      kind = file_kind(path)
      if kind == "text":
        group.append(path)
        size += os.path.getsize(path)
        if size >= chunk_bytes:
          yield Chunk("files", group, self.name)
          group, size = [], 0
      elif kind == "json" and _is_json_array(path):
        lines, size_lines = [], 0
        for line in _json_array_lines(path):
          lines.append(line)
          size_lines += len(line) + 1
          if size_lines >= chunk_bytes:
            yield Chunk("jsonl", b"\n".join(lines) + b"\n", path, self.text_field)
            lines, size_lines = [], 0
        if lines:
          yield Chunk("jsonl", b"\n".join(lines) + b"\n", path, self.text_field)
      elif kind in ("jsonl", "json"):
        yield from self._jsonl_chunks(path, chunk_bytes)
      else:
        for batch in _parquet_batches(path, self.text_field):
          yield Chunk("texts", batch, path)
    if group:
      yield Chunk("files", group, self.name)

  def _jsonl_chunks(self, path: str, chunk_bytes: int) -> Iterator[Chunk]:
    rest = b""
    with _gzip_errors(path), _open_bytes(path) as f:
      while block := f.read(chunk_bytes):
        block = rest + block
        cut = block.rfind(b"\n") + 1
        if cut:  # Only whole lines go out; a partial last line waits for the next block.
          rest = block[cut:]
          yield Chunk("jsonl", block[:cut], path, self.text_field)
        else:
          rest = block
    if rest.strip():
      yield Chunk("jsonl", rest, path, self.text_field)


class RandomAccessSource(Source):
  """Any sequence of examples (TFDS or HF data source) whose `text_field` holds the text."""

  def __init__(self, data: Any, text_field: str, name: str):
    self.data, self.text_field, self.name = data, text_field, name
    self.num_examples = len(data)
    if len(data) == 0:
      raise ValueError(f"--input={name!r} is empty; pick another split or dataset.")

  def chunks(self, chunk_bytes: int) -> Iterator[Chunk]:
    """Consecutive ranges of examples, their texts read here (the sources are not picklable)."""
    step = max(1, chunk_bytes // 2048)  # Examples per chunk; web documents are ~2 KB.
    for start in range(0, len(self.data), step):
      rows = [self.data[i] for i in range(start, min(start + step, len(self.data)))]
      yield Chunk("texts", [example_field(r, self.text_field, self.name) for r in rows], self.name)


def example_field(example: Any, field: str, name: str) -> Any:
  """`example[field]`, or one error naming the fields `name`'s examples do have."""
  if field not in example:
    have = list(example)
    raise ValueError(f"{name} examples have no field {field!r} (have {have}); set text_field.")
  return example[field]


def open_source(spec: str, text_field: str = "text", data_dir: str = "") -> Source:
  """`tfds:NAME:SPLIT`, `hf:NAME[:CONFIG]:SPLIT` (or a saved dir), or a glob of local files."""
  if spec.startswith("tfds:"):
    return RandomAccessSource(open_tfds(spec, data_dir), text_field, spec)
  if spec.startswith("hf:"):
    return RandomAccessSource(open_hf(spec), text_field, spec)
  return FileSource(expand_input(spec), text_field, name=spec)
