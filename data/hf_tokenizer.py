"""A tokenizer written where `transformers.AutoTokenizer` finds it, for `model.hf export`."""

from __future__ import annotations

import json
import os
import shutil

from data.tokenizers import (
  TRAINED_SPECIALS,
  ByteTokenizer,
  TiktokenTokenizer,
  Tokenizer,
  bytes_to_unicode,
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


def save_for_transformers(tok: Tokenizer, directory: str) -> dict[str, int]:
  """Writes `tok` where `transformers.AutoTokenizer` looks; returns its config.json token ids.

  A tokenizer.json is copied, and the byte tokenizer written as one (a byte-level BPE without
  merges, ids 0-255 the bytes and 256-258 BOS, EOS, PAD); tokenizer_config.json names the
  special tokens. A tiktoken tokenizer.model is copied as it is: `trainer.generate` reads it,
  transformers does not.
  """
  os.makedirs(directory, exist_ok=True)
  ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
  if isinstance(tok, TiktokenTokenizer):
    shutil.copyfile(tok.path, os.path.join(directory, "tokenizer.model"))
    return ids
  path = os.path.join(directory, "tokenizer.json")
  if isinstance(tok, ByteTokenizer):
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
