"""launch.plan: AOT plans for a small TPU topology (v5e-8) with a tiny model, on this CPU."""

import json
import os
import re
import subprocess
import sys

import pytest

from configs import tiny
from launch import advice as advice_lib
from launch import aot, report
from launch import plan as plan_lib
from launch import topology as topo_lib
from trainer import tpu_flags

pytest.importorskip("libtpu", reason="AOT planning for TPU needs libtpu (pip install 'jax[tpu]')")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = (
  "topology chips hbm_per_chip_bytes peak_hbm_bytes fits flops_per_step model_flops_per_step "
  "est_step_time_s est_mfu tokens_per_step compile_s estimate"
).split()
# Model overrides that keep each TPU compile to seconds. The output head outweighs the layers, so
# XLA's count of the chunked loss (its loop body once, a quarter of the head) is below the model
# FLOPs: a plan that did not correct for loops would fail the FLOPs check below.
TINY = (
  "global_batch_size=8 seq_len=128 loss_chunk_size=32 model.num_layers=2 model.embed_dim=64 "
  "model.mlp_dim=128 model.num_heads=4 model.num_kv_heads=2 model.head_dim=16 "
  "model.vocab_size=2048 model.dtype=bfloat16 model.remat=full model.scan_layers=True"
).split()


def _config(overrides=TINY):
  config = tiny.get_config()
  for item in overrides:
    key, value = item.split("=")
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = type(node[leaf])(value) if not isinstance(node[leaf], bool) else value == "True"
  return config


def _cli(*args, timeout=300):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(
    [sys.executable, "-m", "launch.plan", "--config=configs/tiny.py", *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def test_topology_names_count_as_the_cloud_does():
  expected = {"v5p-256": 128, "v4-128": 64, "v5e-16": 16, "v6e-256": 256, "v5e-8": 8}
  assert {name: topo_lib.parse(name).chips for name in expected} == expected
  assert topo_lib.parse("v5p-256").topology_name == "v5p:4x4x8"
  assert topo_lib.parse("v6e-256").topology_name == "v6e:16x16"
  with pytest.raises(topo_lib.TopologyError, match="v5p-256.*v6e-256"):
    topo_lib.parse("v5p-7")


def test_collective_bytes_counts_each_channel_once_with_ring_traffic():
  hlo = "\n".join(
    [
      # An all-gather of 4 x 1 KiB over groups of 4, appearing in two fusions: counted once.
      "  %ag.1 = bf16[4,512]{1,0} all-gather(%p), channel_id=7, replica_groups=[2,4]<=[8]",
      "  %ag.2 = bf16[4,512]{1,0} all-gather(%q), channel_id=7, replica_groups=[2,4]<=[8]",
      # An all-reduce of 2 KiB over pairs: 2 x (n-1)/n x size.
      "  %ar = f32[512]{0} all-reduce(%r), channel_id=9, replica_groups={{0,1},{2,3}}",
      "  %add = f32[512]{0} add(%a, %b)",
    ]
  )
  assert aot.collective_bytes(hlo, 8) == pytest.approx(4096 * 3 / 4 + 2 * 2048 / 2)


def test_parse_oom_reads_libtpu_messages():
  msg = "RESOURCE_EXHAUSTED: ... HLO temporaries (35.93G) exceeds available HBM (15.75G)."
  assert aot.parse_oom(msg, 1 << 30) == int(35.93 * (1 << 30)) + (1 << 30)
  assert aot.parse_oom("Used 40.5G of 15.48G hbm. Exceeded", 0) == int(40.5 * (1 << 30))
  assert aot.parse_oom("INTERNAL: something else", 0) is None


def test_step_cost_extrapolates_probes_over_depth_and_microbatches(monkeypatch):
  def fake_compile(config, devices, hbm_bytes, with_hlo=False):
    # Per-device cost of a loop-free step: a fixed part plus 3 per layer per row.
    layers, rows = config.model.num_layers, config.global_batch_size
    assert not config.model.scan_layers and config.loss_chunk_size == 0
    cost = {"flops": 10.0 + 3.0 * layers * rows, "bytes": 1.0 * layers, "seconds": 0.5}
    return aot.Compiled(True, 1, 0.1, cost), ""

  monkeypatch.setattr(aot, "compile_step", fake_compile)
  config = _config([*TINY, "model.num_layers=32", "grad_accum_steps=4", "global_batch_size=16"])
  cost, _ = aot.step_cost(config, [None] * 8, 1 << 30)
  assert cost["flops"] == 4 * (10.0 + 3.0 * 32 * 4)
  assert cost["bytes"] == 4 * 32 and cost["seconds"] == 4 * 0.5 and cost["ici_bytes"] == 0


def test_estimate_never_undercuts_collective_traffic():
  # libtpu's optimal_seconds gives collectives no time, so a step that moves more bytes over ICI
  # than the compiler's seconds allow is ICI-bound; otherwise the compiler's figure stands.
  v5p = topo_lib.parse("v5p-256")
  flops = 100e12  # 0.218 s at v5p's 459 TFLOP/s.
  ici_bytes = 0.3 * v5p.ici_bandwidth / 2  # 0.3 s one way over all links.
  notes = []
  cost = {"flops": flops, "bytes": 1e9, "seconds": 0.25, "ici_bytes": ici_bytes}
  est = plan_lib._estimate(cost, flops, v5p, notes)
  assert est["estimate"] == "ici" and est["est_step_time_s"] == pytest.approx(0.3)
  assert est["compiler_step_time_s"] == 0.25 and "ICI-bound" in notes[-1]
  assert "ICI" in report._SOURCES["ici"]

  cost["seconds"] = 0.4
  est = plan_lib._estimate(cost, flops, v5p, notes := [])
  assert est["estimate"] == "compiler" and est["est_step_time_s"] == 0.4 and not notes

  # A compiler figure faster than peak FLOP/s is not credible: the roofline (here ICI) stands.
  cost["seconds"] = 0.1
  est = plan_lib._estimate(cost, flops, v5p, notes := [])
  assert est["estimate"] == "roofline" and est["est_step_time_s"] == pytest.approx(0.3)


def test_tiny_plan_fits_with_loop_corrected_costs():
  result = plan_lib.plan(_config([*TINY, "model.num_layers=1"]), topo_lib.parse("v5e-8"))
  assert all(key in result for key in KEYS)
  json.dumps(result)
  assert result["fits"] and result["chips"] == 8
  assert 0 < result["peak_hbm_bytes"] < result["hbm_per_chip_bytes"] == int(15.75 * 2**30)
  assert result["tokens_per_step"] == 8 * 128
  # Full remat recomputes the forward pass: hardware FLOPs exceed the model's, but not wildly.
  assert 1.0 <= result["flops_per_step"] / result["model_flops_per_step"] < 3.0
  assert result["estimate"] in ("compiler", "ici", "roofline")
  assert result["est_step_time_s"] >= result["roofline_s"]["compute_s"] > 0
  assert result["est_step_time_s"] >= result["roofline_s"]["ici_s"] > 0
  assert 0 < result["est_mfu"] <= 1
  assert result["compile_s"] > 0
  # A tiny full-remat model leaves nearly all of HBM free: the plan points at remat=dots.
  assert any("--config.model.remat=dots" in tip for tip in result["hints"])
  assert "faster?" in report.format_plan(result)
  # Compiled with the libtpu flags a run gets (trainer.tpu_flags sets its defaults when unset).
  assert result["libtpu_init_args"] == os.environ["LIBTPU_INIT_ARGS"]
  assert f"libtpu flags       {report.libtpu_flags(os.environ['LIBTPU_INIT_ARGS'])}" in (
    report.format_plan(result)
  )


def test_libtpu_flags_in_words():
  defaults = " ".join(tpu_flags.DEFAULT_FLAGS)
  assert report.libtpu_flags(defaults).startswith("the trainer's defaults (7 flags")
  # On a TPU VM, importing jax appends its launch barrier to whatever is set.
  barrier = "--xla_tpu_use_enhanced_launch_barrier=true"
  assert report.libtpu_flags(f"{defaults} {barrier}").endswith(
    f"flags, trainer/tpu_flags.py) plus {barrier}"
  )
  assert report.libtpu_flags("") == report.libtpu_flags("  ") == "none (LIBTPU_INIT_ARGS is empty)"
  assert report.libtpu_flags(" --xla_mine=1") == "--xla_mine=1"


_FLAGS_PAYLOAD = """
from launch import aot, topology
from tests.test_plan import TINY, _config
devices = topology.devices(topology.parse("v5p-16"))
config = _config([*TINY, "mesh.data=1", "mesh.fsdp=8"])
_, hlo = aot.compile_step(config, devices, 95 << 30, with_hlo=True)
print("async_collective_fusion" in hlo)
"""


def test_plans_compile_with_the_libtpu_flags_of_a_run():
  """The planner loads libtpu with trainer.tpu_flags's defaults, as the trainer does on a slice.

  On v5p they turn FSDP's weight all-gathers into asynchronous collective fusions, which changes
  HBM and cost; LIBTPU_INIT_ARGS, set even to '', replaces them in both places.
  """

  def async_gathers(**env):
    clean = {k: v for k, v in os.environ.items() if k != "LIBTPU_INIT_ARGS"}
    proc = subprocess.run(
      [sys.executable, "-c", _FLAGS_PAYLOAD],
      cwd=REPO,
      env={**clean, "JAX_PLATFORMS": "cpu", **env},
      capture_output=True,
      text=True,
      timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.split()[-1]

  assert async_gathers() == "True"
  assert async_gathers(LIBTPU_INIT_ARGS="") == "False"


def test_hints_follow_remat_and_memory():
  gib = 1 << 30
  full, dots = _config(), _config([*TINY, "model.remat=dots"])
  (tip,) = advice_lib.hints(full, 4 * gib, 95 * gib)
  assert "--config.model.remat=dots" in tip and "4.0 of 95 GiB" in tip
  # Memory already tight, or matmul outputs already saved: nothing to suggest.
  assert advice_lib.hints(full, 40 * gib, 95 * gib) == []
  assert advice_lib.hints(dots, 4 * gib, 95 * gib) == []


def test_advice_splits_heads_only_where_a_host_and_the_heads_allow():
  config = _config()  # 4 heads, 2 KV heads.
  one_chip = advice_lib.advice(config, {"data": 1, "fsdp": 1, "tensor": 1}, devices_per_host=1)
  assert not any("mesh.tensor" in tip for tip in one_chip)
  assert not any("mesh.data=1" in tip for tip in one_chip)
  host = advice_lib.advice(config, {"data": 1, "fsdp": 8, "tensor": 1}, devices_per_host=8)
  assert any("--config.mesh.tensor=2 (within a host)" in tip for tip in host)


@pytest.mark.parametrize(
  "meshes, remats, batches, match",
  [
    (["1x-1"], ["full"], ["1"], "--search_meshes=1x-1 must be DATAxFSDPxTENSOR"),
    (["-1x-1x1"], ["full"], ["1"], "one may be -1"),
    (["1x0x1"], ["full"], ["1"], "positive sizes"),
    (["1x-1x1"], ["full", "dot"], ["1"], "--search_remats=full,dot names unknown policies"),
    (["1x-1x1"], ["full"], ["1", "x"], "--search_batches=1,x must be positive whole rows"),
    (["1x-1x1"], ["full"], ["0"], "positive whole rows"),
  ],
)
def test_search_flags_are_checked_before_any_compile(meshes, remats, batches, match):
  with pytest.raises(ValueError, match=re.escape(match)):
    plan_lib.search_space(meshes, remats, batches)
  assert plan_lib.search_space(["1x-1x2", "2x-1x1"], ["dots"], ["1", "4"]) == dict(
    meshes=((1, -1, 2), (2, -1, 1)), remats=("dots",), per_device_batches=(1, 4)
  )


def test_auto_attention_plans_splash_with_heads_split_over_tensor():
  # head_dim 64 and seq 128 are shapes splash takes; its kernel is traced for the compile-only
  # TPU devices, inside shard_map (heads over `tensor`), with no concrete mask tables.
  overrides = [
    *TINY,
    "model.head_dim=64",
    "model.attention=auto",
    "model.scan_layers=False",
    "loss_chunk_size=0",
    "mesh.data=4",
    "mesh.tensor=2",
  ]
  result = plan_lib.plan(_config(overrides), topo_lib.parse("v5e-8"))
  assert result["attention"] == "splash" and result["fits"]
  assert result["mesh"] == {"data": 4, "fsdp": 1, "tensor": 2}
  assert any(note.startswith("splash kernel FLOPs added") for note in result["notes"])


def test_oversized_batch_does_not_fit_and_exits_3():
  proc = _cli(
    "--topology=v5e-8",
    *[f"--config.{kv}" for kv in TINY[1:]],
    "--config.global_batch_size=131072",
    "--config.loss_chunk_size=0",
  )
  assert proc.returncode == plan_lib.NOT_FITTING_EXIT_CODE, proc.stderr[-2000:]
  lines = proc.stdout.strip().splitlines()
  result = json.loads(lines[-1])
  assert result["fits"] is False and result["est_step_time_s"] is None
  assert result["peak_hbm_bytes"] > result["hbm_per_chip_bytes"]
  assert any("grad_accum_steps" in tip for tip in result["advice"])
  assert "DOES NOT FIT" in proc.stdout
  # Progress goes to stderr, a line before and after each compile.
  assert re.search(r"\] compiling the train step for 8 tpu devices: mesh", proc.stderr)
  assert re.search(r"\] out of HBM after \d+ s: [\d.]+ GiB needed", proc.stderr)


def test_bad_topology_is_one_clear_line():
  proc = _cli("--topology=v9x-8", timeout=120)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1].startswith("error: Unknown TPU topology 'v9x-8'")
  assert "v5p-256" in proc.stderr and proc.stdout == ""
  for args, message in (
    (["--config=configs/nope.py"], "error: --config does not load ([Errno 2] No such file"),
    (["--slices=0"], "error: --slices=0 must be at least 1."),
    (["--config.modle.x=1"], "error: unknown config key: 'modle'; Did you mean \"model\""),
    (
      ["--config.steps=x"],
      "error: flag --config.steps=x: invalid literal for int() with base 10: 'x' (",
    ),
  ):
    proc = _cli("--topology=v5p-8", *args, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(message), proc.stderr[-1000:]


def test_search_lists_fitting_plans_by_mfu():
  config = _config([*TINY, "model.num_layers=1"])
  results = plan_lib.search(
    config,
    topo_lib.parse("v5e-8"),
    meshes=((-1, 1, 1),),
    remats=("full", "none"),
    per_device_batches=(1,),
  )
  fitting = [r for r in results if r["fits"]]
  assert {r["remat"] for r in fitting} == {"full", "none"}
  assert all(r["global_batch_size"] == 8 for r in fitting)
  mfus = [r["est_mfu"] for r in fitting]
  assert mfus == sorted(mfus, reverse=True)
  assert "none" in report.format_search(results)
