"""Every knob of a training run, with its default; presets import this and change what differs.

Usage: python -m trainer.train --config=configs/base.py --workdir=runs/base
"""

import ml_collections

# Logical axis -> mesh axes. The model names only logical axes; this one table decides how
# parameters and activations are laid out on the ('data', 'fsdp', 'tensor') mesh. 'batch' is the
# input batch's rows: the mesh axes they split over, and so the rows each host reads.
SHARDING_RULES = (
  ("batch", ("data", "fsdp")),
  ("activation_batch", ("data", "fsdp")),
  ("activation_length", None),
  ("activation_embed", None),
  ("activation_heads", "tensor"),
  ("activation_kv_heads", "tensor"),
  ("activation_mlp", "tensor"),
  ("activation_vocab", "tensor"),
  ("vocab", "tensor"),
  ("embed", "fsdp"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("mlp", "tensor"),
  ("head_dim", None),
  ("norm", None),
  ("layers", None),
)


def model_config() -> ml_collections.ConfigDict:
  """The Llama 3.1 8B shape; other presets override fields of it."""
  m = ml_collections.ConfigDict()
  m.vocab_size = 128256  # Token vocabulary (Llama 3 tiktoken: 128,256).
  m.embed_dim = 4096  # Residual stream width D.
  m.mlp_dim = 14336  # SwiGLU hidden width F.
  m.num_layers = 32  # Decoder blocks.
  m.num_heads = 32  # Query heads N.
  m.num_kv_heads = 8  # Key/value heads K (GQA); equal to num_heads for plain MHA.
  m.head_dim = 128  # Per-head width H.
  m.rope_theta = 500000.0  # RoPE base.
  # Llama 3.1 frequency scaling; None (or factor 1.0, settable on the command line) is plain RoPE.
  m.rope_scaling = ml_collections.ConfigDict(
    dict(
      factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
    )
  )
  m.norm_eps = 1e-5  # RMSNorm epsilon.
  m.tie_embeddings = False  # Share the token table with the output head (Llama 3.2 1B/3B).
  m.max_seq_len = 131072  # Longest sequence (the KV cache length when generating).
  m.dtype = "bfloat16"  # Activation / compute dtype; norms and softmax are fp32 regardless.
  m.param_dtype = "float32"  # Parameter (and optimizer state) dtype.
  m.scan_layers = True  # nn.scan over the blocks: one compiled body, fast compiles.
  m.remat = "full"  # Rematerialization: none | full | dots | dots_no_batch | offload.
  m.attention = "auto"  # auto | xla | cudnn | splash (auto: splash on TPU, cuDNN on GPU).
  return m


def get_config() -> ml_collections.ConfigDict:
  """The default run: Llama 3.1 8B shapes on synthetic data."""
  c = ml_collections.ConfigDict()
  c.steps = 1000  # Optimizer steps to train for.
  c.seed = 0  # Seeds parameters and the data order.
  c.global_batch_size = 256  # Sequences per optimizer step, summed over all hosts.
  c.seq_len = 2048  # Tokens per training sequence.
  c.grad_accum_steps = 1  # Microbatches per step; each is global_batch_size / this.
  # Unroll the microbatch loop, so XLA can overlap one microbatch's backward pass with the next
  # one's forward (6-8% faster on the CPU bench config); as a loop (False), only one
  # microbatch's activations are live at a time, which large models need.
  c.grad_accum_unroll = False
  c.log_every = 10  # Steps between train metric lines.
  c.eval_every = 200  # Steps between evaluations (0: never).
  c.eval_steps = 10  # Batches per evaluation.
  c.checkpoint_every = 200  # Steps between checkpoints (and one at the end).
  c.max_to_keep = 3  # Newest checkpoints kept (0: all).
  c.keep_period = 0  # Also keep every checkpoint whose step is a multiple of this (0: none).
  c.init_from = ""  # Start from another run's checkpoint dir or an HF model dir (fresh optimizer).
  c.watchdog_timeout_s = 1800.0  # A step (or eval) slower than this dumps stacks, exits (0: off).
  c.sample_every = 0  # Steps between text samples written to TensorBoard (0: never).
  c.sample_prompt = "The"  # Prompt for those samples.
  c.sample_max_new_tokens = 32  # Tokens generated per sample.
  c.profile_start_step = 5  # First step of the jax.profiler trace.
  c.profile_steps = 0  # Steps traced into WORKDIR/plugins/profile (0: no trace).
  c.z_loss = 0.0  # Weight of the log(Z)^2 auxiliary loss (PaLM); 0 disables it.
  c.loss_chunk_size = 512  # Tokens per chunk of the cross-entropy, so full logits never exist.

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 3e-4  # Peak learning rate.
  c.optimizer.warmup_steps = 100  # Linear warmup from 0.
  c.optimizer.decay_steps = -1  # Cosine decay length including warmup (-1: `steps`).
  c.optimizer.end_lr_ratio = 0.1  # Final learning rate as a fraction of the peak.
  c.optimizer.b1 = 0.9  # Adam beta1.
  c.optimizer.b2 = 0.95  # Adam beta2.
  c.optimizer.eps = 1e-8  # Adam epsilon.
  c.optimizer.weight_decay = 0.1  # Decoupled weight decay (norm scales are never decayed).
  c.optimizer.grad_clip = 1.0  # Global-norm gradient clipping (0: off).

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # Data-parallel size within a slice (-1: the devices left over).
  c.mesh.fsdp = 1  # Fully-sharded data-parallel size within a slice.
  c.mesh.tensor = 1  # Tensor-parallel size within a slice.
  c.mesh.num_slices = 1  # TPU slices joined over DCN (multi-slice).
  c.mesh.dcn_data = -1  # Data-parallel size across slices (-1: num_slices).
  c.mesh.dcn_fsdp = 1  # FSDP size across slices.
  c.mesh.dcn_tensor = 1  # Tensor-parallel size across slices.
  c.sharding_rules = SHARDING_RULES  # Logical axis -> mesh axes table (see above).

  c.data = ml_collections.ConfigDict()
  c.data.source = "synthetic"  # synthetic | prepared | stdlib | tfds | hf | text.
  c.data.path = ""  # Prepared dir, TFDS name (c4/en:train), HF name, or text glob.
  c.data.eval_path = ""  # Held-out data ('' : the prepared dir's eval split / next split).
  c.data.tokenizer = "byte"  # byte | path to tokenizer.json | path to tiktoken tokenizer.model.
  c.data.text_field = "text"  # Field holding the text (JSONL, TFDS, HF, Parquet).
  c.data.data_dir = ""  # TFDS data_dir (may be gs://...).
  c.data.cache_dir = ""  # Where on-the-fly preparation goes ('' : ~/.cache/llama3_jax).
  c.data.allow_new_data = False  # Resume even if the data fingerprint changed.
  # grain worker processes per host (0: read in the main process; data.source=text always is).
  c.data.num_workers = 0
  c.data.prefetch = 2  # Batches prefetched per host.

  c.model = model_config()
  return c
