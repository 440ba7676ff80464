"""The benchmark CLI, the attention kernels against the reference, remat policies, fast matmuls."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from model import Llama3
from model.attention import (
  attention_mask,
  cudnn_attention,
  describe_attention,
  select_implementation,
  xla_attention,
)
from model.blockwise import blockwise_attention
from model.matmul import dense
from model.splash import splash_attention
from tests.common import TINY_MODEL, tiny_config
from trainer.benchmark import cpu_device_count

TINY_FLAGS = [
  "--config.model.vocab_size=256",
  "--config.model.embed_dim=64",
  "--config.model.mlp_dim=128",
  "--config.model.num_layers=2",
  "--config.model.num_heads=4",
  "--config.model.num_kv_heads=2",
  "--config.model.head_dim=16",
  "--config.model.max_seq_len=64",
  "--config.seq_len=32",
  "--config.loss_chunk_size=16",
  "--config.grad_accum_steps=1",  # 8 rows over conftest's 8 devices: one microbatch.
]
KEYS = {
  "tokens_per_sec",
  "step_time_s",
  "model_flops_per_token",
  "mfu",
  "compile_s",
  "peak_memory_bytes",
  "device",
}


def run_cli(*extra: str) -> tuple[dict, str]:
  out = subprocess.run(
    [sys.executable, "-m", "trainer.benchmark", "--config=configs/bench.py", *TINY_FLAGS, *extra],
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert (
    "] compiled the train step in " in out.stderr and "] round 1 of " in out.stderr
  )  # Progress.
  lines = out.stdout.strip().splitlines()
  return json.loads(lines[-1]), "\n".join(lines[:-1])


def test_cli_prints_a_table_then_one_json_line_and_compares_with_pytorch():
  result, table = run_cli("--steps=2", "--warmup=0", "--rounds=2", "--compare_torch")
  assert KEYS <= set(result)
  assert "tokens/s" in table and "JAX" in table and "PyTorch" in table
  assert len(result["step_times_s"]) == 2
  tokens = 8 * 32
  assert result["tokens_per_sec"] == pytest.approx(tokens / result["step_time_s"])
  assert 0 < result["mfu"] < 1
  assert result["compile_s"] > 0 and result["peak_memory_bytes"] > 0
  assert np.isfinite(result["loss"])
  assert result["device"] == "8 x cpu"  # conftest's 8 fake devices carry through.
  assert result["attention"].startswith("xla")
  assert result["torch_tokens_per_sec"] > 0
  assert result["speedup_vs_torch"] == pytest.approx(
    result["tokens_per_sec"] / result["torch_tokens_per_sec"]
  )
  # PyTorch's model has the same shapes and its own initialization: a real step on it starts
  # near the uniform-prediction loss, ln(vocab).
  assert result["torch_loss"] == pytest.approx(np.log(256), rel=0.05)
  for bad, message in (
    ("--steps=-2", "flag --steps=-2: -2 is not a positive integer"),
    ("--config.global_batch_size=6", "global_batch_size=6 is not divisible by grad_accum_steps"),
    ("--cpu_devices=-1", "error: --cpu_devices=-1 must be 0 (one per core) or more."),
  ):
    cmd = [sys.executable, "-m", "trainer.benchmark", "--config=configs/bench.py", bad]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and message in out.stderr and "Traceback" not in out.stderr


def test_a_nan_loss_and_a_missing_torch_are_one_clear_line():
  from trainer.benchmark import benchmark

  config = tiny_config(**{"optimizer.learning_rate": float("inf"), "optimizer.grad_clip": 0.0})
  with pytest.raises(ValueError, match=r"loss is nan, so its timings mean nothing; check model"):
    benchmark(config, steps=2, warmup=1, rounds=1)
  # Without PyTorch installed (here: import blocked), --compare_torch says what to install.
  code = (
    "import runpy, sys; sys.modules['torch'] = None; "
    "sys.argv = ['trainer.benchmark', '--config=configs/bench.py', '--compare_torch']; "
    "runpy.run_module('trainer.benchmark', run_name='__main__')"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last == "error: --compare_torch needs torch: pip install -e '.[test]'."


def test_benchmark_imports_no_clu_tensorflow_or_grain():
  code = (
    "import sys, trainer.benchmark; "
    "print(sorted({m.split('.')[0] for m in sys.modules} & {'clu', 'tensorflow', 'grain'}))"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
  ("mesh", "cores", "expected"),
  [
    ((-1, 1, 1), 2, 2),
    ((-1, 1, 1), 3, 2),
    ((-1, 1, 1), 16, 8),
    ((1, 1, 1), 2, 1),
    ((2, -1, 2), 8, 8),
  ],
)
def test_cpu_devices_one_per_core_as_the_batch_allows(mesh, cores, expected):
  config = tiny_config(**{"mesh.data": mesh[0], "mesh.fsdp": mesh[1], "mesh.tensor": mesh[2]})
  assert cpu_device_count(config, cores) == expected


def _qkv(b=2, t=256, n=4, k=2, h=64, seed=0):
  rng = np.random.default_rng(seed)
  q, kk, v, w = (
    jnp.asarray(rng.standard_normal(s), jnp.float32)
    for s in ((b, t, n, h), (b, t, k, h), (b, t, k, h), (b, t, n, h))
  )
  # Two documents and padding (segment 0) per row, at different offsets.
  seg = np.zeros((b, t), np.int32)
  seg[0, :100], seg[0, 100:220] = 1, 2
  seg[1, :37], seg[1, 37:] = 1, 2
  return q, kk, v, w, jnp.asarray(seg)


def _value_and_grads(attend, q, k, v, w):
  f = lambda q, k, v: jnp.sum(w * attend(q, k, v))
  return jax.jit(jax.value_and_grad(f, (0, 1, 2)))(q, k, v)


def _assert_matches_reference(attend, q, k, v, w, seg):
  ref = lambda q, k, v: xla_attention(q, k, v, attention_mask(seg, seg))
  np.testing.assert_allclose(attend(q, k, v), ref(q, k, v), atol=5e-6)
  (got_value, got_grads), (want_value, want_grads) = (
    _value_and_grads(attend, q, k, v, w),
    _value_and_grads(ref, q, k, v, w),
  )
  np.testing.assert_allclose(got_value, want_value, rtol=1e-5)
  for got, want in zip(got_grads, want_grads):
    np.testing.assert_allclose(got, want, atol=2e-5)


@pytest.mark.parametrize("block", [0, 32, 128, 256, 100])
def test_blockwise_attention_equals_the_reference(block):
  q, k, v, w, seg = _qkv()
  _assert_matches_reference(
    lambda q, k, v: blockwise_attention(q, k, v, seg, block), q, k, v, w, seg
  )


def test_splash_attention_in_interpret_mode_equals_the_reference():
  q, k, v, w, seg = _qkv(t=256)
  _assert_matches_reference(lambda q, k, v: splash_attention(q, k, v, seg), q, k, v, w, seg)


def test_splash_attention_under_a_sharded_mesh_equals_the_reference():
  import flax.linen as nn

  q, k, v, w, seg = _qkv(b=4, t=128, n=4, k=2)
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
  rules = [("activation_batch", ("data", "fsdp")), ("activation_heads", "tensor")]

  def attend(q, k, v):
    with nn.logical_axis_rules(rules):
      return splash_attention(q, k, v, seg)

  with jax.set_mesh(mesh):
    _assert_matches_reference(attend, q, k, v, w, seg)


def test_auto_falls_back_where_a_kernel_cannot_run(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  assert select_implementation("auto", 128, 4096) == ("splash", None)
  impl, why = select_implementation("auto", 64, 1000)
  assert impl == "xla" and "multiple of 128" in why
  assert "fell back from splash" in describe_attention("auto", head_dim=64, seq_len=1000)
  with pytest.raises(ValueError, match="model.attention='splash' cannot run"):
    select_implementation("splash", 64, 1000)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert select_implementation("auto", 64, 4096, jnp.bfloat16) == ("cudnn", None)
  assert select_implementation("auto", 64, 4096, jnp.float32)[0] == "xla"
  assert describe_attention("auto", head_dim=64, seq_len=4096, dtype="bfloat16").startswith("cudnn")


def test_describe_attention_names_the_cpu_kernel():
  assert describe_attention("auto").startswith("xla")
  assert describe_attention("splash").startswith("splash")


def test_remat_policies_save_less_memory_in_that_order():
  config = TINY_MODEL.replace(
    embed_dim=128, mlp_dim=512, num_layers=4, head_dim=32, max_seq_len=256
  )
  tokens = jnp.zeros((4, 256), jnp.int32)
  temp = {}
  for policy in ("none", "dots", "dots_no_batch", "full"):
    model = Llama3(config.replace(remat=policy))
    params = jax.eval_shape(lambda m=model: m.init(jax.random.key(0), tokens[:, :8])["params"])
    grad = jax.jit(jax.grad(lambda p, m=model: jnp.mean(m.apply({"params": p}, tokens) ** 2)))
    temp[policy] = grad.lower(params).compile().memory_analysis().temp_size_in_bytes
  assert temp["full"] < temp["dots_no_batch"] <= temp["dots"] < temp["none"], temp


@pytest.mark.parametrize(
  ("x_shape", "k_shape", "num_in", "dtype"),
  [
    ((2, 16, 32), (32, 4, 8), 1, jnp.float32),
    ((2, 16, 4, 8), (4, 8, 32), 2, jnp.float32),
    ((2, 16, 32), (32, 48), 1, jnp.bfloat16),
  ],
)
def test_dense_gradients_equal_jax_autodiff(x_shape, k_shape, num_in, dtype):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
  k = jnp.asarray(rng.standard_normal(k_shape), jnp.float32)
  contract = (tuple(range(len(x_shape) - num_in, len(x_shape))), tuple(range(num_in)))

  def plain(x, k):
    return jax.lax.dot_general(
      x.astype(dtype), k.astype(dtype), (contract, ((), ())), preferred_element_type=jnp.float32
    )

  def fast(x, k):
    return dense(x.astype(dtype), k.astype(dtype), num_in, jnp.float32)

  w = jnp.asarray(rng.standard_normal(plain(x, k).shape), jnp.float32)
  loss = lambda f: lambda x, k: jnp.sum(w * jnp.sin(f(x, k)))
  got = jax.jit(jax.grad(loss(fast), (0, 1)))(x, k)
  want = jax.jit(jax.grad(loss(plain), (0, 1)))(x, k)
  for a, b in zip(got, want):
    if dtype == jnp.float32:
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    else:  # Rounded to bf16 ulps (2^-8): another summation order may flip a rare rounding.
      # Both are equal bit for bit here; a bf16 cotangent in the weight gradient moved 40%.
      assert np.mean(np.asarray(a) != np.asarray(b)) <= 0.02
      np.testing.assert_allclose(a, b, rtol=2**-7)


def test_dense_weight_gradient_is_a_canonical_matmul_on_cpu():
  # XLA:CPU sends only row-major, minor-contracted left operands to YNNPACK; a weight gradient
  # that contracts over the tokens (lhs_contracting_dims={0}) would fall back to Eigen.
  x, k = jnp.ones((8, 256, 512)), jnp.ones((512, 1536))
  grad = jax.grad(lambda x, k: jnp.sum(jnp.sin(dense(x, k))), (0, 1))
  hlo = jax.jit(grad).lower(x, k).compile().as_text()
  dots = [line for line in hlo.splitlines() if " dot(" in line]
  assert len(dots) == 3
  assert not any("lhs_contracting_dims={0}" in line for line in dots), dots
  tpu_text = jax.jit(grad).trace(x, k).lower(lowering_platforms=("tpu",)).as_text()
  assert "optimization_barrier" not in tpu_text  # Other platforms get JAX's own gradient.


def test_cudnn_call_masks_like_the_reference():
  # cuDNN itself needs a GPU; the same jax.nn call with XLA checks the causal + document masks.
  q, k, v, w, seg = _qkv(t=128)
  attend = lambda q, k, v: cudnn_attention(q, k, v, seg, implementation="xla")
  _assert_matches_reference(attend, q, k, v, w, seg)
