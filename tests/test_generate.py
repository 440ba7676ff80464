"""Generation: greedy parity with transformers, KV-cache logits, sampling filters, the CLI."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.base import SHARDING_RULES
from model import Llama3, ModelConfig
from model.generate import decode_step, filter_logits, generate, init_cache, sample_logits

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

V = 128
PAD = V + 1  # Outside the vocab, so a pad can never be mistaken for a generated token.
PROMPTS = [[5, 17, 99, 3, 42, 8, 61], [11, 2], [77, 30, 30, 9], [1, 2, 3]]
N = 12
SCALING = dict(
  rope_type="llama3",
  factor=8.0,
  low_freq_factor=1.0,
  high_freq_factor=4.0,
  original_max_position_embeddings=16,
)
TINY = ModelConfig(
  vocab_size=V,
  embed_dim=32,
  mlp_dim=64,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  head_dim=8,
  rope_theta=10000.0,
  rope_scaling=None,
  max_seq_len=64,
)


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
  """A random GQA LlamaForCausalLM with Llama 3.1 RoPE scaling, and the same model via load_hf."""
  from model.hf import load_hf

  torch.manual_seed(0)
  hf_config = transformers.LlamaConfig(
    vocab_size=V,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    rope_theta=500000.0,
    rope_scaling=SCALING,
    rms_norm_eps=1e-5,
    # Weights large enough that greedy paths wander instead of repeating one token.
    initializer_range=0.3,
    bos_token_id=None,
    eos_token_id=None,
    attn_implementation="eager",
  )
  model = transformers.LlamaForCausalLM(hf_config).eval()
  path = tmp_path_factory.mktemp("hf")
  model.save_pretrained(path)
  config, params = load_hf(path)
  return model, config, params


def _hf_greedy(model, prompt: list[int], eos_id: int | None) -> list[int]:
  gen_config = transformers.GenerationConfig(
    max_new_tokens=N, do_sample=False, eos_token_id=eos_id, pad_token_id=PAD
  )
  with torch.no_grad():
    out = model.generate(
      input_ids=torch.tensor([prompt]),
      attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
      generation_config=gen_config,
    )
  return out[0].tolist()


def test_greedy_matches_transformers_per_prompt(hf_pair):
  model, config, params = hf_pair
  ours = np.asarray(generate(config, params, PROMPTS, max_new_tokens=N, pad_id=PAD))
  t = max(map(len, PROMPTS))
  assert ours.shape == (len(PROMPTS), t + N)
  for row, prompt in zip(ours, PROMPTS):
    ref = _hf_greedy(model, prompt, None)
    assert len(ref) == len(prompt) + N
    assert row[: len(ref)].tolist() == ref
    assert (row[len(ref) :] == PAD).all()
    assert len(set(ref[len(prompt) :])) > 3, "a degenerate path would make this test weak"

  # Stop at a token the first row emits mid-way: every row must match transformers' early stop.
  eos = int(ours[0, len(PROMPTS[0]) + 4])
  ours = np.asarray(generate(config, params, PROMPTS, max_new_tokens=N, eos_id=eos, pad_id=PAD))
  for row, prompt in zip(ours, PROMPTS):
    ref = _hf_greedy(model, prompt, eos)
    assert row[: len(ref)].tolist() == ref
    assert (row[len(ref) :] == PAD).all()
  assert len(_hf_greedy(model, PROMPTS[0], eos)) <= len(PROMPTS[0]) + 5


def _init_params(config: ModelConfig, seed: int):
  """Random weights drawn in numpy: compiling Flax's truncated-normal init takes far longer."""
  shapes = jax.eval_shape(lambda: Llama3(config).init(jax.random.key(0), jnp.zeros((1, 4), int)))
  rng = np.random.default_rng(seed)
  draw = lambda path, s: (
    1.0 + 0.2 * rng.standard_normal(s.shape)
    if "scale" in jax.tree_util.keystr(path)
    else 0.2 * rng.standard_normal(s.shape)
  ).astype(np.float32)
  return jax.tree_util.tree_map_with_path(draw, nn.unbox(shapes)["params"])


@pytest.fixture(scope="module")
def tiny_params():
  return _init_params(TINY, 2)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_cache_logits_equal_full_forward(scan_layers):
  config = TINY.replace(scan_layers=scan_layers)
  params = _init_params(config, 1)
  t, steps = 5, 6
  lengths_B = np.array([5, 1, 3])
  seqs_BxL = np.random.default_rng(0).integers(0, V, (3, t + steps))
  cfg = config.replace(max_seq_len=t + steps)
  # Prefill the right-padded prompts through the cache path, keeping logits at every slot.
  slots_BxT = np.broadcast_to(np.arange(t), (3, t))
  segment_ids_BxT = (slots_BxT < lengths_B[:, None]).astype(np.int32)
  prefill = jax.jit(
    lambda cache, tokens: Llama3(cfg).apply(
      {"params": params, "cache": cache},
      tokens,
      slots_BxT,
      segment_ids_BxT,
      decode=True,
      mutable=["cache"],
    )
  )
  prefill_BxTxV, variables = prefill(
    init_cache(cfg, 3), np.where(segment_ids_BxT, seqs_BxL[:, :t], 0)
  )
  # Then feed each sequence's own next tokens one at a time (teacher forcing).
  step = jax.jit(decode_step, static_argnums=0)
  cache, steps_BxV = variables["cache"], []
  for j in range(steps):
    tok_B = seqs_BxL[np.arange(3), lengths_B + j]
    logits_BxV, cache = step(cfg, params, cache, tok_B, lengths_B + j)
    steps_BxV.append(np.asarray(logits_BxV))
  # Causality makes the logits of a sequence's prefix independent of what follows it.
  full_BxLxV = np.asarray(jax.jit(Llama3(config).apply)({"params": params}, seqs_BxL))
  assert np.abs(full_BxLxV).max() > 0.5
  for b, n in enumerate(lengths_B):
    cached_LxV = np.concatenate([np.asarray(prefill_BxTxV[b, :n]), np.stack(steps_BxV)[:, b]])
    np.testing.assert_allclose(cached_LxV, full_BxLxV[b, : n + steps], atol=1e-5, rtol=1e-5)


def test_sampling_reproducible_and_top_k_1_is_greedy(tiny_params):
  sample = lambda key, **kw: np.asarray(
    generate(TINY, tiny_params, PROMPTS, max_new_tokens=N, temperature=1.0, rng=key, **kw)
  )
  a, b, c = sample(jax.random.key(7)), sample(jax.random.key(7)), sample(jax.random.key(8))
  np.testing.assert_array_equal(a, b)
  assert (a != c).sum() > N, "a different key should give a different sample"
  greedy = np.asarray(generate(TINY, tiny_params, PROMPTS, max_new_tokens=N))
  assert (a != greedy).sum() > N, "temperature 1 should not be greedy"
  np.testing.assert_array_equal(sample(jax.random.key(7), top_k=1), greedy)
  # A nucleus smaller than the top token's mass leaves only the top token.
  np.testing.assert_array_equal(sample(jax.random.key(7), top_p=1e-6), greedy)


def _filter_reference(logits_BxV: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
  """Top-k then top-p by sorting, as transformers' logits warpers do."""
  out_BxV = np.full_like(logits_BxV, -np.inf)
  for row, out in zip(logits_BxV, out_BxV):
    s = np.sort(row)[::-1].copy()
    if top_k > 0:
      s[top_k:] = -np.inf
    p = np.exp(s - s[0]) / np.exp(s - s[0]).sum()
    kept = (np.cumsum(p) - p < top_p) & np.isfinite(s)
    out[:] = np.where(row >= s[kept.sum() - 1], row, -np.inf)
  return out_BxV


@pytest.mark.parametrize("top_k, top_p", [(7, 1.0), (0, 0.9), (50, 0.5), (1, 1.0), (0, 1e-6)])
def test_filters_equal_sort_based_reference(top_k, top_p):
  logits_BxV = np.random.default_rng(top_k).normal(0, 3, (32, 500)).astype(np.float32)
  logits_BxV[0, :3] = -np.inf  # Masked tokens (another filter) stay out.
  got = jax.jit(filter_logits)(logits_BxV, top_k=top_k, top_p=top_p)
  np.testing.assert_array_equal(np.asarray(got), _filter_reference(logits_BxV, top_k, top_p))


def test_sampling_follows_the_filtered_distribution():
  probs_V = np.array([0.05, 0.4, 0.3, 0.15, 0.1])
  logits_BxV = jnp.broadcast_to(jnp.log(jnp.asarray(probs_V)), (4000, 5))
  sample = jax.jit(sample_logits)
  draw = lambda **kw: np.asarray(
    sample(logits_BxV, jax.random.key(0), **{"temperature": 1.0, "top_k": 0, "top_p": 1.0, **kw})
  )
  # top_p=0.75: tokens 1 and 2 hold 0.7 < 0.75, so token 3 is also needed; 4 and 0 never appear.
  assert set(draw(top_p=0.75).tolist()) == {1, 2, 3}
  assert set(draw(top_k=2).tolist()) == {1, 2}
  np.testing.assert_allclose(np.bincount(draw(), minlength=5) / 4000, probs_V, atol=0.03)
  # Temperature 0.5 squares the probabilities (then renormalizes).
  sharp = np.bincount(draw(temperature=0.5), minlength=5) / 4000
  np.testing.assert_allclose(sharp, probs_V**2 / (probs_V**2).sum(), atol=0.03)
  # A vanishing temperature is greedy; it must not overflow the logits to +inf, where they tie.
  assert set(draw(temperature=1e-40).tolist()) == {1}


def test_generate_on_a_mesh_matches_single_device(tiny_params, monkeypatch):
  from jax.sharding import Mesh

  import model.generate as gen

  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
  boxed = jax.eval_shape(lambda: Llama3(TINY).init(jax.random.key(2), jnp.zeros((1, 4), int)))
  kw = dict(max_new_tokens=N, temperature=0.7, rng=jax.random.key(3))
  plain = generate(TINY, tiny_params, PROMPTS, **kw)  # Unrolled layers on CPU.
  # On the mesh keep the scanned layers (as on accelerators), so the stacked cache is constrained.
  monkeypatch.setattr(gen, "_unroll_layers", lambda config: False)
  with jax.set_mesh(mesh), nn.logical_axis_rules(SHARDING_RULES):
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh)["params"]
    on_mesh = generate(TINY, jax.device_put(tiny_params, shardings), PROMPTS, **kw)
  assert on_mesh.sharding.mesh.shape == mesh.shape
  np.testing.assert_array_equal(np.asarray(on_mesh), np.asarray(plain))


def test_cli_on_an_hf_checkpoint(tmp_path):
  from data.tokenizers import train_bpe
  from model.generate import sample_text
  from model.hf import save_hf
  from trainer.generate import generate_text, hf_stop_ids

  text = "def add(a, b):\n  return a + b\n" * 20
  tokenizer = train_bpe([text], 300, str(tmp_path / "tokenizer.json"))
  config = TINY.replace(vocab_size=tokenizer.vocab_size)
  params = _init_params(config, 3)
  save_hf(config, params, str(tmp_path))
  kw = dict(max_new_tokens=9, temperature=0.8, top_k=50, seed=4)
  printed = generate_text("def add", hf_checkpoint=str(tmp_path), **kw)
  assert printed == sample_text(config, params, tokenizer, "def add", **kw)
  assert printed.startswith("def add") and len(printed) > len("def add")
  # Special-token text in a prompt is that token (as transformers reads it), not its characters.
  chat_ids = [*tokenizer.encode("def add", bos=True), tokenizer.pad_id]
  greedy = np.asarray(
    generate(config, params, [chat_ids], max_new_tokens=4, eos_id=tokenizer.eos_id, pad_id=0)
  )[0, len(chat_ids) :].tolist()
  greedy = greedy[: greedy.index(tokenizer.eos_id)] if tokenizer.eos_id in greedy else greedy
  chat = generate_text("def add<|pad|>", hf_checkpoint=str(tmp_path), max_new_tokens=4)
  assert chat == tokenizer.decode(chat_ids + greedy)
  # An instruct model lists several EOS ids; generation ends at the first of any of them.
  prompt_ids = tokenizer.encode("def add", bos=True)
  new_ids = np.asarray(
    generate(
      config,
      params,
      [prompt_ids],
      max_new_tokens=9,
      temperature=0.8,
      top_k=50,
      eos_id=tokenizer.eos_id,
      pad_id=tokenizer.eos_id,
      rng=jax.random.key(4),
    )
  )[0, len(prompt_ids) :].tolist()
  stop = new_ids[2]
  assert stop != tokenizer.eos_id
  (tmp_path / "generation_config.json").write_text(
    json.dumps({"eos_token_id": [tokenizer.eos_id, stop]})
  )
  assert hf_stop_ids(str(tmp_path)) == (tokenizer.eos_id, stop)
  stopped = generate_text("def add", hf_checkpoint=str(tmp_path), **kw)
  assert stopped == tokenizer.decode(prompt_ids + new_ids[: new_ids.index(stop)])
  assert len(stopped) < len(printed)
  (tmp_path / "generation_config.json").unlink()
  assert hf_stop_ids(str(tmp_path)) == ()  # save_hf wrote no eos_token_id.
  hf_config = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({**hf_config, "eos_token_id": stop}))
  assert hf_stop_ids(str(tmp_path)) == (stop,)  # config.json's, when no generation_config.json.
  with pytest.raises(ValueError, match="exactly one"):
    generate_text("x")
  with pytest.raises(FileNotFoundError, match="elsewhere is not a directory; .*nothing is downl"):
    generate_text("x", hf_checkpoint=str(tmp_path / "elsewhere"))
  (tmp_path / "no_tokenizer").mkdir()
  with pytest.raises(FileNotFoundError, match="copy the model's tokenizer there"):
    generate_text("x", hf_checkpoint=str(tmp_path / "no_tokenizer"))
  with pytest.raises(ValueError, match=r"Need temperature >= 0.*got nan"):
    generate_text("x", hf_checkpoint=str(tmp_path / "elsewhere"), temperature=float("nan"))
  with pytest.raises(ValueError, match="The prompt is .* tokens .* max_seq_len is 64; shorten"):
    generate_text("def add " * 40, hf_checkpoint=str(tmp_path))
  # A model whose vocabulary is smaller than the tokenizer's: garbage, unless refused.
  small = tmp_path / "small"
  save_hf(TINY.replace(vocab_size=128), _init_params(TINY.replace(vocab_size=128), 3), str(small))
  (small / "tokenizer.json").write_bytes((tmp_path / "tokenizer.json").read_bytes())
  with pytest.raises(ValueError, match=r"tokenizer has \d+ ids but the model's vocab_size is 128"):
    generate_text("x", hf_checkpoint=str(small))
  with pytest.raises(ValueError, match=r"Prompt token ids span 5..200, outside the model's"):
    generate(TINY.replace(vocab_size=128), params, [[5, 200]], max_new_tokens=2)
