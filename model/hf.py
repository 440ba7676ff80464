"""Hugging Face interop: Llama safetensors + config.json in and out, and a CLI that converts.

Weights map by plain transposes and reshapes, with no permutation of q/k heads: our RoPE rotates
the pairs (i, i + H/2), the half-split layout of HF's `rotate_half`, which is the layout HF Llama
checkpoints are stored in (HF's conversion script permuted Meta's interleaved weights once).

    python -m model.hf import --hf_dir=Llama-3.2-1B --output=ckpt/llama1b
    python -m model.hf export --checkpoint=ckpt/llama1b --output=hf/llama1b

Dimension key: L layers, D embed_dim, N heads, K kv heads, H head_dim, F mlp_dim, V vocab.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Iterator, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.linen import meta

from model.config import ModelConfig
from model.params import is_scanned

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# (our path inside a layer, HF name inside `model.layers.{i}.`, leading dims on the input side).
# Ours -> HF is x.reshape(prod(in dims), -1).T; None marks a vector copied as is.
_LAYER_MAP = (
  (("attn_norm", "scale"), "input_layernorm.weight", None),
  (("attn", "q", "kernel"), "self_attn.q_proj.weight", 1),
  (("attn", "k", "kernel"), "self_attn.k_proj.weight", 1),
  (("attn", "v", "kernel"), "self_attn.v_proj.weight", 1),
  (("attn", "o", "kernel"), "self_attn.o_proj.weight", 2),
  (("mlp_norm", "scale"), "post_attention_layernorm.weight", None),
  (("mlp", "gate", "kernel"), "mlp.gate_proj.weight", 1),
  (("mlp", "up", "kernel"), "mlp.up_proj.weight", 1),
  (("mlp", "down", "kernel"), "mlp.down_proj.weight", 1),
)


def _layer_shapes(c: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  d, f, n, k, h = c.embed_dim, c.mlp_dim, c.num_heads, c.num_kv_heads, c.head_dim
  return {
    ("attn_norm", "scale"): (d,),
    ("attn", "q", "kernel"): (d, n, h),
    ("attn", "k", "kernel"): (d, k, h),
    ("attn", "v", "kernel"): (d, k, h),
    ("attn", "o", "kernel"): (n, h, d),
    ("mlp_norm", "scale"): (d,),
    ("mlp", "gate", "kernel"): (d, f),
    ("mlp", "up", "kernel"): (d, f),
    ("mlp", "down", "kernel"): (f, d),
  }


def _to_hf(x: np.ndarray, in_dims: int | None) -> np.ndarray:
  if in_dims is None:
    return x
  return x.reshape(math.prod(x.shape[:in_dims]), -1).T


def _hf_shape(shape: tuple[int, ...], in_dims: int | None) -> tuple[int, ...]:
  if in_dims is None:
    return shape
  return (math.prod(shape[in_dims:]), math.prod(shape[:in_dims]))


def _rope_from_hf(hf: Mapping[str, Any]) -> tuple[float, dict[str, float] | None]:
  """(rope_theta, our rope_scaling) from either `rope_parameters` or `rope_theta`+`rope_scaling`."""
  rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind == "default":
    if "factor" in rope:
      raise ValueError(
        "config.json's RoPE scaling has a factor but no rope_type; set rope_type to 'llama3' "
        "(the only scaling supported) or remove the factor."
      )
    return theta, None
  if kind != "llama3":
    raise ValueError(
      f"RoPE type {kind!r} in config.json is not supported; only 'default' and 'llama3' are."
    )
  keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
  missing = [key for key in keys if key not in rope]
  if missing:
    raise ValueError(f"config.json's llama3 RoPE scaling lacks {missing}; add them.")
  return theta, {key: rope[key] for key in keys}


def config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
  """The ModelConfig of a transformers `LlamaConfig` dict (the contents of config.json)."""
  if hf.get("model_type") != "llama":
    raise ValueError(
      f"config.json has model_type {hf.get('model_type')!r}, not 'llama'; point at a "
      "LlamaForCausalLM checkpoint (Llama 3, 3.1 or 3.2)."
    )
  for key, ok in (
    ("attention_bias", not hf.get("attention_bias")),
    ("mlp_bias", not hf.get("mlp_bias")),
    ("hidden_act", hf.get("hidden_act", "silu") == "silu"),
  ):
    if not ok:
      raise ValueError(
        f"config.json has {key}={hf[key]!r}; only Llama 3 shapes load (no biases, SiLU MLP)."
      )
  theta, scaling = _rope_from_hf(hf)
  n = int(hf["num_attention_heads"])
  return ModelConfig(
    vocab_size=int(hf["vocab_size"]),
    embed_dim=int(hf["hidden_size"]),
    mlp_dim=int(hf["intermediate_size"]),
    num_layers=int(hf["num_hidden_layers"]),
    num_heads=n,
    num_kv_heads=int(hf.get("num_key_value_heads") or n),
    head_dim=int(hf.get("head_dim") or hf["hidden_size"] // n),
    rope_theta=theta,
    rope_scaling=scaling,
    norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
    tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    max_seq_len=int(hf.get("max_position_embeddings", 8192)),
  )


def config_to_hf(config: ModelConfig, dtype: str = "float32") -> dict[str, Any]:
  """A config.json for LlamaForCausalLM, with RoPE in the published (pre-transformers-5) style."""
  c = config
  scaling = None if c.rope_scaling is None else {"rope_type": "llama3", **dict(c.rope_scaling)}
  return {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": c.vocab_size,
    "hidden_size": c.embed_dim,
    "intermediate_size": c.mlp_dim,
    "num_hidden_layers": c.num_layers,
    "num_attention_heads": c.num_heads,
    "num_key_value_heads": c.num_kv_heads,
    "head_dim": c.head_dim,
    "hidden_act": "silu",
    "max_position_embeddings": c.max_seq_len,
    "rms_norm_eps": c.norm_eps,
    "rope_theta": c.rope_theta,
    "rope_scaling": scaling,
    "tie_word_embeddings": c.tie_embeddings,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "mlp_bias": False,
    "initializer_range": 0.02,
    "pretraining_tp": 1,
    "use_cache": True,
    "torch_dtype": dtype,
  }


def _read_json(path: str) -> dict[str, Any]:
  """The JSON object in `path`; a file that is not one is a ValueError naming it."""
  try:
    with open(path) as f:
      value = json.load(f)
  except ValueError as e:  # JSONDecodeError, or bytes that are not text at all.
    raise ValueError(f"{path} is not valid JSON ({e}); fix it or download the model again.") from e
  except OSError as e:
    raise ValueError(f"{path} cannot be read ({e.strerror or e}); make it a readable file.") from e
  if not isinstance(value, dict):
    raise ValueError(f"{path} holds a JSON {type(value).__name__}, not an object; fix it.")
  return value


def _open(path: str, stack: contextlib.ExitStack) -> Any:
  """A safe_open handle on `path`; an unreadable, truncated or corrupt file is a ValueError."""
  from safetensors import SafetensorError, safe_open

  try:
    return stack.enter_context(safe_open(path, framework="np"))
  except FileNotFoundError as e:
    raise ValueError(
      f"{path}, named in {INDEX_FILE}, is missing; download or export the model again."
    ) from e
  except SafetensorError as e:  # Raised on open: safetensors checks the header and file size.
    reason = str(e).removeprefix("Error while deserializing header: ")
    raise ValueError(
      f"{path} is truncated or corrupt ({reason}); download or export it again."
    ) from e
  except OSError as e:
    raise ValueError(f"{path} cannot be read ({e}); make it a readable file.") from e


class _Weights:
  """Lazy reader of the tensors of a (possibly sharded) safetensors checkpoint."""

  def __init__(self, hf_dir: str, stack: contextlib.ExitStack):
    index = os.path.join(hf_dir, INDEX_FILE)
    single = os.path.join(hf_dir, WEIGHTS_FILE)
    if os.path.exists(index):
      weight_map = _read_json(index).get("weight_map")
      if not isinstance(weight_map, dict):
        raise ValueError(f"{index} has no weight_map; download or export the model again.")
    elif os.path.exists(single):
      weight_map = None
    else:
      raise ValueError(
        f"{hf_dir} has neither {WEIGHTS_FILE} nor {INDEX_FILE}; save the model with "
        "transformers' save_pretrained(dir, safe_serialization=True) first."
      )
    files = sorted(set(weight_map.values())) if weight_map else [WEIGHTS_FILE]
    self._handles = {name: _open(os.path.join(hf_dir, name), stack) for name in files}
    if weight_map is None:
      weight_map = {key: WEIGHTS_FILE for key in self._handles[WEIGHTS_FILE].keys()}
    self._map, self._dir = weight_map, hf_dir

  def __contains__(self, name: str) -> bool:
    return name in self._map

  def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Tensor `name`, checked to have `shape`; a missing or misshapen one is a ValueError."""
    if name not in self._map:
      raise ValueError(
        f"{self._dir} lacks tensor {name!r}; the checkpoint is incomplete or not a "
        "LlamaForCausalLM, so re-download it or re-save it with save_pretrained."
      )
    x = self._handles[self._map[name]].get_tensor(name)
    if tuple(x.shape) != tuple(shape):
      raise ValueError(
        f"Tensor {name!r} has shape {tuple(x.shape)} but config.json implies {tuple(shape)}; "
        "the weights and config.json come from different models."
      )
    return x


def load_hf(
  hf_dir: str,
  *,
  scan_layers: bool = True,
  dtype: str | None = None,
  config_overrides: Mapping[str, Any] | None = None,
) -> tuple[ModelConfig, dict[str, Any]]:
  """Reads a transformers Llama directory into (ModelConfig, params of host numpy arrays).

  Args:
    scan_layers: stack the layers on a leading axis (`layers`) or keep `layers_0..`.
    dtype: dtype of the returned params (and `config.param_dtype`); None means float32.
    config_overrides: non-shape ModelConfig fields to set (remat, attention, dtype, ...).
  """
  cfg_path = os.path.join(hf_dir, CONFIG_FILE)
  if not os.path.isfile(cfg_path):
    raise ValueError(
      f"{hf_dir} has no {CONFIG_FILE}; point --hf_dir at a directory written by "
      "transformers' save_pretrained (a Llama 3 checkpoint)."
    )
  config = config_from_hf(_read_json(cfg_path))
  np_dtype = np.dtype(jnp.dtype(dtype or "float32"))
  with contextlib.ExitStack() as stack:
    weights = _Weights(hf_dir, stack)
    tie = config.tie_embeddings or "lm_head.weight" not in weights
    if tie and not config.tie_embeddings:
      log.warning(
        "%s: config.json says tie_word_embeddings=false but there is no lm_head.weight; the "
        "output head is tied to the token embeddings.",
        hf_dir,
      )
    changes = {"tie_embeddings": tie, "scan_layers": scan_layers, "param_dtype": np_dtype.name}
    config = c = config.replace(**{**changes, **dict(config_overrides or {})})
    np_dtype, scan_layers = np.dtype(c.weight_dtype), c.scan_layers
    read = lambda name, shape: weights.get(name, shape).astype(np_dtype, copy=False)
    params: dict[str, Any] = {
      "embed": read("model.embed_tokens.weight", (c.vocab_size, c.embed_dim))
    }
    shapes = _layer_shapes(c)
    # Scanned: fill preallocated [L, ...] arrays, so peak memory stays at one copy of the model.
    stacked = {p: np.empty((c.num_layers, *shapes[p]), np_dtype) for p in shapes if scan_layers}
    for i in range(c.num_layers):
      layer = {}
      for path, hf_name, in_dims in _LAYER_MAP:
        w = read(f"model.layers.{i}.{hf_name}", _hf_shape(shapes[path], in_dims))
        layer[path] = w if in_dims is None else np.ascontiguousarray(w.T).reshape(shapes[path])
        if scan_layers:
          stacked[path][i] = layer.pop(path)
      if not scan_layers:
        params[f"layers_{i}"] = traverse_util.unflatten_dict(layer)
      if (i + 1) % max(1, c.num_layers // 10) == 0 or i + 1 == c.num_layers:
        log.info("Loaded layer %d/%d from %s", i + 1, c.num_layers, hf_dir)
    if scan_layers:
      params["layers"] = traverse_util.unflatten_dict(stacked)
    params["final_norm"] = {"scale": read("model.norm.weight", (c.embed_dim,))}
    if not tie:
      params["lm_head"] = np.ascontiguousarray(
        read("lm_head.weight", (c.vocab_size, c.embed_dim)).T
      )
  return config, params


def _hf_tensors(config: ModelConfig, params: Mapping[str, Any]) -> Iterator[tuple[str, Any, Any]]:
  """(HF name, array-like source, function source -> HF numpy array) for every tensor."""
  yield "model.embed_tokens.weight", params["embed"], np.asarray
  scanned = is_scanned(params)
  for i in range(config.num_layers):
    layer = traverse_util.flatten_dict(params["layers"] if scanned else params[f"layers_{i}"])
    for path, hf_name, in_dims in _LAYER_MAP:
      x = layer[path]
      fn = lambda x, i=i, d=in_dims: _to_hf(np.asarray(x[i] if scanned else x), d)
      yield f"model.layers.{i}.{hf_name}", x, fn
  yield "model.norm.weight", params["final_norm"]["scale"], np.asarray
  if not config.tie_embeddings:
    yield "lm_head.weight", params["lm_head"], lambda x: np.asarray(x).T


def save_hf(
  config: ModelConfig,
  params: Mapping[str, Any],
  hf_dir: str,
  *,
  dtype: str | None = None,
  max_shard_bytes: int = 5 * 10**9,
  extra_config: Mapping[str, Any] | None = None,
) -> None:
  """Writes config.json + safetensors (sharded with an index above `max_shard_bytes`).

  Earlier model*.safetensors files and index in `hf_dir` are replaced.

  Args:
    params: scanned or unscanned, boxed or not, numpy or (fully addressable) jax arrays.
    dtype: dtype of the written weights; None keeps the params' dtype.
    extra_config: extra config.json keys, e.g. {'bos_token_id': 128000, 'eos_token_id': 128001}.
  """
  params = meta.unbox(params)
  if "params" in params and "embed" not in params:
    params = params["params"]
  out_dtype = np.dtype(jnp.dtype(dtype or params["embed"].dtype))
  per_layer = 1 if not is_scanned(params) else config.num_layers
  # Plan shards from shapes alone, so each tensor is fetched and converted only once, when written.
  shards: list[list[tuple[str, Any, Any]]] = [[]]
  shard_bytes, total = 0, 0
  for name, src, fn in _hf_tensors(config, params):
    nbytes = math.prod(src.shape) // (per_layer if name.startswith("model.layers.") else 1)
    nbytes *= out_dtype.itemsize
    if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
      shards.append([])
      shard_bytes = 0
    shards[-1].append((name, src, fn))
    shard_bytes += nbytes
    total += nbytes
  os.makedirs(hf_dir, exist_ok=True)
  for stale in os.listdir(hf_dir):
    if stale.startswith("model") and stale.endswith((".safetensors", ".safetensors.index.json")):
      os.remove(os.path.join(hf_dir, stale))
  from safetensors.numpy import save_file

  weight_map = {}
  for s, shard in enumerate(shards):
    fname = WEIGHTS_FILE
    if len(shards) > 1:
      fname = f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
    tensors = {
      name: np.ascontiguousarray(fn(src).astype(out_dtype, copy=False)) for name, src, fn in shard
    }
    save_file(tensors, os.path.join(hf_dir, fname), metadata={"format": "pt"})
    os.chmod(os.path.join(hf_dir, fname), 0o644)  # safetensors writes 0600; others read a model.
    weight_map.update({name: fname for name in tensors})
    log.info("Wrote %s (%d/%d)", fname, s + 1, len(shards))
  if len(shards) > 1:
    with open(os.path.join(hf_dir, INDEX_FILE), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  hf_config = {**config_to_hf(config, out_dtype.name), **dict(extra_config or {})}
  with open(os.path.join(hf_dir, CONFIG_FILE), "w") as f:
    json.dump(hf_config, f, indent=2)


if __name__ == "__main__":
  from model.convert import main  # The CLI lives beside this module; it reuses it.

  main()
