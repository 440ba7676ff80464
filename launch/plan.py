"""Ahead-of-time plan of a training run on a TPU slice: HBM, FLOPs, step time, MFU, from this CPU.

python -m launch.plan --config=configs/llama3_8b.py --topology=v5p-256 \\
  --config.global_batch_size=128 --config.seq_len=2048 [--compare_loss_chunking] \\
  [--full_depth_cost]  # cost the unscanned step with all layers (slow) instead of probes
python -m launch.plan --config=configs/tiny.py --topology=v5e-8 --search

The real train step (`trainer.step.jit_train_step`) is compiled by libtpu for the named topology,
with the libtpu flags a run gets (`trainer.tpu_flags`: the defaults, or LIBTPU_INIT_ARGS when set);
memory comes from that compile, costs from loop-free probes (see `launch.aot`). The step time is
the compiler's (`optimal_seconds`) when it is positive and no faster than the chips' peak FLOP/s
allows; otherwise a stated roofline: the largest of FLOPs / peak, HBM bytes / HBM bandwidth and
collective bytes / ICI bandwidth (one direction, all links), i.e. perfect overlap. libtpu's
`optimal_seconds` sums its per-op cycle estimates and gives collectives none, so when the
collective bytes need longer over ICI than the compiler's step, that ICI time is the estimate
(communication fully overlapped, but not free). The JSON says which (`estimate`). stdout holds
a table and, last, one JSON line; exit code 3: does not fit.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # The planner compiles for chips it never drives.

from trainer import tpu_flags  # noqa: E402

# The run's flags, set before jax loads: on a TPU VM `import jax` itself sets LIBTPU_INIT_ARGS.
tpu_flags.init_args()

import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402

from data.batching import batch_shards  # noqa: E402
from launch import aot, report  # noqa: E402
from launch import topology as topo_lib  # noqa: E402
from launch.advice import advice, hints  # noqa: E402
from trainer import flops  # noqa: E402
from trainer import state as state_lib  # noqa: E402
from trainer.checks import batch_split  # noqa: E402
from trainer.cli import parse_flags, progress  # noqa: E402
from trainer.mesh import create_mesh  # noqa: E402

NOT_FITTING_EXIT_CODE = 3


def attention_kernel(config: Any, platform: str = "tpu") -> str:
  """The attention kernel the model runs for `config` on `platform` (e.g. splash on TPU)."""
  from model import attention  # noqa: PLC0415

  with aot.traced_as(platform):
    impl, why = attention.select_implementation(
      config.model.attention, config.model.head_dim, config.seq_len, config.model.dtype
    )
  return impl if why is None else f"{impl} ({why})"


def plan(
  config: Any,
  topology: topo_lib.Topology,
  num_slices: int | None = None,
  devices: list[Any] | None = None,
  compare_loss_chunking: bool = False,
  full_depth_cost: bool = False,
) -> dict[str, Any]:
  """Compiles `config` for `topology` ahead of time and returns the plan as a JSON-able dict."""
  t_start = time.perf_counter()
  slices = int(num_slices or config.mesh.num_slices)
  config = aot.with_overrides(config, mesh__num_slices=slices)
  devices = devices or topo_lib.devices(topology, slices)
  hbm = topology.hbm_bytes
  mesh_shape = dict(create_mesh(config.mesh, devices).shape)
  main, hlo = aot.compile_step(config, devices, hbm, with_hlo=not aot.needs_probes(config))
  mcfg = state_lib.model_config(config)
  tokens = config.global_batch_size * config.seq_len
  model_flops = flops.model_flops_per_token(mcfg, config.seq_len) * tokens
  n = len(devices)
  result: dict[str, Any] = {
    "topology": topology.name,
    "chips": n,
    "slices": slices,
    "hbm_per_chip_bytes": hbm,
    "peak_hbm_bytes": main.peak_bytes,
    "fits": main.fits,
    "flops_per_step": None,
    "model_flops_per_step": model_flops,
    "est_step_time_s": None,
    "est_mfu": None,
    "tokens_per_step": tokens,
    "compile_s": round(main.compile_s, 2),
    "estimate": None,
    "mesh": mesh_shape,
    "global_batch_size": config.global_batch_size,
    "seq_len": config.seq_len,
    "per_device_batch": config.global_batch_size / batch_shards(config.sharding_rules, mesh_shape),
    "grad_accum_steps": int(config.grad_accum_steps),
    "remat": config.model.remat,
    "scan_layers": bool(config.model.scan_layers),
    "attention": attention_kernel(config, devices[0].platform),
    "loss_chunk_size": int(config.loss_chunk_size),
    "libtpu_init_args": os.environ.get(tpu_flags.ENV, ""),
  }
  notes = [main.note] if main.note else []
  if slices > 1:
    notes.append("collectives are costed at ICI speed; traffic across slices (DCN) is slower")
  if compare_loss_chunking:
    result["loss_chunking"] = _compare_chunking(config, devices, hbm, main.peak_bytes)
  if not main.fits:
    result["advice"] = advice(config, mesh_shape, math.prod(topology.chips_per_host_bounds))
    result.update(notes=notes, total_s=round(time.perf_counter() - t_start, 2))
    return result
  cost, probe_s = main.cost, 0.0
  if aot.needs_probes(config):
    try:
      cost, probe_s = aot.step_cost(config, devices, hbm, full_depth_cost)
      notes.append(
        "costs from the step unscanned with all layers"
        if full_depth_cost
        else "costs from unscanned 1- and 2-layer probes, extrapolated to the full step"
      )
    except (RuntimeError, jax.errors.JaxRuntimeError) as e:
      cost = None
      notes.append(f"no compiler cost ({str(e).splitlines()[0]}); roofline on model FLOPs")
  else:
    cost["ici_bytes"] = aot.collective_bytes(hlo, n)
  if cost is not None and result["attention"] == "splash":
    _add_kernel_cost(cost, config, mcfg, tokens / n, topology, notes)
  result.update(_estimate(cost, model_flops / n, topology, notes))
  if result["flops_per_step"] is not None:
    result["flops_per_step"] *= n
  result["est_mfu"] = model_flops / (result["est_step_time_s"] * n * topology.peak_flops)
  result["hints"] = hints(config, main.peak_bytes, hbm)
  result.update(
    probe_compile_s=round(probe_s, 2),
    notes=notes,
    total_s=round(time.perf_counter() - t_start, 2),
  )
  return result


def _add_kernel_cost(
  cost: dict[str, float], config: Any, mcfg: Any, tokens: float, topology: Any, notes: list[str]
) -> None:
  """Adds the splash kernel's FLOPs, which XLA's cost model cannot see (a Mosaic custom call).

  Causal flash attention: 2 matmuls forward, 5 backward (it recomputes the probabilities), 2 more
  when remat recomputes the forward pass; each 2 * N * H * T / 2 FLOPs per token and layer. The
  kernel's time is taken as those FLOPs at peak.
  """
  matmuls = 7 + (2 if config.model.remat != "none" else 0)
  per_token = matmuls * mcfg.num_layers * mcfg.num_heads * mcfg.head_dim * config.seq_len
  kernel_flops = per_token * tokens
  cost["flops"] += kernel_flops
  if cost["seconds"] > 0:
    cost["seconds"] += kernel_flops / topology.peak_flops
  notes.append(f"splash kernel FLOPs added analytically: {kernel_flops:.3g} per device, at peak")


def _estimate(
  cost: dict[str, float] | None, model_flops: float, topology: topo_lib.Topology, notes: list[str]
) -> dict[str, Any]:
  """Step time per device: the compiler's, where it is credible, else the roofline."""
  # Full remat does more work than the model's 6N; fewer FLOPs than that means a miscount.
  flops_ok = cost is not None and cost["flops"] >= 0.95 * model_flops
  if cost is not None and not flops_ok:
    notes.append(f"compiler FLOPs {cost['flops']:.3g} < model FLOPs {model_flops:.3g}: not used")
  compute_s = (cost["flops"] if flops_ok else model_flops) / topology.peak_flops
  roofline = {"compute_s": compute_s, "hbm_s": None, "ici_s": None}
  if cost is not None:
    roofline["hbm_s"] = cost["bytes"] / topology.hbm_bandwidth
    roofline["ici_s"] = cost["ici_bytes"] / (topology.ici_bandwidth / 2)
  roofline_s = max(v for v in roofline.values() if v is not None)
  compiler_s = cost["seconds"] if cost is not None else None
  usable = compiler_s is not None and compiler_s > 0 and compiler_s >= 0.99 * compute_s
  if compiler_s is not None and not usable:
    notes.append(f"compiler step time {compiler_s:.4g} s is not credible (negative or < peak)")
  estimate, step_s = ("compiler", compiler_s) if usable else ("roofline", roofline_s)
  ici_s = roofline["ici_s"]
  if usable and ici_s is not None and ici_s > compiler_s:
    # libtpu's optimal_seconds gives collectives no time: never let it undercut their traffic.
    notes.append(
      f"collectives need {ici_s:.4g} s over ICI, more than the compiler's {compiler_s:.4g} s "
      "(which leaves them out): the step is taken as ICI-bound"
    )
    estimate, step_s = "ici", ici_s
  return {
    "flops_per_step": cost["flops"] if cost is not None else None,
    "est_step_time_s": step_s,
    "estimate": estimate,
    "compiler_step_time_s": compiler_s,
    "roofline_s": roofline,
  }


def _compare_chunking(config: Any, devices: list[Any], hbm: int, peak: int) -> dict[str, Any]:
  """Peak HBM with the loss unchunked (full [B, T, V] fp32 logits), against the plan's."""
  chunk = int(config.loss_chunk_size)
  if chunk <= 0:
    return {"note": "loss_chunk_size is 0 here; plan with --config.loss_chunk_size=512 to compare"}
  full, _ = aot.compile_step(aot.with_overrides(config, loss_chunk_size=0), devices, hbm)
  return {
    "chunk_size": chunk,
    "peak_hbm_bytes_unchunked": full.peak_bytes,
    "unchunked_fits": full.fits,
    "saved_bytes": full.peak_bytes - peak,
  }


# What `--search` tries unless told otherwise: (data, fsdp, tensor) splits, remats, rows per device.
SEARCH_MESHES = ((1, -1, 1), (2, -1, 1), (1, -1, 2), (1, -1, 4))
SEARCH_REMATS = ("full", "dots_no_batch", "dots")
SEARCH_BATCHES = (1, 2, 4, 8)


def search(
  config: Any,
  topology: topo_lib.Topology,
  num_slices: int | None = None,
  meshes: tuple[tuple[int, int, int], ...] = SEARCH_MESHES,
  remats: tuple[str, ...] = SEARCH_REMATS,
  per_device_batches: tuple[int, ...] = SEARCH_BATCHES,
) -> list[dict[str, Any]]:
  """Plans over mesh splits, remat policies and per-device batches; every candidate, best first.

  Batches grow until one does not fit (a larger one would not either). Fitting plans come first,
  by estimated MFU; then the rest, each with a `fits: false` or an `error`.
  """
  slices = int(num_slices or config.mesh.num_slices)
  devices = topo_lib.devices(topology, slices)
  results = []
  most, k = len(meshes) * len(remats) * len(per_device_batches), 0
  for data, fsdp, tensor in meshes:
    for remat in remats:
      for per_device in sorted(per_device_batches):
        k += 1
        progress(
          f"search candidate {k} of at most {most}: mesh {data}x{fsdp}x{tensor}, remat {remat}, "
          f"{per_device} rows per device"
        )
        candidate = aot.with_overrides(
          config, mesh__data=data, mesh__fsdp=fsdp, mesh__tensor=tensor, model__remat=remat
        )
        try:
          mesh = create_mesh(aot.with_overrides(candidate, mesh__num_slices=slices).mesh, devices)
          shards, _ = batch_split(candidate, mesh.shape)
          candidate = aot.with_overrides(
            candidate, global_batch_size=per_device * shards, grad_accum_steps=1
          )
          result = plan(candidate, topology, slices, devices)
        except Exception as e:  # One candidate that cannot compile must not end the search.
          message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
          results.append(
            {
              "mesh": {"data": data, "fsdp": fsdp, "tensor": tensor},
              "remat": remat,
              "per_device_batch": per_device,
              "fits": False,
              "error": message[:300],
            }
          )
          break
        results.append(result)
        if not result["fits"]:
          break
  fitting = sorted((r for r in results if r["fits"]), key=lambda r: -r["est_mfu"])
  return fitting + [r for r in results if not r["fits"]]


def search_space(meshes: list[str], remats: list[str], batches: list[str]) -> dict[str, Any]:
  """The --search_* flags -> `search` keyword arguments; a bad value is one ValueError."""
  from model.config import REMAT_POLICIES  # noqa: PLC0415

  def ints(spec: str) -> tuple[int, ...]:
    try:
      return tuple(int(x) for x in spec.split("x"))
    except ValueError:
      return ()

  parsed = tuple(ints(s) for s in meshes)
  if not parsed or any(
    len(m) != 3 or m.count(-1) > 1 or any(x == 0 or x < -1 for x in m) for m in parsed
  ):
    raise ValueError(
      f"--search_meshes={','.join(meshes)} must be DATAxFSDPxTENSOR items of positive sizes "
      "(one may be -1, the rest of the devices), e.g. 1x-1x2."
    )
  unknown = [r for r in remats if r not in REMAT_POLICIES]
  if not remats or unknown:
    raise ValueError(
      f"--search_remats={','.join(remats)} names unknown policies; use some of "
      f"{', '.join(REMAT_POLICIES)}."
    )
  rows = [b for b in batches if b.isdigit() and int(b) > 0]
  if not batches or len(rows) != len(batches):
    raise ValueError(
      f"--search_batches={','.join(batches)} must be positive whole rows per device, e.g. 1,2,4."
    )
  return dict(meshes=parsed, remats=tuple(remats), per_device_batches=tuple(map(int, rows)))


def run(
  config: Any,
  topology_name: str,
  slices: int | None = None,
  compare_loss_chunking: bool = False,
  search_space: dict[str, Any] | None = None,
  full_depth_cost: bool = False,
) -> int:
  """The whole command: prints the table and, last, the JSON line; returns the exit code."""
  topology = topo_lib.parse(topology_name)
  if search_space is not None:
    results = search(config, topology, slices, **search_space)
    print(report.format_search(results))
    fitting = [r for r in results if r["fits"]]
    print(json.dumps({"topology": topology.name, "fitting": len(fitting), "plans": results}))
    return 0 if fitting else NOT_FITTING_EXIT_CODE
  result = plan(config, topology, slices, None, compare_loss_chunking, full_depth_cost)
  print(report.format_plan(result))
  print(json.dumps(result))
  return 0 if result["fits"] else NOT_FITTING_EXIT_CODE


def main() -> None:
  """Flags -> `run`; errors a user can cause end in one line."""
  from absl import app, flags  # noqa: PLC0415 - flags exist only when this runs as a program.
  from ml_collections import config_flags  # noqa: PLC0415

  config = config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)
  topology = flags.DEFINE_string("topology", None, "Cloud TPU type, e.g. v5p-256, v6e-256, v5e-8.")
  slices = flags.DEFINE_integer(
    "slices", None, "Slices joined over DCN (default: mesh.num_slices)."
  )
  compare = flags.DEFINE_bool(
    "compare_loss_chunking", False, "Also compile with loss_chunk_size=0 and report HBM saved."
  )
  full_depth = flags.DEFINE_bool(
    "full_depth_cost", False, "Cost the unscanned step with all layers, not 1- and 2-layer probes."
  )
  do_search = flags.DEFINE_bool("search", False, "Try mesh splits, remat policies and batches.")
  meshes = flags.DEFINE_list(
    "search_meshes", ["x".join(map(str, m)) for m in SEARCH_MESHES], "DATAxFSDPxTENSOR."
  )
  remats = flags.DEFINE_list("search_remats", list(SEARCH_REMATS), "Remat policies.")
  batches = flags.DEFINE_list("search_batches", list(map(str, SEARCH_BATCHES)), "Rows per device.")
  flags.mark_flags_as_required(["config", "topology"])

  def program(argv: list[str]) -> None:
    del argv
    from trainer.cli import load_config  # noqa: PLC0415
    from trainer.mesh import MeshError  # noqa: PLC0415

    if slices.value is not None and slices.value < 1:
      sys.exit(f"error: --slices={slices.value} must be at least 1.")
    try:
      loaded = load_config(config)
      space = None
      if do_search.value:
        space = search_space(meshes.value, remats.value, batches.value)
      code = run(loaded, topology.value, slices.value, compare.value, space, full_depth.value)
    except (ValueError, MeshError, topo_lib.TopologyError) as e:
      if os.environ.get("LLAMA_TRACEBACK"):
        raise
      sys.exit(f"error: {' '.join(str(e).split())}")
    sys.stdout.flush()
    sys.exit(code)

  app.run(program, flags_parser=parse_flags)


if __name__ == "__main__":
  main()
