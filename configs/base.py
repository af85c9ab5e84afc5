"""Keys every stage shares, each with its default and what it means.

Stage configs (`configs/pretrain.py`, ...) start from `base_config()` and change values; they do not
invent shared keys of their own. Any key can be overridden from the command line, e.g.
`--config.optimizer.learning_rate=3e-4`; an unknown key or a value of the wrong type is an error
that names the key (ml_collections' `config_flags`, and `lock()` for configs built in code).
"""
import ml_collections

# Logical axis name -> mesh axes. Parameters and activations carry logical names (models/llama.py);
# this table alone decides how they are laid out (MaxText's idea, kept small). Weights are sharded
# over `fsdp` on their model dimension and over `tensor` on heads / ffn / vocab; activations are
# sharded over the batch on `data` x `fsdp` and over heads / ffn / vocab on `tensor`.
DEFAULT_SHARDING_RULES = (
    ('batch', ('data', 'fsdp')),
    ('embed', 'fsdp'),
    ('q_heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('mlp', 'tensor'),
    ('vocab', 'tensor'),
    ('norm', None),
    ('act_batch', ('data', 'fsdp')),
    ('act_length', None),
    ('act_embed', None),
    ('act_heads', 'tensor'),
    ('act_mlp', 'tensor'),
    ('act_vocab', 'tensor'),
)


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # Seeds parameter init, data order and sampling.
  c.init_from = ''  # Another workdir to start from (its final params and tokenizer); '' = scratch.

  c.model = ml_collections.ConfigDict()
  c.model.preset = 'tiny'  # Architecture preset from models/presets.py.
  # Architecture overrides; None keeps the preset's value. vocab_size=None takes the tokenizer's.
  c.model.vocab_size = None
  c.model.d_model = None
  c.model.n_layers = None
  c.model.n_heads = None
  c.model.n_kv_heads = None
  c.model.d_ff = None
  c.model.rope_theta = None
  c.model.max_seq_len = None
  c.model.tie_embeddings = None
  # Compute dtype of matmuls and attention: 'auto' = bfloat16 on GPU/TPU and for training on a
  # CPU, float32 for inference on a CPU (measured: models.presets.resolve_dtype); or 'float32'
  # (exact tests) / 'bfloat16'.
  c.model.dtype = 'auto'
  c.model.param_dtype = 'float32'  # Master weights and optimizer state.
  c.model.remat = 'none'  # Rematerialise each block: 'none', 'full' or 'dots' (save matmul outputs).
  c.model.attention = 'auto'  # 'auto' (cuDNN on GPU, XLA elsewhere), 'xla' or 'cudnn'.

  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.vocab_size = 8000  # BPE vocabulary trained on the corpus when no tokenizer is given.
  c.tokenizer.path = ''  # An existing sentencepiece .model to use instead of training one.
  c.tokenizer.train_chars = 20_000_000  # At most this many characters are used to train it.

  c.data = ml_collections.ConfigDict()
  c.data.source = 'shakespeare'  # Built-in name (shakespeare, kjv, python_stdlib) or .txt/.jsonl path.
  c.data.text_key = 'text'  # Field holding the text in JSONL files.
  c.data.max_chars = 0  # Read at most this many characters of the source (0 = all).
  c.data.seq_len = 256  # Tokens per packed training row.
  c.data.eval_fraction = 0.02  # Fraction of documents held out for the eval loss.
  c.data.worker_count = 0  # grain worker processes (0 = read in the main process).

  c.train = ml_collections.ConfigDict()
  c.train.steps = 1000  # Optimizer steps.
  c.train.batch_size = 8  # Global batch (rows of data.seq_len tokens) per optimizer step.
  c.train.grad_accum = 1  # Micro-batches per step; batch_size must divide by it.
  c.train.log_every = 10  # Steps between metrics.jsonl / TensorBoard records.
  c.train.checkpoint_every = 200  # Steps between checkpoints (the final step is always saved).
  c.train.eval_every = 200  # Steps between held-out evals (0 = only at the end).
  c.train.eval_batches = 8  # Batches in each held-out eval.
  c.train.keep_checkpoints = 3  # Newest checkpoints kept on disk.
  c.train.stop_after = 0  # Stop (with a checkpoint) after this step without finishing; 0 = never.

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 3e-4  # Peak learning rate of AdamW.
  c.optimizer.warmup_steps = 100  # Linear warmup from 0 to the peak.
  # After warmup: 'cosine' or 'linear' decay to peak * min_lr_ratio at train.steps, or 'wsd'
  # (warmup-stable-decay): the peak until the last decay_fraction of the steps, then decay_shape.
  c.optimizer.schedule = 'cosine'
  c.optimizer.decay_fraction = 0.2  # wsd: the share of train.steps spent decaying.
  c.optimizer.decay_shape = '1-sqrt'  # wsd: 'linear' or '1-sqrt' (Hägele et al., 2024).
  c.optimizer.min_lr_ratio = 0.1  # The decay ends at peak * this at train.steps.
  c.optimizer.weight_decay = 0.1  # Decoupled weight decay, on matrices only (not norms).
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.eps = 1e-8
  c.optimizer.grad_clip = 1.0  # Global-norm clipping (0 = off).

  c.mesh = ml_collections.ConfigDict()
  # Devices per mesh axis; one may be -1 (all remaining devices).
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.sharding_rules = DEFAULT_SHARDING_RULES  # See the table above.
  return c


def rl_schedule(c: ml_collections.ConfigDict, p: dict):
  """The run keys the RL stages (GRPO, PPO) set alike from their preset p."""
  c.train.steps = p['steps']  # RL steps (rollout batches).
  c.train.batch_size = p['batch']  # Completions per step: prompts x num_generations.
  c.train.log_every = 1
  c.train.checkpoint_every = 20
  c.train.eval_every = p['eval_every']
  c.optimizer.learning_rate = p['lr']
  c.optimizer.warmup_steps = p['warmup']  # In optimizer updates.
  c.optimizer.weight_decay = 0.0
  c.optimizer.min_lr_ratio = 1.0  # Constant after warmup, as RL fine-tuning usually runs.


def rl_config() -> ml_collections.ConfigDict:
  """Keys of the RL machinery (trainers/rl.py) that the policy-gradient stages share (GRPO, PPO):
  the stage's config holds them as `config.rl`."""
  r = ml_collections.ConfigDict()
  # Generation (serving/offline.py over the serving engine, built once per run).
  r.max_prompt_tokens = 0  # Longest prompt accepted; 0 = the longest prompt of the source.
  r.max_completion_tokens = 64  # Tokens generated per completion; longer ones are cut (truncated).
  r.temperature = 1.0  # Rollout sampling temperature (log-probs are always the untempered model's).
  r.top_k = 0  # Sample among the k likeliest tokens (0 = all).
  r.top_p = 1.0  # Nucleus sampling mass (1 = all).
  r.max_slots = 64  # Decode slots of the engine (sequences generated at once).
  # Compute dtype of the rollout engine (same weights as the trainer): 'auto' = float32 on a CPU,
  # where it decodes 1.7x faster than bfloat16, else the model's dtype; or 'float32'/'bfloat16'.
  r.engine_dtype = 'auto'
  # Rewards (data/rewards.py): built-in names or 'module:function' paths, with their weights.
  r.rewards = ('accuracy', 'format')
  r.reward_weights = (1.0, 0.1)
  # A process reward: per completion, one reward per step (built-in 'arithmetic_steps', which
  # checks every line of a step-by-step sum, or a 'module:function' path returning lists of
  # (end character, reward)). '' = outcome rewards only. GRPO then gives each token the
  # normalised rewards of its step and the steps after it (DeepSeekMath's process supervision).
  r.process_reward = ''
  # Overlong completions: 'none'; 'mask' (truncated ones get no loss, DAPO's overlong filtering);
  # 'soft' (DAPO's soft punishment: a penalty rising from 0 to -1 over the last overlong_buffer
  # tokens before max_completion_tokens, added to the reward).
  r.overlong = 'none'
  r.overlong_buffer = 16
  # Optimisation over one rollout batch: updates_per_batch optimizer steps, each on one of
  # `minibatches` equal slices of the batch (in turn), the old-policy log-probs held fixed.
  r.updates_per_batch = 1  # Must be a multiple of minibatches; 1 and 1 = purely on-policy.
  r.minibatches = 1
  # Positions per chunk of the vocabulary projection when computing log-probs (0 = all at once):
  # the [rows, chunk, vocab] logits are the largest tensor instead of [rows, length, vocab].
  r.logprob_chunk = 32
  # Trainer-vs-engine mismatch: the engine's log-probs are compared with the trainer's every step;
  # 'token' or 'sequence' reweights the loss by the ratio pi_trainer / pi_engine (truncated
  # importance sampling), '' leaves it as is. is_mode: 'truncate' caps the weight at is_cap,
  # 'mask' drops tokens (or sequences) whose weight exceeds it.
  r.is_level = ''
  r.is_mode = 'truncate'
  r.is_cap = 2.0
  return r
