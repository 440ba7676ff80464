"""The offline demo corpus: source files of the running Python's standard library, prepared once.

Every machine with Python has them, so the README demo trains on real text with no download. A
deterministic few-MB subset is tokenized (with a BPE tokenizer trained on it when the spec is
'bpe:VOCAB') and cached under data.cache_dir; later runs (and other processes) reuse it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import sys
import sysconfig
from collections.abc import Iterator

from data.prepare import prepare
from data.sources import FileSource

# About 2M BPE tokens: several epochs' worth for configs/tiny.py, prepared in seconds.
DEFAULT_MAX_BYTES = 8 << 20
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "idlelib", "turtledemo"}


def stdlib_files(max_bytes: int = DEFAULT_MAX_BYTES) -> list[str]:
  """A deterministic subset (by hash of the relative path) of the stdlib's .py files."""
  root = sysconfig.get_paths()["stdlib"]
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
    for name in filenames:
      if name.endswith(".py"):
        rel = os.path.relpath(os.path.join(dirpath, name), root)
        found.append((hashlib.sha1(rel.encode()).hexdigest(), rel))
  if not found:
    raise FileNotFoundError(
      f"no .py files under the standard library at {root}; use data.source='synthetic' or "
      f"prepare a corpus with `python -m data.prepare`."
    )
  chosen, total = [], 0
  for _, rel in sorted(found):
    path = os.path.join(root, rel)
    chosen.append(path)
    total += os.path.getsize(path)
    if total >= max_bytes:
      break
  return sorted(chosen)


def default_cache_dir() -> str:
  """~/.cache/llama3_jax (or $XDG_CACHE_HOME/llama3_jax)."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "llama3_jax")


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
  """An exclusive file lock, so several local processes prepare the cache once, not N times."""
  with open(path, "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def ensure_stdlib_prepared(
  cache_dir: str = "",
  *,
  tokenizer: str = "bpe:4096",
  seq_len: int = 256,
  max_bytes: int = DEFAULT_MAX_BYTES,
  eval_fraction: float = 0.03,
  progress: bool = True,
) -> str:
  """The prepared dir of the stdlib corpus for (tokenizer, seq_len), preparing it if needed."""
  files = stdlib_files(max_bytes)
  key = hashlib.sha256(
    repr(
      (sys.version, tokenizer, seq_len, eval_fraction, [(f, os.path.getsize(f)) for f in files])
    ).encode()
  ).hexdigest()[:12]
  cache_dir = os.path.expanduser(cache_dir or default_cache_dir())
  os.makedirs(cache_dir, exist_ok=True)
  out = os.path.join(cache_dir, f"stdlib-{key}")
  if os.path.exists(os.path.join(out, "metadata.json")):
    return out
  with _locked(out + ".lock"):
    if not os.path.exists(os.path.join(out, "metadata.json")):  # Another process may have won.
      if progress:
        print(
          f"preparing the demo corpus ({len(files)} stdlib files, tokenizer {tokenizer}) into "
          f"{out}; later runs reuse it",
          file=sys.stderr,
        )
      prepare(
        "stdlib",
        out,
        seq_len=seq_len,
        tokenizer=tokenizer,
        eval_fraction=eval_fraction,
        chunk_bytes=512 << 10,
        progress=progress,
        overwrite=True,
        source=FileSource(files, name=f"python{sys.version_info[0]}.{sys.version_info[1]} stdlib"),
      )
  return out
