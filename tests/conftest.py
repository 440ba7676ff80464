"""Test setup: 8 fake CPU devices, configured before anything imports JAX."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# LLVM at -O0 for XLA:CPU: the tests' programs are tiny, so compiling is most of their time, and
# this halves it (the tiny train step: 7.8 -> 4.1 s) while each step runs as fast. It changes no
# HLO pass (fusion, buffers, sharding); results agree with -O2 to rounding (1e-7 relative).
for _flag in ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0"):
  if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Many tests compile the same tiny programs, also in subprocesses: share XLA's compiled
# executables through the persistent cache (environment variables reach child processes too).
_cache = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "jax")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _cache)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
