"""The machinery the policy-gradient RL stages share (trainers/grpo.py now, PPO next).

One RL step, whichever algorithm:
  1. draw prompts in a seeded order a checkpoint resumes (`PromptOrder`), and generate G
     completions of each through the serving engine with the policy's current parameters
     (`Rollouts`: the engine is built once per run and never recompiles, the G samples of a
     prompt share one prefill, LoRA adapters are merged into the weights it runs);
  2. score them (data/rewards.py); the algorithm may reject groups and ask for more prompts
     (DAPO's dynamic sampling) up to a cap;
  3. lay the completions out as training rows and compute, with the trainer's own forward pass,
     the old-policy log-probs (the parameters that generated them) and the frozen reference's, in
     chunks so that the [B, T, V] logits never exist (models/losses.token_logprobs);
  4. compare the old log-probs with the engine's (`mismatch_stats`) and optionally correct the
     loss by truncated importance sampling (`importance_weights`);
  5. the algorithm turns rewards into advantages, and `updates_per_batch` optimizer steps run over
     minibatches of the rows with its loss, the old log-probs held fixed (trainers/loop.py's
     shared step: gradient accumulation, clipping, the NaN guard).

Checkpoints hold the trainable parameters, the optimizer state and the prompt cursor; rollout
seeds derive from (seed, step), so a run killed and rerun logs the metrics of an uninterrupted
one. The reference is the init_from model: a frozen copy for full fine-tuning, and for LoRA the
same base with the adapters set to zero (no second copy of the weights).
"""
import dataclasses
import functools
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from data import chat, prompts as prompt_sources, rewards as reward_lib
from models import lora
from models.checkpoint import Checkpointer
from models.llama import abstract_model
from models.losses import token_logprobs
from serving import offline
from serving.engine import MIN_BUCKET, Engine, SamplingParams
from trainers import lora as adapters, loop
from trainers.metrics import MetricsWriter


class PromptOrder:
  """Which prompts come next: epoch e visits all n prompts in the seeded order permutation(seed,
  e). The cursor, the number of prompts drawn so far, is its whole state (kept in checkpoints)."""

  def __init__(self, n: int, seed: int, cursor: int = 0):
    if n < 1:
      raise ValueError('the prompt source is empty')
    self.n, self.seed, self.cursor = n, seed, cursor

  @functools.lru_cache(maxsize=2)
  def _order(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(self.n)

  def take(self, k: int) -> list[int]:
    out = [int(self._order(c // self.n)[c % self.n]) for c in range(self.cursor, self.cursor + k)]
    self.cursor += k
    return out


def rollout_seed(seed: int, step: int, draw: int) -> int:
  """The sampling seed of one generation round (offline.generate adds the sample's index)."""
  return int(np.random.SeedSequence([seed, step, draw]).generate_state(1)[0] >> 2)


class Policy:
  """The model being trained, as the RL loop needs it: its trainable parameters (all of them, or
  LoRA adapters), the weights the engine runs for them, and the frozen reference."""

  def __init__(self, model: nnx.Module, spec: lora.LoraSpec | None, *, chunk: int,
               engine_dtype: str = '', mesh=None):
    self.spec, self.chunk = spec, chunk
    self.trainable = nnx.Param if spec is None else nnx.LoRAParam
    self.graphdef, params, self.frozen = nnx.split(model, self.trainable, ...)
    if spec is None:
      # The optimizer step donates the policy's buffers: the reference is its own copy.
      self.reference = jax.tree.map(jnp.copy, params)
      engine_model = nnx.merge(self.graphdef, self.reference, self.frozen)
    else:
      # Adapters at zero give exactly the base: y = xW + s (xA) B with A = B = 0.
      self.reference = jax.tree.map(jnp.zeros_like, params)
      engine_model = lora.merge_lora(model, spec)
      graphdef, frozen = self.graphdef, self.frozen
      self._merge = jax.jit(lambda p: nnx.state(lora.merge_lora(nnx.merge(graphdef, p, frozen),
                                                                spec)))
    # The engine may compute in another dtype than the trainer (the same weights): on a CPU
    # float32 decodes 1.7x faster than bfloat16, while bfloat16 trains faster (bench/RESULTS.md).
    cfg = engine_model.cfg
    if engine_dtype and engine_dtype != cfg.dtype:
      graphdef, _, _ = abstract_model(dataclasses.replace(cfg, dtype=engine_dtype), mesh,
                                      model.rules)
      engine_model = nnx.merge(graphdef, nnx.state(engine_model))
    self.engine_model = engine_model
    self.initial_params = params
    graphdef, frozen = self.graphdef, self.frozen
    self._logprobs = jax.jit(lambda p, batch: token_logprobs(
        nnx.merge(graphdef, p, frozen), batch['inputs'], batch['targets'], batch['positions'],
        chunk=chunk))

  def engine_params(self, params):
    """What the engine runs for these trainable parameters: the same arrays, or for LoRA the
    base with the adapters merged in (one jitted computation, same shapes every step)."""
    return params if self.spec is None else self._merge(params)

  def logprobs(self, params, rows: dict, *, batch_size: int, mesh, rules) -> tuple[np.ndarray, ...]:
    """(log-probs, entropies) [N, L] of rows under `params`, batch_size rows per call."""
    n = len(rows['inputs'])
    outs = []
    with jax.set_mesh(mesh):
      for start in range(0, n, batch_size):
        batch = global_batch({k: rows[k][start:start + batch_size]
                              for k in ('inputs', 'targets', 'positions')}, mesh, rules)
        outs.append(jax.device_get(self._logprobs(params, batch)))
    return tuple(np.concatenate([o[i] for o in outs]) for i in range(2))


def global_batch(rows: dict, mesh, rules) -> dict:
  """Host arrays that every process holds whole -> arrays laid out over the batch axes."""
  sharding = loop.batch_sharding(mesh, rules)
  return {k: jax.make_array_from_callback(v.shape, sharding, lambda i, v=v: v[i])
          for k, v in rows.items()}


@dataclasses.dataclass
class Group:
  """The G completions of one prompt and their rewards."""
  prompt_index: int
  completions: list  # offline.Completion
  texts: list[str]
  rewards: np.ndarray  # [G] total reward
  parts: dict  # reward name -> [G]
  accuracy: np.ndarray  # [G] answers_match (nan when the prompt has no answer)
  formatted: np.ndarray  # [G] format_reward
  # With rl.process_reward: per completion, its steps as (end character, reward) and the
  # character where each of its tokens starts (to give every token its step's credit).
  steps: list | None = None
  token_starts: list | None = None


class Rollouts:
  """Generation and scoring: the engine, the prompts it takes, the reward functions."""

  def __init__(self, config: ml_collections.ConfigDict, policy: Policy, tokenizer,
               train: list[dict], held_out: list[dict], *, group_size: int, mesh, rules):
    r = config.rl
    self.config, self.tokenizer, self.group_size = config, tokenizer, group_size
    self.train, self.held_out = train, held_out
    # Rule rewards (may be none when a scorer, such as PPO's reward model, gives the reward).
    self.rewards = reward_lib.Rewards(r.rewards, r.reward_weights) if r.rewards else None
    # scorer(prompt token lists, completion token lists, length=row_length) -> [N] scores added
    # to the rule rewards as the part 'score'; set by the stage (trainers/ppo.py's reward model).
    self.scorer = None
    self.process_reward = (reward_lib.resolve(r.process_reward, reward_lib.PROCESS_BUILTIN)
                           if r.process_reward else None)
    self.train_tokens = [prompt_sources.encode_prompt(tokenizer, e['prompt']) for e in train]
    self.eval_tokens = [prompt_sources.encode_prompt(tokenizer, e['prompt']) for e in held_out]
    chat_prompts = any(not isinstance(e['prompt'], str) for e in train + held_out)
    self.eos_id = chat.end_of_turn_id(tokenizer) if chat_prompts else tokenizer.eos_id
    self.max_prompt = prompt_limit(config, self.train_tokens + self.eval_tokens, train + held_out)
    bucket = max(MIN_BUCKET, 1 << max(self.max_prompt - 1, 0).bit_length())
    model_cfg = policy.engine_model.cfg
    batch_axis = mesh.shape['data'] * mesh.shape['fsdp']  # Slots are laid out over it.
    slots = -(-min(config.train.batch_size, r.max_slots) // batch_axis) * batch_axis
    self.engine = Engine(policy.engine_model, max_concurrent_decodes=slots,
                         max_len=min(bucket + r.max_completion_tokens, model_cfg.max_seq_len),
                         max_prefill_length=bucket, mesh=mesh, rules=rules)
    self.sampling = dict(temperature=r.temperature, top_k=r.top_k, top_p=r.top_p)

  @property
  def row_length(self) -> int:
    return self.max_prompt + self.config.rl.max_completion_tokens

  def generate(self, engine_params, prompt_indices: list[int], *, n: int, seed: int,
               held_out: bool = False, greedy: bool = False) -> list[Group]:
    examples = self.held_out if held_out else self.train
    tokens = self.eval_tokens if held_out else self.train_tokens
    sampling = SamplingParams(seed=seed, **({} if greedy else self.sampling))
    outs = offline.generate(self.engine, [tokens[i] for i in prompt_indices], params=engine_params,
                            n=n, max_tokens=self.config.rl.max_completion_tokens,
                            sampling=sampling, eos_id=self.eos_id)
    texts = [self.tokenizer.decode([t for t in o.tokens if t != self.eos_id]) for o in outs]
    truncated = [o.finish_reason == 'length' for o in outs]
    prompts = [examples[i]['prompt'] for i in prompt_indices for _ in range(n)]
    answers = [examples[i]['answer'] for i in prompt_indices for _ in range(n)]
    if self.rewards is not None:
      total, parts = self.rewards(prompts, texts, answer=answers, truncated=truncated,
                                  completion_ids=[o.tokens for o in outs])
    else:
      total, parts = np.zeros(len(outs), np.float32), {}
    if self.scorer is not None:
      scores = np.asarray(self.scorer([tokens[i] for i in prompt_indices for _ in range(n)],
                                      [o.tokens for o in outs], length=self.row_length),
                          np.float32)
      total, parts = total + scores, {**parts, 'score': scores}
    elif self.rewards is None:
      raise ValueError('rl.rewards is empty and the stage gives no reward model: nothing scores '
                       'the completions')
    correct = np.array([np.nan if a is None else reward_lib.answers_match(
        reward_lib.extract_answer(t), a) for t, a in zip(texts, answers)], np.float32)
    formatted = np.asarray(reward_lib.format_reward(prompts, texts, truncated=truncated),
                           np.float32)
    steps = starts = None
    if self.process_reward is not None:
      steps = list(self.process_reward(prompts, texts, answer=answers, truncated=truncated,
                                       completion_ids=[o.tokens for o in outs]))
      if len(steps) != len(texts):
        raise ValueError(f'rl.process_reward={self.config.rl.process_reward!r} returned '
                         f'{len(steps)} step lists for {len(texts)} completions')
      starts = [self._token_starts(o.tokens) for o in outs]
    groups = []
    for g, i in enumerate(prompt_indices):
      sl = slice(g * n, (g + 1) * n)
      groups.append(Group(i, outs[sl], texts[sl], total[sl], {k: v[sl] for k, v in parts.items()},
                          correct[sl], formatted[sl], steps and steps[sl], starts and starts[sl]))
    return groups

  def _token_starts(self, tokens: list[int]) -> list[int]:
    """The character of the decoded completion where each token starts (the end-of-turn token
    starts at the end)."""
    ids = [t for t in tokens if t != self.eos_id]  # only the last token can be end-of-turn
    starts = [len(self.tokenizer.decode(ids[:k])) for k in range(len(tokens))]
    return np.maximum.accumulate(starts).tolist() if starts else []

  def rows(self, groups: list[Group]) -> dict[str, np.ndarray]:
    """Training rows of the groups' completions, in order: prompt + completion, right-padded to
    row_length. `mask` marks the targets that are completion tokens; `engine_logp` holds the
    engine's log-prob of each of them."""
    n, length = sum(len(g.completions) for g in groups), self.row_length
    rows = {'inputs': np.zeros((n, length), np.int32), 'targets': np.zeros((n, length), np.int32),
            'positions': np.broadcast_to(np.arange(length, dtype=np.int32), (n, length)).copy(),
            'mask': np.zeros((n, length), np.float32),
            'engine_logp': np.zeros((n, length), np.float32)}
    r = 0
    for g in groups:
      prompt = self.train_tokens[g.prompt_index]
      for c in g.completions:
        seq = prompt + c.tokens
        rows['inputs'][r, :len(seq) - 1] = seq[:-1]
        rows['targets'][r, :len(seq) - 1] = seq[1:]
        span = slice(len(prompt) - 1, len(seq) - 1)  # targets that are completion tokens
        rows['mask'][r, span] = 1.0
        rows['engine_logp'][r, span] = c.logprobs
        r += 1
    return rows


def setup(config, base, spec, tokenizer, train: list[dict], held_out: list[dict], *,
          group_size: int, model_cfg, mesh) -> tuple['Policy', 'Rollouts']:
  """The policy (adapters applied to `base` when spec is given) and its rollouts, with the
  settings checked against the prompts and the model before anything is written."""
  if spec is not None:
    base = adapters.adapt(base, spec, seed=config.seed, mesh=mesh)
  policy = Policy(base, spec, chunk=config.rl.logprob_chunk,
                  engine_dtype=engine_dtype(config, model_cfg), mesh=mesh)
  rollouts = Rollouts(config, policy, tokenizer, train, held_out, group_size=group_size,
                      mesh=mesh, rules=config.sharding_rules)
  check_config(config, model_cfg, max_prompt=rollouts.max_prompt)
  return policy, rollouts


def engine_dtype(config, model_cfg) -> str:
  """rl.engine_dtype, with 'auto' = float32 on a CPU and the model's compute dtype elsewhere."""
  d = config.rl.engine_dtype
  if d == 'auto':
    return 'float32' if jax.default_backend() == 'cpu' else model_cfg.dtype
  if d not in ('float32', 'bfloat16'):
    raise ValueError(f"rl.engine_dtype={d!r}: expected 'auto', 'float32' or 'bfloat16'")
  return d


def prompts_per_step(config, group_size: int) -> int:
  if config.train.batch_size % group_size:
    raise ValueError(f'train.batch_size={config.train.batch_size} (completions per step) must be '
                     f'a multiple of the group size {group_size}')
  return config.train.batch_size // group_size


def prompt_limit(config, prompt_tokens: list[list[int]], examples: list[dict]) -> int:
  """rl.max_prompt_tokens, or the longest prompt; every prompt and the model limit checked."""
  r = config.rl
  longest = max(len(t) for t in prompt_tokens)
  limit = r.max_prompt_tokens or longest
  for tokens, e in zip(prompt_tokens, examples):
    if len(tokens) > limit:
      raise ValueError(f'a prompt has {len(tokens)} tokens, more than rl.max_prompt_tokens='
                       f'{limit}: {str(e["prompt"])[:120]!r}')
  return limit


def check_config(config, model_cfg, *, max_prompt: int):
  r = config.rl
  if r.max_completion_tokens < 1:
    raise ValueError(f'rl.max_completion_tokens={r.max_completion_tokens} must be >= 1')
  if max_prompt + r.max_completion_tokens > model_cfg.max_seq_len:
    raise ValueError(f'prompts of up to {max_prompt} tokens + rl.max_completion_tokens='
                     f'{r.max_completion_tokens} exceed the model max_seq_len='
                     f'{model_cfg.max_seq_len}')
  if r.updates_per_batch < 1 or r.minibatches < 1 or r.updates_per_batch % r.minibatches:
    raise ValueError(f'rl.updates_per_batch={r.updates_per_batch} must be a positive multiple of '
                     f'rl.minibatches={r.minibatches}')
  minibatch = config.train.batch_size // r.minibatches
  if config.train.batch_size % r.minibatches or minibatch % config.train.grad_accum:
    raise ValueError(f'train.batch_size={config.train.batch_size} must split into '
                     f'rl.minibatches={r.minibatches} minibatches of a multiple of '
                     f'train.grad_accum={config.train.grad_accum} rows')
  if r.overlong not in ('none', 'mask', 'soft'):
    raise ValueError(f"rl.overlong={r.overlong!r}: expected 'none', 'mask' or 'soft'")
  if r.is_level not in ('', 'token', 'sequence') or r.is_mode not in ('truncate', 'mask'):
    raise ValueError(f"rl.is_level={r.is_level!r} / rl.is_mode={r.is_mode!r}: expected '', "
                     f"'token' or 'sequence' / 'truncate' or 'mask'")
  if r.is_cap <= 0:
    raise ValueError(f'rl.is_cap={r.is_cap} must be > 0')


def mismatch_stats(old_logp, engine_logp, mask) -> dict:
  """How far the trainer's log-probs of the sampled tokens are from the engine's (which
  generated them): per token |delta logp|, and per sequence the ratio exp(sum_t delta)."""
  delta = (old_logp - engine_logp) * mask
  tokens = np.maximum(mask.sum(), 1)
  seq_ratio = np.exp(delta.sum(-1))[mask.sum(-1) > 0]
  return {'mismatch_abs_mean': float(np.abs(delta).sum() / tokens),
          'mismatch_abs_max': float(np.abs(delta).max()),
          'mismatch_seq_ratio_mean': float(seq_ratio.mean()) if seq_ratio.size else 1.0,
          'mismatch_seq_ratio_max': float(seq_ratio.max()) if seq_ratio.size else 1.0,
          'mismatch_seq_ratio_min': float(seq_ratio.min()) if seq_ratio.size else 1.0}


def importance_weights(old_logp, engine_logp, mask, *, level: str, mode: str, cap: float):
  """Truncated importance sampling for the trainer/engine mismatch (Yao et al., 2025, "Your
  Efficient RL Framework Secretly Brings You Off-Policy RL Training"): the loss of each token is
  reweighted by w = pi_old(y) / pi_engine(y), per token, or per sequence as exp(sum_t log w_t)
  for every token of it; 'truncate' uses min(w, cap), 'mask' sets w = 0 where w > cap.
  Returns ([N, L] weights, fraction of weighted units capped or masked)."""
  if not level:
    return np.ones_like(mask), 0.0
  log_w = (old_logp - engine_logp) * mask
  if level == 'sequence':
    log_w = np.broadcast_to(log_w.sum(-1, keepdims=True), mask.shape)
  w = np.exp(np.minimum(log_w, 50.0))
  over = w > cap
  w = np.minimum(w, cap) if mode == 'truncate' else np.where(over, 0.0, w)
  units = mask.sum() if level == 'token' else max((mask.sum(-1) > 0).sum(), 1)
  capped = (over * mask).sum() if level == 'token' else (over[:, 0] & (mask.sum(-1) > 0)).sum()
  return (w * mask).astype(np.float32), float(capped / max(units, 1))


def k3_kl(logp, ref_logp):
  """Schulman's unbiased, always-positive estimator of KL(pi || pi_ref) per sampled token:
  k3 = exp(ref - logp) - (ref - logp) - 1."""
  d = ref_logp - logp
  return jnp.exp(d) - d - 1.0


@dataclasses.dataclass
class Algorithm:
  """What an RL algorithm file supplies to `train`."""
  name: str
  group_size: int  # Completions per prompt.
  loss_fn: loop.LossFn  # Over rows with the fields `train` builds and `advantages`.
  # (groups, rewards [P, G] with overlong shaping, batch) -> advantages: [P, G] (one per
  # completion), a list of one array per completion with one advantage per token (process
  # rewards), or a dict with 'advantages' [N, L], more batch fields for loss_fn and the critic,
  # and 'metrics'. batch holds the rows' mask, old_logp, ref_logp and, with a critic, values.
  advantages: Callable[[list, np.ndarray, dict], np.ndarray | list | dict]
  # Whether a group is kept (DAPO's dynamic sampling rejects groups with equal rewards); None =
  # keep all. max_draws caps the generation rounds of one step.
  keep_group: Callable[[np.ndarray], bool] | None = None
  max_draws: int = 1
  # A learned value function trained beside the policy (PPO's critic): values(rows, **kw) ->
  # [N, L]; update(minibatch, update_index) -> metrics (one optimizer step); items() -> the
  # pytrees to checkpoint by name; load(restored) puts them back.
  critic: object | None = None
  # JSON-able state that evolves over steps (PPO's adaptive KL coefficient): checkpointed in the
  # meta item and restored on resume, so a resumed run equals an uninterrupted one.
  state: dict = dataclasses.field(default_factory=dict)


def _collect(rollouts: Rollouts, algorithm: Algorithm, order: PromptOrder, engine_params, *,
             n_prompts: int, seed: int, step: int):
  """Generates until n_prompts groups are kept (or max_draws rounds ran). Groups that were
  rejected fill a short batch with zero loss weight. Returns (groups, weights [P], stats)."""
  kept, rejected, draws = [], [], 0
  while len(kept) < n_prompts and draws < max(algorithm.max_draws, 1):
    groups = rollouts.generate(engine_params, order.take(n_prompts), n=algorithm.group_size,
                               seed=rollout_seed(seed, step, draws))
    draws += 1
    for g in groups:
      keep = algorithm.keep_group is None or algorithm.keep_group(g.rewards)
      (kept if keep else rejected).append(g)
  kept = kept[:n_prompts]
  filled = len(kept)
  groups = kept + rejected[:n_prompts - filled]
  weights = np.array([1.0] * filled + [0.0] * (len(groups) - filled), np.float32)
  return groups, weights, {'draws': draws, 'groups_rejected': len(rejected),
                           'groups_kept_fraction': filled / n_prompts}


def _group_metrics(groups: list[Group]) -> dict:
  rewards = np.concatenate([g.rewards for g in groups])
  lengths = np.array([len(c.tokens) for g in groups for c in g.completions])
  accuracy = np.concatenate([g.accuracy for g in groups])
  out = {'reward_mean': float(rewards.mean()), 'reward_std': float(rewards.std()),
         'accuracy': float(np.nanmean(accuracy)) if np.isfinite(accuracy).any() else 0.0,
         'format_rate': float(np.concatenate([g.formatted for g in groups]).mean()),
         'completion_len': float(lengths.mean()), 'completion_len_max': int(lengths.max()),
         'truncation_rate': float(np.mean([c.finish_reason == 'length' for g in groups
                                           for c in g.completions]))}
  for name in groups[0].parts:
    out[f'reward_{name}'] = float(np.concatenate([g.parts[name] for g in groups]).mean())
  return out


def evaluate(rollouts: Rollouts, engine_params, num: int) -> dict:
  """Greedy completions of the first `num` held-out prompts: accuracy, format rate and reward."""
  if not rollouts.held_out or num <= 0:
    return {}
  groups = rollouts.generate(engine_params, list(range(min(num, len(rollouts.held_out)))), n=1,
                             seed=0, held_out=True, greedy=True)
  m = _group_metrics(groups)
  return {f'eval_{k}': m[k] for k in ('accuracy', 'format_rate', 'reward_mean', 'completion_len',
                                      'reward_score') if k in m}


def _shaped_rewards(config, groups: list[Group]) -> np.ndarray:
  rewards = np.stack([g.rewards for g in groups])  # [P, G]
  if config.rl.overlong == 'soft':
    lengths = np.array([[len(c.tokens) for c in g.completions] for g in groups])
    rewards = rewards + reward_lib.overlong_penalty(lengths, config.rl.max_completion_tokens,
                                                    config.rl.overlong_buffer)
  return rewards


def _advantage_rows(advantages, rows: dict) -> np.ndarray:
  """One advantage per completion ([P, G] -> [N]), or one per completion token (a list of N
  arrays, each as long as its completion) laid out like the rows' targets ([N, L])."""
  if not isinstance(advantages, list):
    return np.asarray(advantages, np.float32).reshape(-1)
  out = np.zeros(rows['mask'].shape, np.float32)
  for r, a in enumerate(advantages):
    first = int(np.argmax(rows['mask'][r] > 0))
    out[r, first:first + len(a)] = a
  return out


def optimizer_config(config):
  """The loop's optimizer counts optimizer updates: updates_per_batch per RL step."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.train.steps = config.train.steps * config.rl.updates_per_batch
  return c


def train(config: ml_collections.ConfigDict, workdir: str, policy: Policy, rollouts: Rollouts,
          algorithm: Algorithm, *, mesh, rules) -> loop.Result:
  """Runs config.train.steps RL steps (each: rollouts, then rl.updates_per_batch updates),
  resuming from the newest checkpoint in workdir."""
  t, r = config.train, config.rl
  if jax.process_count() > 1:
    raise NotImplementedError('RL stages run on one host for now (rollouts are generated by '
                              'every process); multi-host RL is not supported yet')
  n_prompts = prompts_per_step(config, algorithm.group_size)
  opt_config = optimizer_config(config)
  tx = loop.make_optimizer(opt_config)
  schedule = loop.learning_rate_schedule(opt_config)
  params = policy.initial_params
  opt_state = loop.init_optimizer_state(tx, params, mesh)
  ckpt = Checkpointer(f'{workdir}/checkpoints', keep=t.keep_checkpoints)
  critic = algorithm.critic
  critic_items = critic.items() if critic is not None else None
  start, restored = ckpt.restore_newest(
      lambda s: ckpt.restore(s, params, opt_state, extra=critic_items))
  start, cursor = start or 0, 0
  if start:
    params, opt_state = restored['params'], restored['opt_state']
    cursor = restored['meta']['prompt_cursor']
    algorithm.state.update(restored['meta'].get('algorithm', {}))
    if critic is not None:
      critic.load(restored)
    print(f'Resumed from {workdir}/checkpoints/{start}.')
  final = lambda: nnx.merge(policy.graphdef, params, policy.frozen)
  if start >= t.steps or (t.stop_after and start >= t.stop_after):
    ckpt.close()
    return loop.Result(final(), start, start >= t.steps, {})

  order = PromptOrder(len(rollouts.train), config.seed, cursor)
  with jax.set_mesh(mesh):
    train_step = jax.jit(loop.make_train_step(config, policy.graphdef, policy.frozen,
                                              algorithm.loss_fn, tx), donate_argnums=(0, 1))
  minibatch = t.batch_size // r.minibatches
  writer = MetricsWriter(workdir, start_step=start, total_steps=t.steps)
  last_metrics, step, stop_reason = {}, start, None
  if start == 0 and t.eval_every:  # The starting point, so every eval curve has its origin.
    first = evaluate(rollouts, policy.engine_params(params), config.eval.num_problems)
    if first:
      writer.write(0, first)
  try:
    with loop.Preemption() as preemption:
      while step < t.steps:
        t0 = time.perf_counter()
        engine_params = policy.engine_params(params)
        groups, group_weights, draw_stats = _collect(
            rollouts, algorithm, order, engine_params, n_prompts=n_prompts, seed=config.seed,
            step=step)
        t_gen = time.perf_counter() - t0

        rows = rollouts.rows(groups)
        logp_args = dict(batch_size=minibatch // t.grad_accum, mesh=mesh, rules=rules)
        old_logp, entropy = policy.logprobs(params, rows, **logp_args)
        ref_logp, _ = policy.logprobs(policy.reference, rows, **logp_args)
        values = critic.values(rows, **logp_args) if critic is not None else None
        t_logp = time.perf_counter() - t0 - t_gen

        mask = rows['mask'] * np.repeat(group_weights, algorithm.group_size)[:, None]
        if r.overlong == 'mask':
          truncated = np.array([c.finish_reason == 'length' for g in groups
                                for c in g.completions])
          mask = mask * ~truncated[:, None]
        is_weight, is_capped = importance_weights(old_logp, rows['engine_logp'], mask,
                                                  level=r.is_level, mode=r.is_mode, cap=r.is_cap)
        batch = {'inputs': rows['inputs'], 'targets': rows['targets'],
                 'positions': rows['positions'], 'mask': mask, 'old_logp': old_logp,
                 'ref_logp': ref_logp, 'is_weight': is_weight}
        if values is not None:
          batch['values'] = values
        advantages = algorithm.advantages(groups, _shaped_rewards(config, groups), batch)
        algorithm_metrics = {}
        if isinstance(advantages, dict):
          algorithm_metrics = advantages.pop('metrics', {})
          batch.update(advantages)
        else:
          batch['advantages'] = _advantage_rows(advantages, rows)
        batch = {k: np.asarray(v, np.float32) if v.dtype == np.float64 else v
                 for k, v in batch.items()}
        order_in_batch = np.random.default_rng([config.seed, step]).permutation(t.batch_size)
        outs, critic_outs = [], []
        with jax.set_mesh(mesh):
          for u in range(r.updates_per_batch):
            k = u % r.minibatches
            idx = order_in_batch[k * minibatch:(k + 1) * minibatch]
            update = step * r.updates_per_batch + u
            minibatch_rows = global_batch({f: v[idx] for f, v in batch.items()}, mesh, rules)
            params, opt_state, out = train_step(params, opt_state, minibatch_rows,
                                                jnp.int32(update))
            outs.append(out)
            if critic is not None:
              critic_outs.append(critic.update(minibatch_rows, update))
          outs, critic_outs = jax.device_get((outs, critic_outs))
        step += 1
        ckpt.check()  # A checkpoint write that failed in the background stops the run now.
        for out in outs + critic_outs:
          loop.raise_if_not_finite(out, step, ckpt.latest_step())
        t_step = time.perf_counter() - t0

        gen_tokens = sum(len(c.tokens) for g in groups for c in g.completions)
        completion = rows['mask'] > 0
        metrics = {k: float(np.mean([o[k] for o in outs])) for k in outs[0] if k != 'finite'}
        for k in (critic_outs[0] if critic_outs else {}):
          if k != 'finite':  # The critic's loss and gradient norm are the value function's.
            name = {'loss': 'value_loss', 'grad_norm': 'value_grad_norm'}.get(k, k)
            metrics[name] = float(np.mean([o[k] for o in critic_outs]))
        metrics.update(algorithm_metrics)
        if 'ratio_sq_mean' in metrics:  # std = sqrt(E[rho^2] - E[rho]^2)
          metrics['ratio_std'] = float(np.sqrt(max(
              metrics.pop('ratio_sq_mean') - metrics['ratio_mean'] ** 2, 0.0)))
        metrics.update(_group_metrics(groups))
        metrics.update(
            lr=float(schedule(step * r.updates_per_batch - 1)),
            kl=float((np.asarray(k3_kl(old_logp, ref_logp)) * completion).sum()
                     / max(completion.sum(), 1)),
            entropy=float((entropy * completion).sum() / max(completion.sum(), 1)),
            **mismatch_stats(old_logp, rows['engine_logp'], rows['mask']),
            is_capped_fraction=is_capped, **draw_stats,
            time_generate_s=t_gen, time_logprobs_s=t_logp,
            time_update_s=t_step - t_gen - t_logp, time_step_s=t_step,
            generate_fraction=t_gen / t_step,
            rollout_tokens_per_s=gen_tokens / max(t_gen, 1e-9),
            tokens_per_s=gen_tokens / max(t_step, 1e-9))

        is_last = step == t.steps
        stop_reason = ('SIGTERM' if preemption.requested else
                       'train.stop_after' if t.stop_after and step >= t.stop_after else None)
        if is_last or (t.eval_every and step % t.eval_every == 0):
          metrics.update(evaluate(rollouts, policy.engine_params(params),
                                  config.eval.num_problems))
        writer.advance()
        if step % t.log_every == 0 or is_last or stop_reason or 'eval_accuracy' in metrics:
          writer.write(step, metrics)
          writer.advance(0, loss=metrics['loss'], reward=metrics['reward_mean'])
          last_metrics = metrics
        if step % t.checkpoint_every == 0 or is_last or stop_reason:
          ckpt.save(step, params, opt_state, {'seed': config.seed, 'prompt_cursor': order.cursor,
                                              'algorithm': algorithm.state},
                    force=True, extra=critic.items() if critic is not None else None)
        if metrics['truncation_rate'] > 0.5 and step == start + 1:
          print(f'Warning: {metrics["truncation_rate"]:.0%} of the completions hit '
                f'rl.max_completion_tokens={r.max_completion_tokens}; raise it.')
        if stop_reason:
          print(f'Stopped at step {step} ({stop_reason}); checkpoint saved. '
                f'Run the same command again to resume.')
          break
  finally:
    try:
      ckpt.close()  # Raises a CheckpointError naming the path if the last write failed.
    finally:
      writer.close()
  return loop.Result(final(), step, step >= t.steps, last_metrics)
