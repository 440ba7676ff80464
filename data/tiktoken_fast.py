"""tiktoken as a fast encoder: GPT-2's byte alphabet, a tiktoken twin of a byte-level BPE
`tokenizer.json`, and encoding of huge texts in pieces tiktoken handles quickly."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_PROBE_TEXT = (
  "def f(x):\n    return x ** 2  # Ünïcödé, 数字 12345, émoji 🦙\t\r\n\n  It's they'll 3.14 "
  "HTTPServer __init__ café\u00a0naïve <tag attr='1'>  \n\n\n    end"
)
# tiktoken slows down badly on huge inputs and long runs without whitespace (Meta splits too).
_TIKTOKEN_MAX_CHARS = 400_000
_TIKTOKEN_MAX_RUN = 25_000


def bytes_to_unicode() -> dict[str, int]:
  """GPT-2's byte-level alphabet: printable stand-in character -> byte."""
  bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
  cs = list(bs)
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + len(cs) - 188)  # The 68 unprintable bytes map to chr(256), chr(257), ...
  return {chr(c): b for b, c in zip(bs, cs)}


def tiktoken_twin(spec: dict[str, Any], hf: Any) -> Any:
  """A tiktoken Encoding equal to a byte-level BPE tokenizer.json, or None if there is none.

  tiktoken encodes the same byte-level BPE several times faster than `tokenizers`, which is what
  makes preparation with a BPE tokenizer fast. Only plain byte-level BPE files qualify (ours,
  GPT-2's, Llama 3's); a probe text must encode identically, else `tokenizers` is used.
  """
  import tiktoken

  model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
  if (
    model.get("type") != "BPE"
    or spec.get("normalizer")
    or any(model.get(k) for k in ("byte_fallback", "dropout", "continuing_subword_prefix"))
    or model.get("end_of_word_suffix")
  ):
    return None
  plain_level = pre.get("use_regex", True) and not pre.get("add_prefix_space")
  if pre.get("type") == "ByteLevel" and plain_level:
    pattern = GPT2_PATTERN
  elif pre.get("type") == "Sequence" and [p.get("type") for p in pre["pretokenizers"]] == [
    "Split",
    "ByteLevel",
  ]:
    split, level = pre["pretokenizers"]
    pattern = (split.get("pattern") or {}).get("Regex")
    if not pattern or split.get("invert") or split.get("behavior") != "Isolated":
      return None
    if level.get("use_regex", True) or level.get("add_prefix_space"):
      return None
  else:
    return None
  added = {t["content"] for t in spec.get("added_tokens", [])}
  u2b = bytes_to_unicode()
  try:
    ranks = {bytes(u2b[c] for c in t): i for t, i in model["vocab"].items() if t not in added}
  except KeyError:
    return None
  # tiktoken merges by the rank of the merged token, tokenizers by merge order: they agree
  # when ids never decrease along the merges.
  vocab, last = model["vocab"], -1
  for merge in model.get("merges", []):
    a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
    rank = vocab.get(a + b, -1)
    if rank < max(last, 0):  # Equal ranks: several pairs that make the same token (Llama 3's).
      return None
    last = rank
  try:
    enc = tiktoken.Encoding("twin", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
  except Exception:
    return None
  probe = _PROBE_TEXT
  if enc.encode_ordinary(probe) != hf.encode(probe, add_special_tokens=False).ids:
    return None
  return enc


def _split_long_runs(text: str) -> Iterator[str]:
  """Pieces of `text` with no whitespace/non-whitespace run over _TIKTOKEN_MAX_RUN chars."""
  for start in range(0, len(text), _TIKTOKEN_MAX_CHARS):
    piece = text[start : start + _TIKTOKEN_MAX_CHARS]
    begin, run, prev_space = 0, 0, None
    for i, ch in enumerate(piece):
      space = ch.isspace()
      run = run + 1 if space == prev_space else 1
      prev_space = space
      if run > _TIKTOKEN_MAX_RUN:
        yield piece[begin:i]
        begin, run = i, 1
    yield piece[begin:]


def encode_ordinary(enc: Any, text: str) -> list[int]:
  """`enc.encode_ordinary(text)`, in pieces when `text` is long enough to slow tiktoken down.

  As in Meta's Llama 3 tokenizer, a cut inside a run over 25,000 characters may split a token
  there, so such texts can differ from the `tokenizers` library at the cut.
  """
  if len(text) <= _TIKTOKEN_MAX_RUN:
    return enc.encode_ordinary(text)
  return [i for p in _split_long_runs(text) for i in enc.encode_ordinary(p)]
