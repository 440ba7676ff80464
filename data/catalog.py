"""TFDS and Hugging Face datasets, opened by name from local storage as random-access sequences."""

from __future__ import annotations

import difflib
import os
from typing import Any


def parse_tfds(spec: str) -> tuple[str, str]:
  """'tfds:c4/en:train' or 'c4/en:train[:90%]' -> ('c4/en', 'train...'); the split defaults to
  train. The name may carry a version ('c4/en:3.1.0'); a split's slice may hold colons."""
  spec = spec.removeprefix("tfds:")
  depth, cut = 0, -1
  for i, ch in enumerate(spec):
    depth += (ch == "[") - (ch == "]")
    if ch == ":" and depth == 0:
      cut = i
  return (spec[:cut], spec[cut + 1 :]) if cut > 0 else (spec, "train")


def open_tfds(spec: str, data_dir: str = "") -> Any:
  """A random-access TFDS data source (ArrayRecord-backed; `data_dir` may be gs://...)."""
  import tensorflow_datasets as tfds

  name, split = parse_tfds(spec)
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
  except tfds.core.DatasetNotFoundError as e:
    # Its message lists every registered dataset (hundreds of lines): name a few close ones.
    builder = name.split("/")[0]
    known = set(tfds.list_builders(with_community_datasets=False))  # It may repeat a name.
    close = difflib.get_close_matches(builder, sorted(known))
    hint = f"did you mean {' or '.join(close)}?" if close else "no registered name is close"
    where = f" nor found in data_dir={data_dir!r}" if data_dir else ""
    raise FileNotFoundError(
      f"tfds dataset {builder!r} is not registered{where} ({hint}); check the name "
      f"(tfds.list_builders())."
    ) from e
  except Exception as e:
    builder, _, config = name.partition("/")
    config = config.split(":")[0]  # 'c4/en:3.1.0' carries a version.
    try:
      configs = [c.name for c in tfds.builder_cls(builder).BUILDER_CONFIGS]
    except Exception:  # Community or unusual builders: the generic message below.
      configs = []
    if config and configs and config not in configs:
      raise FileNotFoundError(
        f"tfds dataset {builder!r} has no config {config!r}; use one of "
        f"{', '.join(configs)} (tfds:{builder}/CONFIG:SPLIT)."
      ) from e
    raise FileNotFoundError(
      f"TFDS dataset {name}:{split} could not be opened from data_dir={data_dir or 'default'!r} "
      f"({type(e).__name__}: {e}); build it first (tfds build {name} --file_format=array_record)."
    ) from e


def parse_hf(spec: str) -> tuple[str, str | None, str]:
  """'hf:NAME[:CONFIG][:SPLIT]' or 'hf:DIR[:SPLIT]' (a saved dataset) -> (NAME or DIR, CONFIG,
  SPLIT); the split is '' where the spec names none. A DIR is a directory that exists."""
  rest = spec.removeprefix("hf:")
  head, _, split = rest.rpartition(":")
  if os.path.isdir(rest):
    return rest, None, ""
  if os.path.isdir(head):
    return head, None, split
  parts = rest.split(":")
  if len(parts) > 3:
    raise ValueError(f"{spec!r} is not 'hf:NAME[:CONFIG]:SPLIT'.")
  config = parts[1] if len(parts) == 3 else None
  return parts[0], config, parts[-1] if len(parts) > 1 else ""


def open_hf(spec: str) -> Any:
  """A random-access HF dataset: 'hf:NAME[:CONFIG]:SPLIT' from the local cache, or a saved dir."""
  os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # Run time never touches the network.
  try:
    import datasets
  except ImportError as e:
    raise ImportError("HF datasets need the optional extra: pip install -e '.[hf]'.") from e
  name, config, split = parse_hf(spec)
  if not os.path.isdir(name):
    return datasets.load_dataset(name, config, split=split or "train")
  ds = datasets.load_from_disk(name)
  if isinstance(ds, datasets.DatasetDict):
    split = split or "train"
    if split not in ds:
      raise ValueError(
        f"{name} holds the splits {', '.join(ds)}, not {split!r}; name one (hf:{name}:SPLIT)."
      )
    return ds[split]
  if split:
    raise ValueError(
      f"{name} is one saved Dataset without splits, so ':{split}' names nothing; use hf:{name}."
    )
  return ds


def with_split(spec: str, split: str) -> str:
  """The `tfds:` or `hf:` dataset `spec` with `split` in place of its own (or of the default)."""
  if spec.startswith("tfds:"):
    return f"tfds:{parse_tfds(spec)[0]}:{split}"
  name, config, _ = parse_hf(spec)
  return f"hf:{name}:{config}:{split}" if config else f"hf:{name}:{split}"
