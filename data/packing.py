"""Packs tokenized documents into fixed rows with segment ids and positions; row records on disk."""

from __future__ import annotations

from typing import Any

import numpy as np

Rows = tuple[np.ndarray, np.ndarray, np.ndarray]  # tokens, segment_ids, positions; each [R, L]


def rows_from_stream(
  tokens: np.ndarray,
  doc_starts: np.ndarray,
  row_len: int,
  num_valid: int,
  meta_dtype: Any = np.int32,
) -> Rows:
  """Cuts a token stream (length a multiple of row_len) into rows with segment ids and positions.

  `doc_starts` are the offsets where documents begin; tokens from `num_valid` on are padding.
  Segment ids number the document pieces of a row from 1 (0 is padding). Positions restart at 0
  in every row, also for a document continued from the previous row (as grain's ConcatThenSplit
  does), so they never exceed the row length. Work is per piece, not per token, where possible.
  """
  n = len(tokens)
  cuts = np.union1d(doc_starts[doc_starts < num_valid], np.arange(0, n, row_len))
  if num_valid < n:
    cuts = np.union1d(cuts, [num_valid])
  lengths = np.diff(np.append(cuts, n))
  piece_seg = np.arange(len(cuts)) - np.searchsorted(cuts, cuts - cuts % row_len) + 1
  piece_seg[cuts >= num_valid] = 0
  seg = np.repeat(piece_seg.astype(meta_dtype), lengths)
  # Column in the row minus the column where the piece starts; every row start is a cut. Done in
  # the small output dtype: this is the hot loop of preparation.
  col = np.tile(np.arange(row_len, dtype=meta_dtype), n // row_len)
  pos = col - np.repeat((cuts % row_len).astype(meta_dtype), lengths)
  pos[num_valid:] = 0
  shape = (-1, row_len)
  return tokens.reshape(shape), seg.reshape(shape), pos.reshape(shape)


class Packer:
  """Concatenates documents and cuts rows of `row_len` tokens; a long document spans rows."""

  def __init__(self, row_len: int, pad_id: int, dtype: Any = np.int32, meta_dtype: Any = np.int32):
    self.row_len, self.pad_id, self.dtype, self.meta_dtype = row_len, pad_id, dtype, meta_dtype
    self._tok = np.zeros(0, dtype)
    self._starts = np.zeros(0, np.int64)  # Document starts within self._tok.

  def add(self, tokens: np.ndarray, lengths: np.ndarray) -> Rows:
    """Appends documents (`tokens` is their concatenation); returns the rows now complete."""
    lengths = np.asarray(lengths, np.int64)
    offsets = len(self._tok) + np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    tok = np.concatenate([self._tok, np.asarray(tokens, self.dtype)])
    starts = np.concatenate([self._starts, offsets[lengths > 0]])
    cut = len(tok) - len(tok) % self.row_len
    self._tok, self._starts = tok[cut:], starts[starts >= cut] - cut
    return rows_from_stream(tok[:cut], starts[starts < cut], self.row_len, cut, self.meta_dtype)

  def finish(self) -> Rows:
    """The last, padded row (no rows if nothing is left over)."""
    n = len(self._tok)
    tok = np.concatenate([self._tok, np.full((-n) % self.row_len, self.pad_id, self.dtype)])
    rows = rows_from_stream(tok, self._starts, self.row_len, n, self.meta_dtype)
    self._tok, self._starts = self._tok[:0], self._starts[:0]
    return rows


def pack_documents(docs: list[np.ndarray], row_len: int, pad_id: int) -> Rows:
  """All rows for a list of token arrays (the last row padded)."""
  packer = Packer(row_len, pad_id)
  lengths = np.array([len(d) for d in docs], np.int64)
  flat = np.concatenate(docs) if docs else np.zeros(0, np.int32)
  parts = [packer.add(flat, lengths), packer.finish()]
  return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))  # type: ignore[return-value]


def row_dtypes(vocab_size: int, row_len: int) -> dict[str, str]:
  """The smallest dtypes that hold tokens and segment ids/positions: rows are 2-3x smaller."""
  return {
    "tokens": "uint16" if vocab_size <= 2**16 else "int32",
    "segment_ids": "uint16" if row_len < 2**16 else "int32",
  }


def encode_rows(rows: Rows, dtypes: dict[str, str]) -> np.ndarray:
  """Records [R, record_bytes] (uint8): a row's tokens, then its segment ids, then positions.

  Written straight into one buffer: at ~100 MB/s of rows, every extra copy shows.
  """
  tok, seg, pos = rows
  n, row_len = tok.shape
  tok_dt, meta_dt = np.dtype(dtypes["tokens"]), np.dtype(dtypes["segment_ids"])
  a, b = row_len * tok_dt.itemsize, row_len * meta_dt.itemsize
  out = np.empty((n, a + 2 * b), np.uint8)
  out[:, :a].view(tok_dt)[:] = tok
  out[:, a : a + b].view(meta_dt)[:] = seg
  out[:, a + b :].view(meta_dt)[:] = pos
  return out


def record_bytes(row_len: int, dtypes: dict[str, str]) -> int:
  """Size of one encoded row."""
  tok, meta = np.dtype(dtypes["tokens"]), np.dtype(dtypes["segment_ids"])
  return row_len * (tok.itemsize + 2 * meta.itemsize)


def decode_row(record: bytes, row_len: int, dtypes: dict[str, str]) -> Rows:
  """Inverse of encode_rows for one record: (tokens, segment_ids, positions), each int32 [L]."""
  tok_dt, seg_dt = np.dtype(dtypes["tokens"]), np.dtype(dtypes["segment_ids"])
  n_tok = row_len * tok_dt.itemsize
  tok = np.frombuffer(record, tok_dt, row_len).astype(np.int32)
  rest = np.frombuffer(record, seg_dt, 2 * row_len, offset=n_tok).astype(np.int32)
  return tok, rest[:row_len], rest[row_len:]
