"""The human-readable side of `launch.plan`: one plan as a table, a search as one line per plan."""

from __future__ import annotations

from typing import Any

from trainer import tpu_flags

_GIB = float(1 << 30)
_SOURCES = {
  "compiler": "compiler's cost model",
  "ici": "collective bytes at ICI bandwidth (the compiler's estimate leaves collectives out)",
  "roofline": "roofline (perfect overlap at peak: a lower bound, read it as optimistic)",
}


def _gib(x: float | None) -> str:
  return "-" if x is None else f"{x / _GIB:.2f} GiB"


def libtpu_flags(args: str) -> str:
  """LIBTPU_INIT_ARGS in words: the trainer's defaults (plus any others), none, or as given."""
  flags = args.split()
  if not flags:
    return "none (LIBTPU_INIT_ARGS is empty)"
  if not set(tpu_flags.DEFAULT_FLAGS) <= set(flags):
    return args.strip()
  others = [f for f in flags if f not in tpu_flags.DEFAULT_FLAGS]
  text = f"the trainer's defaults ({len(tpu_flags.DEFAULT_FLAGS)} flags, trainer/tpu_flags.py)"
  return f"{text} plus {' '.join(others)}" if others else text


def format_plan(r: dict[str, Any]) -> str:
  """A readable table of one plan."""
  mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
  rows = [
    ("topology", f"{r['topology']}: {r['chips']} chips, {r['slices']} slice(s)"),
    ("mesh", mesh),
    (
      "batch",
      f"{r['global_batch_size']} x {r['seq_len']} tokens ({r['per_device_batch']:g} rows per "
      f"device, {r['grad_accum_steps']} microbatch(es))",
    ),
    ("remat / attention", f"{r['remat']} / {r['attention']} (scan_layers={r['scan_layers']})"),
    ("libtpu flags", libtpu_flags(r["libtpu_init_args"])),
    (
      "HBM per device",
      f"{_gib(r['peak_hbm_bytes'])} of {_gib(r['hbm_per_chip_bytes'])}: "
      + ("fits" if r["fits"] else "DOES NOT FIT"),
    ),
  ]
  if r.get("loss_chunking", {}).get("chunk_size"):
    c = r["loss_chunking"]
    rows.append(
      (
        "chunked loss",
        f"chunk {c['chunk_size']} saves {_gib(c['saved_bytes'])} (unchunked peak "
        f"{_gib(c['peak_hbm_bytes_unchunked'])})",
      )
    )
  if r["est_step_time_s"] is not None:
    roof = r["roofline_s"]
    terms = ", ".join(f"{k[:-2]} {v:.4f} s" for k, v in roof.items() if v is not None)
    hw = f"{r['flops_per_step']:.3e}" if r["flops_per_step"] else "-"
    rows += [
      ("FLOPs per step", f"compiler {hw}, model {r['model_flops_per_step']:.3e}"),
      ("step time (est.)", f"{r['est_step_time_s']:.4f} s from the {_SOURCES[r['estimate']]}"),
      ("roofline", terms),
      ("MFU (est.)", f"{100 * r['est_mfu']:.1f}%"),
    ]
  rows += [
    ("tokens per step", f"{r['tokens_per_step']:,}"),
    ("compile", f"{r['compile_s']:.1f} s (+ {r.get('probe_compile_s', 0):.1f} s cost probes)"),
  ]
  rows += [("advice", tip) for tip in r.get("advice", [])]
  rows += [("faster?", tip) for tip in r.get("hints", [])]
  rows += [("note", note) for note in r.get("notes", [])]
  return "\n".join(f"{k:<18} {v}" for k, v in rows)


def format_search(results: list[dict[str, Any]]) -> str:
  """One line per candidate, best first."""
  lines = [f"{'mesh d/f/t':<12} {'remat':<14} {'rows':>5} {'HBM GiB':>8} {'step s':>8} {'MFU':>6}"]
  for r in results:
    m = r["mesh"]
    shape = f"{m['data']}/{m['fsdp']}/{m['tensor']}"
    head = f"{shape:<12} {r['remat']:<14} {r['per_device_batch']:>5g}"
    if "error" in r:
      lines.append(f"{head} error: {r['error'][:80]}")
    elif not r["fits"]:
      lines.append(f"{head} {r['peak_hbm_bytes'] / _GIB:>8.2f} does not fit")
    else:
      lines.append(
        f"{head} {r['peak_hbm_bytes'] / _GIB:>8.2f} {r['est_step_time_s']:>8.4f} "
        f"{100 * r['est_mfu']:>5.1f}%"
      )
  return "\n".join(lines)
