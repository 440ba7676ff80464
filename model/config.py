"""The frozen, typed description of one LLaMA 3 network."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from flax.core import FrozenDict

# The integer sizes that fix every parameter's shape.
SIZE_FIELDS = (
  "vocab_size",
  "embed_dim",
  "mlp_dim",
  "num_layers",
  "num_heads",
  "num_kv_heads",
  "head_dim",
)
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "offload")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash")
_ROPE_SCALING_KEYS = {
  "factor",
  "low_freq_factor",
  "high_freq_factor",
  "original_max_position_embeddings",
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of a LLaMA 3 model; built with `ModelConfig(**config.model)`.

  The defaults are Llama 3 8B's shapes with plain fp32 numerics for library use (no RoPE
  scaling, no remat); a training run's values come from `configs/base.py:model_config`, which
  documents each field.
  """

  vocab_size: int = 128256  # Token vocabulary V.
  embed_dim: int = 4096  # Residual width D.
  mlp_dim: int = 14336  # SwiGLU hidden width F.
  num_layers: int = 32  # Decoder blocks L.
  num_heads: int = 32  # Query heads N.
  num_kv_heads: int = 8  # Key/value heads K (GQA).
  head_dim: int = 128  # Per-head width H.
  rope_theta: float = 500000.0  # RoPE base.
  rope_scaling: Mapping[str, Any] | None = None  # Llama 3.1 frequency scaling, or plain RoPE.
  norm_eps: float = 1e-5  # RMSNorm epsilon.
  tie_embeddings: bool = False  # The head reuses the token table.
  max_seq_len: int = 8192  # Longest sequence; the KV cache length when generating.
  dtype: str = "float32"  # Activations and matmul inputs.
  param_dtype: str = "float32"  # Stored parameters.
  scan_layers: bool = True  # One scanned block (fast compiles) or L unrolled ones.
  remat: str = "none"  # One of REMAT_POLICIES.
  attention: str = "auto"  # One of ATTENTION_IMPLS.

  def __post_init__(self):
    if self.rope_scaling is not None:
      scaling = {k: v for k, v in dict(self.rope_scaling).items() if k in _ROPE_SCALING_KEYS}
      missing = _ROPE_SCALING_KEYS - set(scaling)
      if missing:
        raise ValueError(
          f"model.rope_scaling lacks {sorted(missing)}; give all of "
          f"{sorted(_ROPE_SCALING_KEYS)} or set it to None."
        )
      unknown = set(self.rope_scaling) - _ROPE_SCALING_KEYS - {"rope_type", "type"}
      kind = dict(self.rope_scaling).get("rope_type", dict(self.rope_scaling).get("type", "llama3"))
      if unknown or kind != "llama3":
        raise ValueError(
          f"model.rope_scaling has {sorted(unknown) or f'type {kind!r}'}; only Llama 3.1's "
          f"scaling ({sorted(_ROPE_SCALING_KEYS)}) is supported."
        )
      low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
      if float(scaling["factor"]) < 1 or not 0 < low < high:
        raise ValueError(
          f"model.rope_scaling needs factor >= 1 and 0 < low_freq_factor < high_freq_factor; "
          f"got {scaling}."
        )
      if int(scaling["original_max_position_embeddings"]) <= 0:
        raise ValueError("model.rope_scaling.original_max_position_embeddings must be positive.")
      # Factor 1 scales nothing: plain RoPE, exactly (how a command line turns scaling off).
      plain = float(scaling["factor"]) == 1.0
      object.__setattr__(self, "rope_scaling", None if plain else FrozenDict(scaling))
    for name in SIZE_FIELDS:
      if int(getattr(self, name)) <= 0:
        raise ValueError(f"model.{name} must be a positive integer, got {getattr(self, name)}.")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
        f"model.num_heads={self.num_heads} is not a multiple of "
        f"model.num_kv_heads={self.num_kv_heads}; pick kv heads that divide it."
      )
    if self.head_dim % 2:
      raise ValueError(f"model.head_dim={self.head_dim} must be even for rotary embeddings.")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"model.remat={self.remat!r} is unknown; use one of {REMAT_POLICIES}.")
    if self.attention not in ATTENTION_IMPLS:
      raise ValueError(
        f"model.attention={self.attention!r} is unknown; use one of {ATTENTION_IMPLS}."
      )
    for name in ("dtype", "param_dtype"):
      try:
        jnp.dtype(getattr(self, name))
      except TypeError:
        raise ValueError(
          f"model.{name}={getattr(self, name)!r} is not a dtype name; use 'float32' or 'bfloat16'."
        ) from None

  @property
  def compute_dtype(self) -> jnp.dtype:
    """The dtype of activations and matmul inputs."""
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self) -> jnp.dtype:
    """The dtype parameters are stored in."""
    return jnp.dtype(self.param_dtype)

  def replace(self, **changes: Any) -> ModelConfig:
    """A copy with `changes` applied."""
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    """JSON-able fields (rope_scaling as a dict)."""
    d = dataclasses.asdict(self)
    d["rope_scaling"] = None if self.rope_scaling is None else dict(self.rope_scaling)
    return d

  def num_params(self, *, embeddings: bool = True) -> int:
    """Exact parameter count; `embeddings=False` leaves out the token table and the head."""
    d, f, h = self.embed_dim, self.mlp_dim, self.head_dim
    attn = d * h * (2 * self.num_heads + 2 * self.num_kv_heads)
    per_layer = attn + 3 * d * f + 2 * d
    total = self.num_layers * per_layer + d
    if embeddings:
      total += self.vocab_size * d * (1 if self.tie_embeddings else 2)
    return total
