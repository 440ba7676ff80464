"""Converts between Hugging Face Llama dirs and Orbax params dirs the trainer starts from.

python -m model.hf import --hf_dir=Llama-3.2-1B --output=ckpt/llama1b
python -m model.hf export --checkpoint=ckpt/llama1b --output=hf/llama1b [--overwrite]

Both refuse an --output that is a file or a directory with files in it; export's --overwrite then
replaces the Hugging Face model files there (weights, shard index, config.json,
generation_config.json, tokenizer files) and leaves any other file alone. An import keeps the HF
dir's token ids, tokenizer and generation config in the params dir; an export of it writes them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging as absl_logging
from flax.linen import meta

from model.config import ModelConfig
from model.hf import load_hf, save_hf
from model.params import is_scanned

log = logging.getLogger(__name__)

MODEL_CONFIG_FILE = "model_config.json"
# Where an import keeps what the Hugging Face dir held beyond the weights (its config.json's token
# ids, tokenizer and generation config), for an export of the params dir to write back.
HF_FILES_DIR = "hf_files"
_TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
# What an export writes, and what an earlier model's files there would mislead a reader with (an
# old generation_config.json's eos ids, an old tokenizer, a shard index naming old shards).
_HF_MODEL_FILES = (
  "config.json",
  "generation_config.json",
  "tokenizer.json",
  "tokenizer_config.json",
  "tokenizer.model",
  "special_tokens_map.json",
  "added_tokens.json",
  "chat_template.jinja",
)
_HF_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json")


def check_output(
  out_dir: str, fix: str = "pick a new output directory", *, overwrite: bool = False
) -> None:
  """Raises ValueError if `out_dir` is a file, or (unless `overwrite`) a non-empty directory."""
  if os.path.isdir(out_dir):
    if os.listdir(out_dir) and not overwrite:
      raise ValueError(f"{out_dir} already exists and is not empty; {fix}.")
  elif os.path.lexists(out_dir):
    raise ValueError(f"{out_dir} exists and is not a directory; pick a new output directory.")


def _remove_hf_model(hf_dir: str) -> None:
  """Removes the Hugging Face model files in `hf_dir` (see _HF_MODEL_FILES), nothing else."""
  for name in os.listdir(hf_dir):
    path = os.path.join(hf_dir, name)
    weights = name.startswith(("model", "pytorch_model")) and name.endswith(_HF_WEIGHT_SUFFIXES)
    if (weights or name in _HF_MODEL_FILES) and not os.path.isdir(path):
      os.remove(path)
      log.info("Removed %s (--overwrite)", path)


def save_params_dir(config: ModelConfig, params: Mapping[str, Any], out_dir: str) -> None:
  """Writes an Orbax checkpoint of {'params': params} at `out_dir`, plus model_config.json."""
  import orbax.checkpoint as ocp

  out_dir = os.path.abspath(out_dir)
  check_output(out_dir)
  params = meta.unbox(params)
  config = config.replace(scan_layers=is_scanned(params))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(out_dir, {"params": params}, force=True)
    ckptr.wait_until_finished()
  with open(os.path.join(out_dir, MODEL_CONFIG_FILE), "w") as f:
    json.dump(config.to_dict(), f, indent=2)


def load_params_dir(params_dir: str) -> tuple[ModelConfig, dict[str, Any]]:
  """Reads what `save_params_dir` wrote: (ModelConfig, params as host numpy arrays)."""
  import orbax.checkpoint as ocp

  params_dir = os.path.abspath(params_dir)
  cfg_path = os.path.join(params_dir, MODEL_CONFIG_FILE)
  if not os.path.isfile(cfg_path):
    raise ValueError(
      f"{params_dir} has no {MODEL_CONFIG_FILE}; give a directory written by "
      "`python -m model.hf import` or save_params_dir."
    )
  with open(cfg_path) as f:
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    config = ModelConfig(**{k: v for k, v in json.load(f).items() if k in fields})
  try:
    with ocp.StandardCheckpointer() as ckptr:
      tree = ckptr.metadata(params_dir).item_metadata.tree
      target = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), tree)
      params = ckptr.restore(params_dir, target)["params"]
  except Exception as e:  # noqa: BLE001 - any damage (missing, truncated files) is one error.
    why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    raise ValueError(
      f"{params_dir} has {MODEL_CONFIG_FILE} but its parameters do not restore ({why}); run "
      "`python -m model.hf import` into a new directory again."
    ) from None
  return config, params


def _keep_hf_files(hf_dir: str, params_dir: str) -> None:
  """Copies the HF dir's token ids, tokenizer and generation config into params_dir/hf_files."""
  keep = os.path.join(params_dir, HF_FILES_DIR)
  os.makedirs(keep)
  with open(os.path.join(hf_dir, "config.json")) as f:
    hf_config = json.load(f)
  ids = {k: hf_config[k] for k in _TOKEN_ID_KEYS if hf_config.get(k) is not None}
  with open(os.path.join(keep, "token_ids.json"), "w") as f:
    json.dump(ids, f, indent=2)
  for name in _HF_MODEL_FILES:
    if name != "config.json" and os.path.isfile(os.path.join(hf_dir, name)):
      shutil.copyfile(os.path.join(hf_dir, name), os.path.join(keep, name))


def _kept_hf_files(params_dir: str, staging: str) -> dict[str, Any]:
  """Copies what _keep_hf_files kept into `staging`; returns the token ids for config.json."""
  keep = os.path.join(params_dir, HF_FILES_DIR)
  if not os.path.isdir(keep):
    return {}
  for name in os.listdir(keep):
    if name in _HF_MODEL_FILES:
      shutil.copyfile(os.path.join(keep, name), os.path.join(staging, name))
  with open(os.path.join(keep, "token_ids.json")) as f:
    return json.load(f)


def _import(args: argparse.Namespace) -> None:
  check_output(os.path.abspath(args.output))  # Before reading what may be gigabytes of weights.
  config, params = load_hf(args.hf_dir, scan_layers=args.scan_layers, dtype=args.dtype)
  log.info("Read %s: %s parameters", args.hf_dir, f"{config.num_params():,}")
  save_params_dir(config, params, args.output)
  _keep_hf_files(args.hf_dir, os.path.abspath(args.output))
  log.info("Wrote params to %s", args.output)


def _export(args: argparse.Namespace) -> None:
  if args.max_shard_bytes <= 0:
    raise ValueError(f"--max_shard_bytes={args.max_shard_bytes} must be positive (bytes).")
  fix = "pick a new output directory or pass --overwrite to replace the model files in it"
  check_output(args.output, fix, overwrite=args.overwrite)  # Before reading the checkpoint.
  for marker, what in (("checkpoints", "a training run"), (MODEL_CONFIG_FILE, "a params dir")):
    if os.path.exists(os.path.join(args.output, marker)):
      raise ValueError(f"{args.output} holds {what}; export to a directory of its own.")
  if os.path.isfile(os.path.join(args.checkpoint, MODEL_CONFIG_FILE)):
    config, params = load_params_dir(args.checkpoint)
  elif os.path.isdir(args.checkpoint):
    from trainer.checkpoint import restore_params  # A training workdir; trainer loads lazily.

    config, params = restore_params(args.checkpoint)
  else:
    raise ValueError(f"{args.checkpoint} does not exist; give a params dir or a training workdir.")
  log.info("Read %s: %s parameters", args.checkpoint, f"{config.num_params():,}")
  out = os.path.abspath(args.output)
  os.makedirs(os.path.dirname(out), exist_ok=True)
  # Written beside --output first: a failed or killed export leaves what was there untouched.
  staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.export-", dir=os.path.dirname(out))
  try:
    extra = _kept_hf_files(args.checkpoint, staging)  # From an imported params dir.
    tokenizer_dir = os.path.join(args.checkpoint, "tokenizer")  # A training run saves it there.
    if os.path.isdir(tokenizer_dir):
      from data.hf_tokenizer import save_for_transformers
      from data.tokenizers import tokenizer_from_prepared

      extra = save_for_transformers(tokenizer_from_prepared(tokenizer_dir), staging)
      log.info("Wrote the run's tokenizer; special token ids %s", extra)
    save_hf(
      config,
      params,
      staging,
      dtype=args.dtype,
      max_shard_bytes=args.max_shard_bytes,
      extra_config=extra,
    )
    os.makedirs(out, exist_ok=True)
    if args.overwrite:
      _remove_hf_model(out)
    for name in os.listdir(staging):
      os.replace(os.path.join(staging, name), os.path.join(out, name))
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  log.info("Wrote Hugging Face checkpoint to %s", args.output)


def main(argv: Sequence[str] | None = None) -> None:
  """`import` an HF Llama dir into an Orbax params dir, or `export` one back to HF."""
  parser = argparse.ArgumentParser(prog="python -m model.hf", description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  imp = sub.add_parser("import", help="HF safetensors dir -> Orbax params dir")
  imp.add_argument("--hf_dir", required=True, help="directory with config.json + safetensors")
  imp.add_argument("--output", required=True, help="new params dir to write")
  imp.add_argument("--dtype", default="float32", help="dtype of the stored params")
  imp.add_argument("--scan_layers", action=argparse.BooleanOptionalAction, default=True)
  exp = sub.add_parser("export", help="params dir or training workdir -> HF safetensors dir")
  exp.add_argument("--checkpoint", required=True, help="params dir or training workdir")
  exp.add_argument("--output", required=True, help="HF directory to write")
  exp.add_argument("--dtype", default=None, help="dtype of the written weights (default: as is)")
  exp.add_argument("--max_shard_bytes", type=int, default=5 * 10**9, help="bytes per shard")
  exp.add_argument(
    "--overwrite", action="store_true", help="replace the HF model files in an existing --output"
  )
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax narrates every save and restore at INFO.
  if args.dtype is not None and args.dtype not in ("float32", "bfloat16", "float16"):
    parser.error(f"--dtype={args.dtype} is not one of float32, bfloat16, float16.")
  try:
    {"import": _import, "export": _export}[args.command](args)
  except (ValueError, OSError) as e:  # OSError: a missing path, a full disk, no permission.
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  main()
