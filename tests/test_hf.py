"""Parity with transformers' LlamaForCausalLM (PyTorch fp32) and the HF import/export paths."""

import json
import logging
import os
import re
import sys
import types

import jax
import numpy as np
import pytest
from absl import logging as absl_logging
from flax.linen import meta

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from model import Llama3  # noqa: E402
from model.convert import load_params_dir, main, save_params_dir  # noqa: E402
from model.hf import config_from_hf, load_hf, save_hf  # noqa: E402
from model.params import stack_layers  # noqa: E402

TOL = 2e-5  # Measured: at most 3.2e-6 (fp32 against PyTorch fp32).
T = 24
SCALING = dict(
  rope_type="llama3",
  factor=8.0,
  low_freq_factor=1.0,
  high_freq_factor=4.0,
  original_max_position_embeddings=64,
)
# (a) GQA with Llama 3.1 scaling: with head_dim 16 and theta 5e5 the wavelengths (6, 33, 168, ...)
# fall in all three bands of original_max_position_embeddings=64; (b) tied-embedding MHA.
GQA = dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0, rope_scaling=SCALING)
TIED_MHA = dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)


def _hf_model(**kw) -> "transformers.LlamaForCausalLM":
  """A tiny random LlamaForCausalLM whose RMSNorm weights are moved away from 1."""
  torch.manual_seed(0)
  base = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    head_dim=16,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    initializer_range=0.1,
    attn_implementation="eager",
  )
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**base, **kw})).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.5 * torch.randn_like(p))
  return model


def _inputs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Two rows of tokens and positions that run to a few thousand (where the scaling matters)."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 256, (2, T))
  positions = np.stack([np.arange(T), np.sort(rng.choice(4000, T, replace=False))])
  return tokens, positions


def _hf_logits(model, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    out = model(input_ids=torch.tensor(tokens), position_ids=torch.tensor(positions))
  return out.logits.numpy()


def _our_logits(config, params, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
  return np.asarray(Llama3(config).apply({"params": params}, tokens, positions))


@pytest.fixture(scope="module", params=["gqa_rope_scaling", "tied_mha"])
def case(request, tmp_path_factory):
  """An HF model saved by transformers itself, plus its logits on `_inputs()`."""
  kw = GQA if request.param == "gqa_rope_scaling" else TIED_MHA
  model = _hf_model(**kw)
  hf_dir = str(tmp_path_factory.mktemp(request.param))
  model.save_pretrained(hf_dir)
  tokens, positions = _inputs()
  return types.SimpleNamespace(
    name=request.param, model=model, dir=hf_dir, logits=_hf_logits(model, tokens, positions)
  )


def test_load_hf_matches_transformers(case):
  tokens, positions = _inputs()
  assert case.logits.std() > 0.5  # Logits large enough for 1e-4 to be a real bound.
  config, params = load_hf(case.dir, scan_layers=True)
  assert config.tie_embeddings == (case.name == "tied_mha")
  assert ("lm_head" in params) == (case.name != "tied_mha")
  diff = np.abs(_our_logits(config, params, tokens, positions) - case.logits).max()
  print(f"{case.name}: max |logit diff| vs transformers = {diff:.2e}")
  assert diff <= TOL
  # The unscanned layout holds the same numbers.
  config_u, params_u = load_hf(case.dir, scan_layers=False)
  assert not config_u.scan_layers and "layers_1" in params_u
  jax.tree.map(np.testing.assert_array_equal, stack_layers(params_u), params)
  diff_u = np.abs(_our_logits(config_u, params_u, tokens, positions) - case.logits).max()
  assert diff_u <= TOL
  if config.rope_scaling is not None:
    # Guard: dropping the scaling must change logits far beyond TOL, so the check above saw it.
    unscaled = _our_logits(config.replace(rope_scaling=None), params, tokens, positions)
    assert np.abs(unscaled - case.logits).max() > 100 * TOL


def test_save_hf_loads_in_transformers(case, tmp_path):
  tokens, positions = _inputs(seed=1)
  config, params = load_hf(case.dir)
  ours = _our_logits(config, params, tokens, positions)
  sharded = case.name == "gqa_rope_scaling"
  save_hf(config, params, str(tmp_path), max_shard_bytes=40_000 if sharded else 5 * 10**9)
  files = sorted(os.listdir(tmp_path))
  if sharded:
    assert "model.safetensors.index.json" in files
    assert sum(f.endswith(".safetensors") for f in files) > 2
  else:
    assert "model.safetensors" in files
  with open(tmp_path / "config.json") as f:
    written = json.load(f)
  assert written["model_type"] == "llama" and written["architectures"] == ["LlamaForCausalLM"]
  assert "rope_theta" in written and "rope_parameters" not in written
  assert written["torch_dtype"] == "float32"
  reloaded = transformers.LlamaForCausalLM.from_pretrained(
    str(tmp_path), attn_implementation="eager"
  )
  diff = np.abs(_hf_logits(reloaded, tokens, positions) - ours).max()
  print(f"{case.name}: max |logit diff| after save_hf -> from_pretrained = {diff:.2e}")
  assert diff <= TOL
  # And our own loader reads the (sharded) export back bit for bit.
  config2, params2 = load_hf(str(tmp_path))
  assert config2 == config
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_save_hf_accepts_boxed_unscanned_params(tmp_path):
  config, _ = load_hf(_saved(tmp_path / "src", TIED_MHA))
  config = config.replace(scan_layers=False)
  boxed = Llama3(config).init(jax.random.key(0), np.zeros((1, 4), np.int32))["params"]
  save_hf(config, boxed, str(tmp_path / "out"), dtype="bfloat16")
  config2, params2 = load_hf(str(tmp_path / "out"), scan_layers=False)
  assert config2.param_dtype == "float32"
  unboxed = jax.tree.map(np.asarray, meta.unbox(boxed))
  for a, b in zip(jax.tree.leaves(unboxed), jax.tree.leaves(params2)):
    np.testing.assert_allclose(a, b, rtol=2**-8, atol=0)  # bf16 rounding, nothing more.
  with open(tmp_path / "out" / "config.json") as f:
    assert json.load(f)["torch_dtype"] == "bfloat16"


def _saved(path, kw) -> str:
  _hf_model(**kw).save_pretrained(str(path))
  return str(path)


def test_both_rope_spellings_give_one_config(case):
  with open(os.path.join(case.dir, "config.json")) as f:
    new_style = json.load(f)  # transformers 5 writes rope_parameters with rope_theta inside.
  assert "rope_parameters" in new_style
  old_style = {k: v for k, v in new_style.items() if k != "rope_parameters"}
  rope = dict(new_style["rope_parameters"])
  old_style["rope_theta"] = rope.pop("rope_theta")
  old_style["rope_scaling"] = rope if rope.get("rope_type") == "llama3" else None
  config_new, config_old = config_from_hf(new_style), config_from_hf(old_style)
  assert config_new == config_old
  if case.name == "gqa_rope_scaling":
    assert config_new.rope_theta == 500000.0
    assert dict(config_new.rope_scaling)["original_max_position_embeddings"] == 64
  else:
    assert config_new.rope_scaling is None


@pytest.mark.parametrize(
  "setup, match",
  [
    ("empty", "has no config.json"),
    ("gpt2", "not 'llama'"),
    ("no_weights", "neither model.safetensors"),
    ("yarn", "RoPE type 'yarn'"),
    ("llama3_partial", r"llama3 RoPE scaling lacks \['low_freq_factor'"),
    ("untyped_factor", "has a factor but no rope_type"),
    ("bias", "has attention_bias=True"),
    ("bad_json", r"DIR/config.json is not valid JSON \(Expecting property name"),
    ("json_list", "DIR/config.json holds a JSON list, not an object"),
    ("bad_index", r"DIR/model.safetensors.index.json is not valid JSON \(Expecting value"),
    ("index_no_map", "DIR/model.safetensors.index.json has no weight_map"),
    ("missing_shard", "DIR/model-00002-of-00002.safetensors, named in model.safetensors.index"),
    ("truncated", r"DIR/model.safetensors is truncated or corrupt \(incomplete metadata"),
    ("garbage", r"DIR/model.safetensors is truncated or corrupt \(header too large\)"),
    ("empty_weights", r"DIR/model.safetensors is truncated or corrupt \(header too small\)"),
  ],
)
def test_not_a_llama_dir_raises_one_clear_sentence(tmp_path, setup, match):
  hf = {"model_type": "llama", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8}
  hf.update(num_hidden_layers=1, num_attention_heads=2)
  if setup == "gpt2":
    hf["model_type"] = "gpt2"
  if setup == "yarn":
    hf["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
  if setup == "llama3_partial":
    hf["rope_parameters"] = {"rope_type": "llama3", "factor": 8.0}
  if setup == "untyped_factor":
    hf["rope_scaling"] = {"factor": 2.0}
  if setup == "bias":
    hf["attention_bias"] = True
  if setup != "empty":
    (tmp_path / "config.json").write_text(json.dumps(hf))
  if setup in ("bad_json", "json_list"):
    (tmp_path / "config.json").write_text(
      '{"model_type": "llama",\n}' if setup == "bad_json" else "[]"
    )
  index = {"bad_index": "", "index_no_map": "{}"}
  index["missing_shard"] = json.dumps({"weight_map": {"x": "model-00002-of-00002.safetensors"}})
  if setup in index:
    (tmp_path / "model.safetensors.index.json").write_text(index[setup])
  if setup in ("truncated", "garbage", "empty_weights"):
    from safetensors.numpy import save_file

    weights = str(tmp_path / "model.safetensors")
    save_file({"model.embed_tokens.weight": np.ones((8, 8), np.float32)}, weights)
    data = (tmp_path / "model.safetensors").read_bytes()
    bad = {"truncated": data[: len(data) // 2], "garbage": b"\xff" * 64, "empty_weights": b""}
    (tmp_path / "model.safetensors").write_bytes(bad[setup])
  with pytest.raises(ValueError, match=match.replace("DIR", re.escape(str(tmp_path)))) as err:
    load_hf(str(tmp_path))
  assert "\n" not in str(err.value) and str(err.value).endswith(".")
  if setup == "truncated":  # The CLI prints that one line (trainer.generate and init_from do too).
    with pytest.raises(SystemExit) as e:
      main(["import", f"--hf_dir={tmp_path}", f"--output={tmp_path / 'params'}"])
    assert e.value.code == f"error: {err.value}"


def test_cli_import_export_round_trip(tmp_path, monkeypatch):
  src = _saved(tmp_path / "hf", {**GQA, "bos_token_id": 5, "eos_token_id": [6, 7]})
  (tmp_path / "hf" / "tokenizer.json").write_text('{"stand-in": 1}')
  main(["import", f"--hf_dir={src}", f"--output={tmp_path / 'params'}"])
  config, params = load_params_dir(str(tmp_path / "params"))
  assert config.scan_layers and config.rope_scaling is not None
  main(["export", f"--checkpoint={tmp_path / 'params'}", f"--output={tmp_path / 'hf2'}"])
  # The token ids, tokenizer and generation config come back as they were.
  hf_config = json.loads((tmp_path / "hf2" / "config.json").read_text())
  assert (hf_config["bos_token_id"], hf_config["eos_token_id"]) == (5, [6, 7])
  for name in ("tokenizer.json", "generation_config.json"):
    assert (tmp_path / "hf2" / name).read_bytes() == (tmp_path / "hf" / name).read_bytes()
  from safetensors.numpy import load_file

  original = load_file(os.path.join(src, "model.safetensors"))
  exported = load_file(str(tmp_path / "hf2" / "model.safetensors"))
  assert sorted(original) == sorted(exported)
  for name in original:
    np.testing.assert_array_equal(exported[name], original[name], err_msg=name)
  with pytest.raises(ValueError, match="not empty"):
    save_params_dir(config, params, str(tmp_path / "params"))
  # A params dir whose checkpoint is gone (an import killed early, a partial copy): one line.
  broken = tmp_path / "broken"
  broken.mkdir()
  (broken / "model_config.json").write_bytes((tmp_path / "params/model_config.json").read_bytes())
  with pytest.raises(SystemExit, match=r"has model_config.json but its parameters do not restore"):
    main(["export", f"--checkpoint={broken}", f"--output={tmp_path / 'hf_broken'}"])

  # A training workdir (no model_config.json) goes through trainer.checkpoint.restore_params.
  calls = []
  fake = types.ModuleType("trainer.checkpoint")
  fake.restore_params = lambda workdir: calls.append(workdir) or (config, params)
  monkeypatch.setitem(sys.modules, "trainer.checkpoint", fake)
  (tmp_path / "workdir").mkdir()
  main(["export", f"--checkpoint={tmp_path / 'workdir'}", f"--output={tmp_path / 'hf3'}"])
  assert calls == [str(tmp_path / "workdir")]
  assert (tmp_path / "hf3" / "model.safetensors").read_bytes() == (
    tmp_path / "hf2" / "model.safetensors"
  ).read_bytes()
  # The run's tokenizer goes along, with its special token ids in config.json.
  from data.tokenizers import ByteTokenizer

  ByteTokenizer().save(str(tmp_path / "workdir" / "tokenizer"))
  main(["export", f"--checkpoint={tmp_path / 'workdir'}", f"--output={tmp_path / 'hf4'}"])
  hf_config = json.loads((tmp_path / "hf4" / "config.json").read_text())
  assert (hf_config["bos_token_id"], hf_config["eos_token_id"]) == (256, 257)
  assert (tmp_path / "hf4" / "tokenizer.json").exists()
  for bad in (["--checkpoint=/nonexistent/run"], [f"--checkpoint={tmp_path}", "--dtype=float33"]):
    with pytest.raises(SystemExit) as e:
      main(["export", *bad, f"--output={tmp_path / 'hf5'}"])
    assert e.value.code != 0 and not (tmp_path / "hf5").exists()


def test_cli_export_refuses_a_used_output_and_overwrite_replaces_the_model(
  tmp_path, caplog, monkeypatch
):
  src = _saved(tmp_path / "hf", GQA)  # Another model: weights, config.json, generation_config.json.
  config, params = load_hf(src)
  save_params_dir(config, params, str(tmp_path / "params"))
  export = ["export", f"--checkpoint={tmp_path / 'params'}"]
  contents = lambda: {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()}
  before = contents()
  assert "generation_config.json" in before
  (tmp_path / "afile").write_text("precious")
  for out, message in (
    (src, "not empty; pick a new output directory or pass --overwrite to replace"),
    (tmp_path / "afile", "exists and is not a directory; pick a new output directory."),
  ):
    with pytest.raises(SystemExit) as e:
      main([*export, f"--output={out}"])
    assert str(e.value.code).startswith(f"error: {out} ") and message in str(e.value.code)
  with pytest.raises(SystemExit, match=r"^error: --max_shard_bytes=0 must be positive"):
    main([*export, f"--output={tmp_path / 'new'}", "--max_shard_bytes=0"])
  assert contents() == before
  assert (tmp_path / "afile").read_text() == "precious"
  # --overwrite with a bad --checkpoint still loses nothing.
  with pytest.raises(SystemExit):
    main(["export", "--checkpoint=/nonexistent/run", f"--output={src}", "--overwrite"])
  assert contents() == before

  # ... and so does a write that fails halfway (a full disk): the new files are staged aside.
  def half_written(config, params, out_dir, **kw):
    with open(os.path.join(out_dir, "model.safetensors"), "wb") as f:
      f.write(b"partial")
    raise OSError(28, "No space left on device")

  with monkeypatch.context() as m:
    m.setattr("model.convert.save_hf", half_written)
    with pytest.raises(SystemExit, match="No space left"):
      main([*export, f"--output={src}", "--overwrite"])
  assert contents() == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "hf", "params"]  # No staging.
  # A training run's or a params dir is never an export target, --overwrite or not.
  with pytest.raises(SystemExit, match="params holds a params dir; export to a directory of"):
    main([*export, f"--output={tmp_path / 'params'}", "--overwrite"])

  # --overwrite replaces the earlier model (shards, index, generation config), keeps other files.
  out = tmp_path / "out"
  save_hf(config, params, str(out), max_shard_bytes=40_000)
  (out / "generation_config.json").write_bytes(before["generation_config.json"])
  (out / "README.md").write_text("notes")
  absl_logging.set_verbosity(absl_logging.INFO)  # As a fresh process starts; main lowers it.
  caplog.set_level(logging.INFO)
  main([*export, f"--output={out}", "--overwrite"])
  assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors"]
  assert (out / "README.md").read_text() == "notes"
  jax.tree.map(np.testing.assert_array_equal, load_hf(str(out))[1], params)
  # Orbax's INFO narration (CheckpointManager init, closing metadata stores) stays quiet.
  assert [r.getMessage() for r in caplog.records if r.name == "absl"] == []
  assert any("Wrote Hugging Face checkpoint" in r.getMessage() for r in caplog.records)


def test_cli_import_checks_the_output_before_reading_weights(tmp_path, monkeypatch):
  monkeypatch.setattr("model.convert.load_hf", lambda *a, **k: pytest.fail("read the weights"))
  (tmp_path / "used").mkdir()
  (tmp_path / "used" / "notes.txt").write_text("x")
  (tmp_path / "afile").write_text("x")
  for out, message in (
    (tmp_path / "used", "already exists and is not empty; pick a new output directory."),
    (tmp_path / "afile", "exists and is not a directory; pick a new output directory."),
  ):
    with pytest.raises(SystemExit) as e:
      main(["import", f"--hf_dir={tmp_path}", f"--output={out}"])
    assert e.value.code == f"error: {out} {message}"


@pytest.mark.parametrize("module", ["model.hf", "model.convert"])
def test_the_documented_commands_run_as_programs(tmp_path, module):
  """`python -m model.hf ...` (the README's spelling) and `python -m model.convert ...` reach
  the same CLI; a bad path ends in its one line."""
  import subprocess

  cmd = [sys.executable, "-m", module, "export", "--checkpoint=/nonexistent/run"]
  out = subprocess.run([*cmd, f"--output={tmp_path / 'hf'}"], capture_output=True, text=True)
  assert out.returncode == 1 and not (tmp_path / "hf").exists()
  assert out.stderr.strip().splitlines() == [
    "error: /nonexistent/run does not exist; give a params dir or a training workdir."
  ]
