"""Prompt in, text out: python -m trainer.generate (--workdir=D | --hf_checkpoint=D) --prompt=..."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from absl import app, flags, logging

# Where an HF dir keeps its tokenizer, in the order we look (Meta's releases use original/).
_HF_TOKENIZER_FILES = (
  "tokenizer.json",
  "tokenizer.model",
  os.path.join("original", "tokenizer.model"),
)


def load_model(
  workdir: str | None = None, hf_checkpoint: str | None = None
) -> tuple[Any, Any, Any]:
  """(ModelConfig, params, tokenizer) of a training workdir or of an HF checkpoint dir."""
  from data.tokenizers import load_tokenizer  # noqa: PLC0415 - keeps `--help` fast.

  if (workdir is None) == (hf_checkpoint is None):
    raise ValueError("Pass exactly one of --workdir and --hf_checkpoint.")
  if workdir is not None:
    from trainer.checkpoint import restore_params  # noqa: PLC0415

    config, params = restore_params(workdir)
    tok_dir = os.path.join(workdir, "tokenizer")
    if not os.path.isdir(tok_dir):
      raise FileNotFoundError(
        f"{workdir} has no tokenizer/ (a run on synthetic data has no text); train on text data "
        "or use --hf_checkpoint."
      )
    return config, params, load_tokenizer(tok_dir)
  from model.hf import load_hf  # noqa: PLC0415

  if not os.path.isdir(hf_checkpoint):
    raise FileNotFoundError(
      f"--hf_checkpoint={hf_checkpoint} is not a directory; pass a local Hugging Face model dir "
      f"(nothing is downloaded)."
    )
  # Find the tokenizer before reading what may be gigabytes of weights.
  paths = [os.path.join(hf_checkpoint, name) for name in _HF_TOKENIZER_FILES]
  tokenizer_path = next((p for p in paths if os.path.isfile(p)), None)
  if tokenizer_path is None:
    raise FileNotFoundError(
      f"{hf_checkpoint} has none of {list(_HF_TOKENIZER_FILES)}; copy the model's tokenizer there."
    )
  config, params = load_hf(hf_checkpoint)
  return config, params, load_tokenizer(tokenizer_path)


def hf_stop_ids(hf_dir: str) -> tuple[int, ...]:
  """The ids that end a text for an HF model: `eos_token_id` of its generation_config.json, else
  of its config.json (Llama 3.1 Instruct lists <|end_of_text|>, <|eom_id|> and <|eot_id|>)."""
  for name in ("generation_config.json", "config.json"):
    try:
      with open(os.path.join(hf_dir, name)) as f:
        value = json.load(f).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
      continue
    ids = value if isinstance(value, list) else [value]
    if ids and all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
      return tuple(ids)
  return ()


def generate_text(
  prompt: str,
  *,
  workdir: str | None = None,
  hf_checkpoint: str | None = None,
  max_new_tokens: int = 64,
  temperature: float = 0.0,
  top_k: int = 0,
  top_p: float = 1.0,
  seed: int = 0,
) -> str:
  """The prompt and its continuation by the model of `workdir` or `hf_checkpoint`."""
  from model.generate import check_sampling, sample_text  # noqa: PLC0415

  check_sampling(max_new_tokens, temperature, top_k, top_p)  # Before loading any weights.
  config, params, tokenizer = load_model(workdir, hf_checkpoint)
  if tokenizer.vocab_size > config.vocab_size:
    raise ValueError(
      f"The tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is "
      f"{config.vocab_size}; use the tokenizer the model was trained with."
    )
  prompt_len = len(tokenizer.encode_prompt(prompt))
  room = config.max_seq_len - prompt_len
  if room < 1:
    raise ValueError(
      f"The prompt is {prompt_len} tokens (with BOS) but the model's max_seq_len is "
      f"{config.max_seq_len}; shorten the prompt."
    )
  if max_new_tokens > room:
    logging.warning(
      "Generating %d tokens, not %d: the prompt's %d tokens leave that much of max_seq_len=%d.",
      room,
      max_new_tokens,
      prompt_len,
      config.max_seq_len,
    )
  return sample_text(
    config,
    params,
    tokenizer,
    prompt,
    max_new_tokens=max_new_tokens,
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
    seed=seed,
    stop_ids=hf_stop_ids(hf_checkpoint) if hf_checkpoint else (),
  )


def define_flags() -> None:
  """The CLI's flags; defined only when run as a script, so importing this never clashes."""
  flags.DEFINE_string("workdir", None, "A training run's workdir (its newest checkpoint).")
  flags.DEFINE_string("hf_checkpoint", None, "A Hugging Face Llama dir (config.json, weights).")
  flags.DEFINE_string("prompt", "", "Text to continue.")
  flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate.")
  flags.DEFINE_float("temperature", 0.0, "0 is greedy; otherwise sample.")
  flags.DEFINE_integer("top_k", 0, "Sample among the k likeliest tokens (0: all).")
  flags.DEFINE_float("top_p", 1.0, "Sample within this probability mass (1: all).")
  flags.DEFINE_integer("seed", 0, "Sampling seed; the same seed gives the same text.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}; did you quote --prompt?")
  # Orbax narrates a read-only restore at INFO: warnings (a shortened generation) still show.
  logging.set_verbosity(logging.WARNING)
  f = flags.FLAGS
  try:
    text = generate_text(
      f.prompt,
      workdir=f.workdir,
      hf_checkpoint=f.hf_checkpoint,
      max_new_tokens=f.max_new_tokens,
      temperature=f.temperature,
      top_k=f.top_k,
      top_p=f.top_p,
      seed=f.seed,
    )
  except (ValueError, FileNotFoundError) as e:
    if os.environ.get("LLAMA_TRACEBACK"):
      raise
    sys.exit(f"error: {e}")
  print(text)


if __name__ == "__main__":
  define_flags()
  app.run(main)
