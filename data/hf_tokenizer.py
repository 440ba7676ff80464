"""A tokenizer written where `transformers.AutoTokenizer` finds it, for `model.hf export`."""

from __future__ import annotations

import json
import os
import shutil

from data.tiktoken_fast import bytes_to_unicode
from data.tokenizers import (
  LLAMA3_PATTERN,
  TRAINED_SPECIALS,
  ByteTokenizer,
  TiktokenTokenizer,
  Tokenizer,
)


def _prepend_bos(path: str, bos: str, bos_id: int) -> None:
  """Gives a tokenizer.json without a post-processor one that starts every text with BOS, as
  training did (transformers applies it by default; this project's own encoding never does)."""
  from tokenizers import Tokenizer as _Tok
  from tokenizers import processors

  fast = _Tok.from_file(path)
  if fast.post_processor is None:
    fast.post_processor = processors.TemplateProcessing(
      single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
    )
    fast.save(path)


def tiktoken_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
  """The BPE merges that reproduce tiktoken's encoding with `ranks`, in priority order.

  tiktoken joins, at each step, the adjacent pair whose joined bytes have the lowest rank. A BPE
  merge list does the same when it holds every split of every token into two tokens, ordered by
  the rank of the token they make (the splits of one token by the ranks of their parts).
  """
  pairs = []
  for token, rank in ranks.items():
    for i in range(1, len(token)):
      left, right = token[:i], token[i:]
      if left in ranks and right in ranks:
        pairs.append((rank, ranks[left], ranks[right], left, right))
  pairs.sort()
  return [(left, right) for *_, left, right in pairs]


def _tiktoken_json(tok: TiktokenTokenizer, path: str) -> None:
  """Writes a tiktoken tokenizer as the equivalent byte-level BPE tokenizer.json."""
  from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
  from tokenizers import Tokenizer as _Tok

  to_text = {b: c for c, b in bytes_to_unicode().items()}
  text = lambda token: "".join(to_text[b] for b in token)
  model = models.BPE(
    vocab={text(t): i for t, i in tok.ranks.items()},
    merges=[(text(a), text(b)) for a, b in tiktoken_merges(tok.ranks)],
    ignore_merges=True,  # As tiktoken: a piece that is a token is taken whole.
  )
  fast = _Tok(model)
  fast.pre_tokenizer = pre_tokenizers.Sequence(
    [
      pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ]
  )
  fast.decoder = decoders.ByteLevel()
  specials = sorted(tok.special_tokens.items(), key=lambda kv: kv[1])
  fast.add_special_tokens([AddedToken(n, special=True, normalized=False) for n, _ in specials])
  moved = [name for name, i in specials if fast.token_to_id(name) != i]
  if moved:
    raise ValueError(
      f"{tok.path} has tokens spelled like the special tokens {moved[:3]}, which transformers "
      f"would give other ids; remove them from the tokenizer.model or export a tokenizer.json."
    )
  fast.save(path)


def save_for_transformers(tok: Tokenizer, directory: str) -> dict[str, int]:
  """Writes `tok` where `transformers.AutoTokenizer` looks; returns its config.json token ids.

  A tokenizer.json is copied, the byte tokenizer written as one (a byte-level BPE without
  merges, ids 0-255 the bytes and 256-258 BOS, EOS, PAD), and a tiktoken tokenizer.model
  converted into one (the same ids, Llama 3's split pattern and special tokens), with the
  tokenizer.model itself copied beside it; tokenizer_config.json names the special tokens.
  """
  os.makedirs(directory, exist_ok=True)
  ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
  path = os.path.join(directory, "tokenizer.json")
  if isinstance(tok, TiktokenTokenizer):
    shutil.copyfile(tok.path, os.path.join(directory, "tokenizer.model"))
    _tiktoken_json(tok, path)
    by_id = {i: name for name, i in tok.special_tokens.items()}
    names = {
      "bos_token": by_id[tok.bos_id],
      "eos_token": by_id[tok.eos_id],
      "pad_token": by_id[tok.pad_id],
    }
  elif isinstance(tok, ByteTokenizer):
    from tokenizers import Tokenizer as _Tok
    from tokenizers import decoders, models, pre_tokenizers

    fast = _Tok(models.BPE(vocab=bytes_to_unicode(), merges=[]))
    fast.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    fast.decoder = decoders.ByteLevel()
    fast.add_special_tokens(TRAINED_SPECIALS)  # Ids 256, 257, 258: BOS, EOS, PAD.
    fast.save(path)
    names = dict(zip(("bos_token", "eos_token", "pad_token"), TRAINED_SPECIALS))
  else:
    shutil.copyfile(tok.path, path)
    names = {
      name: tok._tok.id_to_token(i)
      for name, i in (
        ("bos_token", tok.bos_id),
        ("eos_token", tok.eos_id),
        ("pad_token", tok.pad_id),
      )
    }
  _prepend_bos(path, names["bos_token"], tok.bos_id)
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", **names}, f, indent=2)
  return ids
