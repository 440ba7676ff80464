"""Tokenizers: round trips for byte / tokenizer.json / tiktoken files built here (no downloads)."""

import os

import pytest

from data.tiktoken_fast import encode_ordinary
from data.tokenizers import (
  LLAMA3_PATTERN,
  ByteTokenizer,
  HFTokenizer,
  TiktokenTokenizer,
  load_tokenizer,
  train_bpe,
)
from tests.common import write_tiktoken

TEXTS = [
  "Hello, world! The theme of the thesis is there.",
  "def f(x):\n    return x ** 2  # squares\n\n\tindented\r\n",
  "Ünïcödé: naïve café, 数字 12345678, emoji 🦙🦙, Ελληνικά",
  "  leading and trailing spaces  ",
  "a",
]
CORPUS = [t * 3 for t in TEXTS] + ["the cat sat on the mat with the other cat"] * 20


def test_byte_round_trip_and_specials():
  tok = ByteTokenizer()
  for text in TEXTS:
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert ids[1:-1] == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
  assert max(tok.bos_id, tok.eos_id, tok.pad_id) < tok.vocab_size == 259


def test_trained_bpe_round_trip_and_tiktoken_twin(tmp_path):
  tok = train_bpe(iter(CORPUS), 320, str(tmp_path / "tokenizer.json"))
  assert tok.vocab_size == 320
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
  assert tok._fast is not None  # Plain byte-level BPE: encoded by tiktoken, faster.
  for text in TEXTS:
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == text
    # The fast twin must agree with the `tokenizers` library itself, token for token.
    assert ids[1:-1] == tok._tok.encode(text, add_special_tokens=False).ids
  # Merges were learned: a frequent word is fewer tokens than bytes.
  assert len(tok.encode("the cat sat on the mat")) < len("the cat sat on the mat")
  # load_tokenizer recognizes the file, and a saved copy loads back.
  again = load_tokenizer(str(tmp_path / "tokenizer.json"))
  assert isinstance(again, HFTokenizer) and again.encode(TEXTS[0]) == tok.encode(TEXTS[0])
  tok.save(str(tmp_path / "saved"))
  assert load_tokenizer(str(tmp_path / "saved")).encode(TEXTS[2]) == tok.encode(TEXTS[2])


def test_llama3_style_tokenizer_json(tmp_path):
  """A tokenizer.json shaped like Llama 3's (Split regex + ByteLevel, added special tokens)."""
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

  hf = Tokenizer(models.BPE(ignore_merges=True))
  hf.pre_tokenizer = pre_tokenizers.Sequence(
    [
      pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ]
  )
  hf.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
  )
  hf.train_from_iterator(CORPUS, trainer=trainer)
  hf.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>"])
  path = str(tmp_path / "tokenizer.json")
  hf.save(path)
  tok = load_tokenizer(path)
  assert isinstance(tok, HFTokenizer) and tok._fast is not None
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (300, 301, 302)
  assert tok.vocab_size == 303
  for text in TEXTS:
    ids = tok.encode(text)
    assert ids == hf.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text


def test_tiktoken_round_trip(tmp_path):
  path = write_tiktoken(tmp_path / "tokenizer.model", [b"th", b"he", b"the", b" t", b" the"])
  tok = load_tokenizer(path)
  assert isinstance(tok, TiktokenTokenizer)
  assert tok.vocab_size == 261 + 256
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (261, 262, 265)
  assert tok.encode(" the") == [260]  # The merges are used.
  for text in TEXTS + ["<|end_of_text|> is plain text here"]:
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert all(i < 261 for i in ids[1:-1])  # Special-token strings in text stay text.
    assert tok.decode(ids) == text
  long_run = "x" * 30_000 + " " + "y" * 5  # Longer than tiktoken's safe run; split, not lost.
  assert tok.decode(tok.encode(long_run)) == long_run


def test_huge_texts_reach_tiktoken_in_pieces():
  """Both tiktoken paths (tokenizer.model, a tokenizer.json's twin) cap what tiktoken sees at
  once: 400,000 characters, and no run of whitespace or non-whitespace over 25,000."""

  class Recorder:
    def __init__(self):
      self.pieces = []

    def encode_ordinary(self, text):
      self.pieces.append(text)
      return [len(text)]

  enc = Recorder()
  text = "a" * 60_000 + " " * 3 + "b c " * 150_000
  assert encode_ordinary(enc, text) == [len(p) for p in enc.pieces]
  assert "".join(enc.pieces) == text
  # The run of 60,000 "a" is cut twice; the rest is cut at 400,000 characters.
  assert [len(p) for p in enc.pieces] == [25_000, 25_000, 350_000, 260_003]
  enc.pieces.clear()
  assert encode_ordinary(enc, "short text") == [10] and enc.pieces == ["short text"]


def test_tiktoken_llama3_special_ids(tmp_path):
  """With 128,000 ranks, as in Meta's file, the special tokens get Llama 3's ids."""
  extra = [b"%d." % i for i in range(128_000 - 256)]
  tok = TiktokenTokenizer(write_tiktoken(tmp_path / "tokenizer.model", extra))
  assert tok.bos_id == 128000 and tok.eos_id == 128001
  assert tok.special_tokens["<|eot_id|>"] == 128009 and tok.pad_id == 128004
  assert tok.special_tokens["<|reserved_special_token_246|>"] == 128255
  assert tok.vocab_size == 128256
  assert tok.decode(tok.encode(TEXTS[2], bos=True)) == TEXTS[2]


def test_prompts_read_special_token_text_documents_do_not(tmp_path):
  chat = "<|start_header_id|>user<|end_header_id|>\n\nHi the<|eot_id|><|start_header_id|>"
  tik = TiktokenTokenizer(write_tiktoken(tmp_path / "tokenizer.model", [b"th", b"the", b" the"]))
  s = tik.special_tokens
  ids = tik.encode_prompt(chat)
  assert ids == [
    tik.bos_id,
    s["<|start_header_id|>"],
    *tik.encode("user"),
    s["<|end_header_id|>"],
    *tik.encode("\n\nHi the"),
    s["<|eot_id|>"],
    s["<|start_header_id|>"],
  ]
  assert ids[1:] == tik._enc.encode(chat, allowed_special="all")  # tiktoken's own reading
  assert tik.decode(ids) == chat
  assert all(i < 259 for i in tik.encode(chat))  # A document's text stays text.
  bpe = train_bpe(iter(CORPUS), 320, str(tmp_path / "tokenizer.json"))
  text = "the cat<|end_of_text|> sat<|pad|>"
  expected = [0, *bpe.encode("the cat"), 1, *bpe.encode(" sat"), 2]
  assert bpe.encode_prompt(text) == expected
  assert bpe.encode_prompt("<|begin_of_text|>" + text) == expected  # No second BOS.
  assert 1 not in bpe.encode(text)
  byte = ByteTokenizer()
  assert byte.encode_prompt("x<|end_of_text|>") == [256, 120, 257]
  assert byte.encode_prompt("<|begin_of_text|>x") == [256, 120]
  assert byte.encode_prompt("") == [256]
  # Bytes that were not UTF-8 on the command line arrive as lone surrogates: U+FFFD each.
  for tok in (bpe, tik, byte):
    assert tok.encode_prompt("\udcffab") == tok.encode_prompt("\ufffdab"), tok.kind


def test_bad_tokenizer_specs(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_tokenizer(str(tmp_path / "missing.json"))
  with pytest.raises(ValueError, match="train_tokenizer=4096"):
    load_tokenizer("bpe:4096")
  bad = tmp_path / "bad.model"
  bad.write_text("not a tiktoken line at all\n")
  with pytest.raises(ValueError, match="line 1"):
    load_tokenizer(str(bad))
  os.makedirs(tmp_path / "empty_dir")
  with pytest.raises(FileNotFoundError, match="no saved tokenizer"):
    load_tokenizer(str(tmp_path / "empty_dir"))
