"""Tokenizers exported for transformers: AutoTokenizer encodes, decodes and places special
tokens as the training tokenizer does (byte, trained BPE, tiktoken)."""

import base64
import json

import pytest

from tests.common import write_tiktoken

transformers = pytest.importorskip("transformers")


def _tiktoken_file(bpe_json: str, path: str) -> str:
  """A tiktoken tokenizer.model with the byte-level BPE's tokens in its id order after the bytes."""
  from data.tiktoken_fast import bytes_to_unicode

  to_byte = bytes_to_unicode()
  vocab = json.loads(open(bpe_json).read())["model"]["vocab"]
  tokens = []
  for t, i in sorted(vocab.items(), key=lambda kv: kv[1]):
    token = bytes(to_byte[c] for c in t)
    if i >= 3 and len(token) > 1 and token not in tokens:  # Ids 0-2: BOS, EOS, PAD.
      tokens.append(token)
  return write_tiktoken(path, tokens)


@pytest.mark.parametrize("kind", ["byte", "bpe", "tiktoken"])
def test_exported_tokenizer_loads_in_transformers(tmp_path, kind):
  from data.hf_tokenizer import save_for_transformers
  from data.tokenizers import ByteTokenizer, TiktokenTokenizer, train_bpe

  text = "def f(x):\n    return x ** 2  # café 🦙 \r\n\t 数字 end It's  \n\n HTTPServer ababa"
  if kind == "byte":
    ours = ByteTokenizer()
  else:
    corpus = [text * 3, "hello world " * 20, "abab baba aba " * 5]
    ours = train_bpe(corpus, 300 if kind == "bpe" else 400, str(tmp_path / "bpe.json"))
  if kind == "tiktoken":
    model = _tiktoken_file(str(tmp_path / "bpe.json"), str(tmp_path / "tokenizer.model"))
    ours = TiktokenTokenizer(model)
    assert len(ours.encode(text)) < len(text) / 2  # Many merges are exercised.
  ids = save_for_transformers(ours, str(tmp_path / "hf"))
  theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
  for sample in (text, "abababab babab", "  x\n\n\n y  ", "数字数字 🦙🦙"):
    assert theirs.encode(sample, add_special_tokens=False) == ours.encode(sample)
  if kind == "tiktoken":
    assert theirs.convert_tokens_to_ids("<|eot_id|>") == ours.special_tokens["<|eot_id|>"]
    assert len(theirs) == ours.vocab_size
    with open(model, "ab") as f:  # A plain token spelled like a special token: ids would move.
      f.write(base64.b64encode(b"<|eot_id|>") + b" %d\n" % len(ours.ranks))
    with pytest.raises(ValueError, match="spelled like the special tokens"):
      save_for_transformers(TiktokenTokenizer(model), str(tmp_path / "hf2"))
  assert theirs(text)["input_ids"] == ours.encode(text, bos=True)  # BOS first, as in training.
  # Prompts spell special tokens out; both read them as those tokens.
  prompt = "Q: 1+1?<|end_of_text|> A:"
  assert theirs(prompt)["input_ids"] == ours.encode_prompt(prompt)
  assert ours.eos_id in ours.encode_prompt(prompt)
  if kind == "tiktoken":
    chat = "<|eot_id|>x<|start_header_id|>"
    assert theirs(chat)["input_ids"] == ours.encode_prompt(chat)
  assert ids == {
    "bos_token_id": theirs.bos_token_id,
    "eos_token_id": theirs.eos_token_id,
    "pad_token_id": theirs.pad_token_id,
  }
  assert (ids["bos_token_id"], ids["eos_token_id"]) == (ours.bos_id, ours.eos_id)
  assert theirs.decode(ours.encode(text, bos=True, eos=True), skip_special_tokens=True) == text
