"""One tokenizer interface over bytes, HF `tokenizer.json` and Meta's tiktoken `tokenizer.model`."""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterable
from typing import Any

import numpy as np

from data.tiktoken_fast import encode_ordinary, tiktoken_twin

# Meta's Llama 3.1 special tokens; they follow the 128,000 BPE ranks in this order.
LLAMA3_SPECIAL_TOKENS = [
  "<|begin_of_text|>",
  "<|end_of_text|>",
  "<|reserved_special_token_0|>",
  "<|reserved_special_token_1|>",
  "<|finetune_right_pad_id|>",
  "<|step_id|>",
  "<|start_header_id|>",
  "<|end_header_id|>",
  "<|eom_id|>",
  "<|eot_id|>",
  "<|python_tag|>",
]
LLAMA3_NUM_SPECIAL = 256
LLAMA3_PATTERN = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
  r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Special tokens we look for in a tokenizer.json, most specific first.
BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>", "<|endoftext|>")
EOS_NAMES = ("<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>")
PAD_NAMES = ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]")
# Tokens of the BPE tokenizers we train ourselves (ids 0, 1, 2).
TRAINED_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"]
SPEC_FILE = "tokenizer_spec.json"


class Tokenizer:
  """Text <-> token ids, with the BOS/EOS/PAD ids that packing and generation need."""

  kind = ""
  bos_id: int
  eos_id: int
  pad_id: int
  vocab_size: int
  path = ""  # The vocabulary file ('' for bytes).

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without BOS/EOS."""
    raise NotImplementedError

  def _decode(self, ids: list[int]) -> str:
    raise NotImplementedError

  def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
    """Token ids of `text`, optionally framed by BOS and EOS."""
    ids = self.encode_batch([text])[0]
    return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

  @property
  def special_tokens(self) -> dict[str, int]:
    """Special-token text -> id (BOS, EOS, chat headers, ...): what a prompt may spell out."""
    return {}

  def encode_prompt(self, text: str) -> list[int]:
    """Ids of a prompt, BOS first, with special-token text such as '<|eot_id|>' as that token.

    `encode` keeps such text as text (for byte-level vocabularies), so a training document
    cannot forge a control token; a prompt for an instruct model spells its chat headers out,
    and transformers reads them as the tokens they name. A prompt that starts with BOS text gets
    no second BOS. Undecodable bytes (lone surrogates, as from a non-UTF-8 command line)
    become U+FFFD.
    """
    ids = self._encode_specials(re.sub("[\ud800-\udfff]", "\ufffd", text))
    return ids if ids[:1] == [self.bos_id] else [self.bos_id, *ids]

  def _encode_specials(self, text: str) -> list[int]:
    specials = self.special_tokens
    if not specials:
      return self.encode(text)
    # Longest first, so a name that is a prefix of another never cuts it short.
    names = sorted(specials, key=len, reverse=True)
    pieces = re.split("(" + "|".join(map(re.escape, names)) + ")", text)
    plain = iter(self.encode_batch(pieces[0::2]))  # Text and specials alternate.
    ids: list[int] = []
    for i, piece in enumerate(pieces):
      ids.extend([specials[piece]] if i % 2 else next(plain))
    return ids

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`; BOS, EOS and padding are dropped."""
    drop = {self.bos_id, self.eos_id, self.pad_id}
    return self._decode([int(i) for i in ids if int(i) not in drop])

  @functools.cached_property
  def fingerprint(self) -> str:
    """A hash of the vocabulary, so data tokenized differently never counts as the same."""
    h = hashlib.sha256(self.kind.encode())
    if self.path:
      with open(self.path, "rb") as f:
        h.update(f.read())
    return h.hexdigest()[:16]

  def spec(self) -> dict[str, Any]:
    """JSON description stored in a prepared dir's metadata."""
    return {
      "kind": self.kind,
      "file": os.path.basename(self.path),
      "vocab_size": self.vocab_size,
      "bos_id": self.bos_id,
      "eos_id": self.eos_id,
      "pad_id": self.pad_id,
      "fingerprint": self.fingerprint,
    }

  def save(self, directory: str) -> dict[str, Any]:
    """Writes the vocabulary file and tokenizer_spec.json into `directory`; returns `spec()`.

    `load_tokenizer(directory)` then gives this tokenizer back (e.g. from a run's workdir).
    """
    os.makedirs(directory, exist_ok=True)
    if self.path:
      dst = os.path.join(directory, os.path.basename(self.path))
      if os.path.abspath(dst) != os.path.abspath(self.path):
        shutil.copyfile(self.path, dst)
    spec = self.spec()
    with open(os.path.join(directory, SPEC_FILE), "w") as f:
      json.dump(spec, f, indent=2)
    return spec


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes are ids 0..255; BOS 256, EOS 257, PAD 258. Needs no file."""

  kind = "byte"
  bos_id, eos_id, pad_id, vocab_size = 256, 257, 258, 259

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    """UTF-8 bytes of each text."""
    return [list(t.encode("utf-8", "replace")) for t in texts]

  @property
  def special_tokens(self) -> dict[str, int]:
    """BOS, EOS and PAD, under the names the Hugging Face export gives them."""
    return dict(zip(TRAINED_SPECIALS, (self.bos_id, self.eos_id, self.pad_id), strict=True))

  def encode_array(self, text: str) -> np.ndarray:
    """UTF-8 bytes of `text` as an array, without a Python list per token (the fast path)."""
    return np.frombuffer(text.encode("utf-8", "replace"), np.uint8)

  def _decode(self, ids: list[int]) -> str:
    return bytes(i for i in ids if i < 256).decode("utf-8", "replace")


class HFTokenizer(Tokenizer):
  """A Hugging Face `tokenizer.json` (Llama 3's works) through the `tokenizers` library."""

  kind = "hf"

  def __init__(self, path: str):
    from tokenizers import Tokenizer as _Tok

    self.path = path
    try:
      self._tok = _Tok.from_file(path)
      with open(path, encoding="utf-8") as f:
        self._fast = tiktoken_twin(json.load(f), self._tok)
    except Exception as e:  # The tokenizers library raises plain Exceptions.
      raise ValueError(
        f"{path} is not a tokenizer.json the `tokenizers` library can load ({e}); pass a "
        f"Hugging Face tokenizer.json, a tiktoken tokenizer.model or 'byte'."
      ) from e
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    bos, eos, pad = (self._find(n) for n in (BOS_NAMES, EOS_NAMES, PAD_NAMES))
    if eos is None and bos is None:
      raise ValueError(
        f"{path} has no BOS/EOS special token (looked for {BOS_NAMES + EOS_NAMES}); add one."
      )
    self.bos_id = bos if bos is not None else eos
    self.eos_id = eos if eos is not None else bos
    self.pad_id = pad if pad is not None else self.eos_id

  def _find(self, names: tuple[str, ...]) -> int | None:
    for name in names:
      i = self._tok.token_to_id(name)
      if i is not None:
        return i
    return None

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    """Ids of each text; the file's own post-processor (which may add BOS) is not applied."""
    if self._fast is not None:
      return [encode_ordinary(self._fast, t) for t in texts]
    return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

  @functools.cached_property
  def special_tokens(self) -> dict[str, int]:
    """The file's added tokens (which the `tokenizers` library matches in any text it encodes)."""
    return {t.content: i for i, t in self._tok.get_added_tokens_decoder().items()}

  def _encode_specials(self, text: str) -> list[int]:
    # The library itself, with each added token's own matching options (lstrip, single_word).
    return self._tok.encode(text, add_special_tokens=False).ids

  def _decode(self, ids: list[int]) -> str:
    return self._tok.decode(ids, skip_special_tokens=False)


class TiktokenTokenizer(Tokenizer):
  """Meta's tiktoken `tokenizer.model` (a base64 token and rank per line), Llama 3 specials."""

  kind = "tiktoken"

  def __init__(self, path: str):
    import tiktoken

    self.path = path
    ranks = {}
    with open(path, "rb") as f:
      for n, line in enumerate(f):
        if line.strip():
          try:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
          except ValueError as e:
            raise ValueError(
              f"{path} line {n + 1} is not 'base64 rank'; pass a tiktoken tokenizer.model."
            ) from e
    self.ranks = ranks  # token bytes -> id, without the specials
    base = len(ranks)
    names = LLAMA3_SPECIAL_TOKENS + [
      f"<|reserved_special_token_{2 + i}|>"
      for i in range(LLAMA3_NUM_SPECIAL - len(LLAMA3_SPECIAL_TOKENS))
    ]
    self._specials = {name: base + i for i, name in enumerate(names)}
    self._enc = tiktoken.Encoding(
      name=os.path.basename(path),
      pat_str=LLAMA3_PATTERN,
      mergeable_ranks=ranks,
      special_tokens=self._specials,
    )
    self.vocab_size = base + LLAMA3_NUM_SPECIAL
    self.bos_id = self._specials["<|begin_of_text|>"]
    self.eos_id = self._specials["<|end_of_text|>"]
    self.pad_id = self._specials["<|finetune_right_pad_id|>"]

  @property
  def special_tokens(self) -> dict[str, int]:
    """Llama 3's 256 special tokens, whose ids follow the file's ranks."""
    return self._specials

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    """Ids of each text; special-token strings inside the text are encoded as plain text."""
    return [encode_ordinary(self._enc, t) for t in texts]

  def _decode(self, ids: list[int]) -> str:
    return self._enc.decode(ids)


def load_tokenizer(spec_or_path: str) -> Tokenizer:
  """'byte', a tokenizer.json, a tiktoken tokenizer.model, or a prepared dir (its tokenizer)."""
  spec = str(spec_or_path)
  if spec == "byte":
    return ByteTokenizer()
  if spec.startswith("bpe:"):
    raise ValueError(
      f"tokenizer {spec!r} must be trained first: run `python -m data.prepare "
      f"--train_tokenizer={spec[4:]} ...` and use the prepared dir or its tokenizer.json."
    )
  if os.path.isdir(spec):
    return tokenizer_from_prepared(spec)
  if not os.path.exists(spec):
    raise FileNotFoundError(
      f"tokenizer {spec!r} does not exist; pass 'byte', a tokenizer.json or a tokenizer.model."
    )
  with open(spec, "rb") as f:
    head = f.read(1).lstrip()
  # A tokenizer.json is a JSON object; a tiktoken file is lines of base64 and ranks.
  return HFTokenizer(spec) if head == b"{" else TiktokenTokenizer(spec)


def read_json(path: str, keys: tuple[str, ...], fix: str) -> dict[str, Any]:
  """The JSON object in `path` holding `keys`; a file that is not one is a ValueError naming it
  and `fix` (a truncated copy, a file from another tool)."""
  try:
    with open(path, "rb") as f:
      value = json.loads(f.read())
  except ValueError as e:  # Not JSON, or not text at all.
    raise ValueError(f"{path} is not valid JSON ({e}); {fix}.") from None
  missing = [k for k in keys if k not in value] if isinstance(value, dict) else list(keys)
  if missing:
    raise ValueError(f"{path} lacks {', '.join(missing)}; {fix}.")
  return value


def tokenizer_from_prepared(directory: str) -> Tokenizer:
  """The tokenizer saved in a dir: a prepared dir (metadata.json) or `Tokenizer.save`'s output."""
  meta_path, spec_path = (os.path.join(directory, f) for f in ("metadata.json", SPEC_FILE))
  fix = "prepare the data again (python -m data.prepare ... --overwrite)"
  if os.path.exists(meta_path):
    spec = read_json(meta_path, ("tokenizer",), fix)["tokenizer"]
  elif os.path.exists(spec_path):
    spec = read_json(spec_path, ("kind",), "save the tokenizer again")
  else:
    raise FileNotFoundError(
      f"{directory} holds no saved tokenizer; pass a dir written by `python -m data.prepare`."
    )
  if spec["kind"] == "byte":
    return ByteTokenizer()
  return load_tokenizer(os.path.join(directory, spec["file"]))


def train_bpe(texts: Iterable[str], vocab_size: int, path: str) -> HFTokenizer:
  """Trains a byte-level BPE tokenizer of `vocab_size` ids on `texts`; saves tokenizer.json."""
  from tokenizers import Tokenizer as _Tok
  from tokenizers import decoders, models, pre_tokenizers, trainers

  if vocab_size < 256 + len(TRAINED_SPECIALS):
    raise ValueError(f"BPE vocab_size={vocab_size} is too small; use at least 259.")
  tok = _Tok(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=TRAINED_SPECIALS,
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tok.train_from_iterator(texts, trainer=trainer)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tok.save(path)
  return HFTokenizer(path)
