"""Packing: every token of every document appears exactly once, in order, with right segments."""

import numpy as np
import pytest

from data.packing import Packer, decode_row, encode_rows, pack_documents, record_bytes, row_dtypes

PAD = 999


def _random_docs(rng, n, max_len):
  # Lengths include 1 and multiples of the row length, the edge cases of cutting.
  lengths = rng.integers(1, max_len, n)
  lengths[::7] = 8
  return [rng.integers(0, 500, int(k)).astype(np.int32) for k in lengths]


def _check(docs, rows, row_len):
  tok, seg, pos = rows
  assert tok.shape == seg.shape == pos.shape and tok.shape[1] == row_len
  # Every token exactly once, in order; only the last row has padding, and only at its end.
  valid = seg > 0
  np.testing.assert_array_equal(tok[valid], np.concatenate(docs))
  assert valid[:-1].all()
  assert not np.diff(valid[-1].astype(int)).clip(min=0).any()
  assert (tok[~valid] == PAD).all() and (pos[~valid] == 0).all()
  # Rebuild each document from segments: a segment at the start of a row continues the document
  # that ended the previous row exactly when that document had not ended there.
  ends = np.cumsum([len(d) for d in docs])
  flat_doc = np.searchsorted(ends, np.arange(ends[-1]), side="right")
  t = 0
  for r in range(len(tok)):
    n = int(valid[r].sum())
    docs_here = flat_doc[t : t + n]
    # Segment ids number the distinct documents of the row from 1, in order.
    np.testing.assert_array_equal(seg[r, :n], docs_here - docs_here[0] + 1)
    # Positions count from 0 at each segment start (also for a continued document).
    for s in np.unique(seg[r, :n]):
      np.testing.assert_array_equal(pos[r][seg[r] == s], np.arange((seg[r] == s).sum()))
    t += n


@pytest.mark.parametrize("seed,row_len", [(0, 8), (1, 5), (2, 64), (3, 1)])
def test_pack_documents(seed, row_len):
  docs = _random_docs(np.random.default_rng(seed), 40, 30)
  _check(docs, pack_documents(docs, row_len, PAD), row_len)


def test_streaming_packer_equals_one_shot():
  """Adding documents chunk by chunk (as prepare does) gives the same rows as all at once."""
  rng = np.random.default_rng(5)
  docs, row_len = _random_docs(rng, 60, 25), 8
  packer, parts = Packer(row_len, PAD), []
  for start in range(0, len(docs), 7):
    chunk = docs[start : start + 7]
    parts.append(packer.add(np.concatenate(chunk), [len(d) for d in chunk]))
  parts.append(packer.finish())
  streamed = [np.concatenate([p[i] for p in parts]) for i in range(3)]
  one_shot = pack_documents(docs, row_len, PAD)
  for a, b in zip(streamed, one_shot):
    np.testing.assert_array_equal(a, b)
  _check(docs, tuple(streamed), row_len)


def test_long_document_spans_rows():
  doc = np.arange(20, dtype=np.int32)
  tok, seg, pos = pack_documents([doc, doc[:3]], 8, PAD)
  assert tok.shape == (3, 8)
  np.testing.assert_array_equal(seg[:2], 1)  # The long document fills two rows.
  np.testing.assert_array_equal(seg[2], [1, 1, 1, 1, 2, 2, 2, 0])
  np.testing.assert_array_equal(pos[2], [0, 1, 2, 3, 0, 1, 2, 0])


@pytest.mark.parametrize("vocab", [300, 128256])
def test_record_round_trip(vocab):
  row_len = 9
  docs = [np.random.default_rng(0).integers(0, vocab, 13).astype(np.int32), np.arange(4)]
  rows = pack_documents(docs, row_len, PAD)
  dtypes = row_dtypes(vocab, row_len)
  records = encode_rows(rows, dtypes)
  assert records.shape == (len(rows[0]), record_bytes(row_len, dtypes))
  for r, record in enumerate(records):
    back = decode_row(record.tobytes(), row_len, dtypes)
    for a, b in zip(back, rows):
      np.testing.assert_array_equal(a, b[r])
