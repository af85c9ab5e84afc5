"""A reward model: a Llama backbone and a scalar head, trained on preference pairs with the
Bradley-Terry model (Bradley & Terry, 1952, "Rank Analysis of Incomplete Block Designs: I. The
Method of Paired Comparisons") as in InstructGPT's reward model (Ouyang et al., 2022, "Training
language models to follow instructions with human feedback", arXiv:2203.02155).

The reward of a (prompt, response) sequence is a linear head on the backbone's final-norm hidden
state at the last response token: causal attention makes it the one position that has read the
whole prompt and response. Under Bradley-Terry, P(chosen > rejected) = sigmoid(r_c - r_r), so the
loss is -log sigmoid(r_c - r_r); it depends on reward differences only, so rewards have no fixed
zero.

Optionally (reward.likelihood > 0) the reward also reads the backbone's own language-model head:
    r(x, y) = head(h_last) + w * 1/|y| sum_t log pi(y_t | x, y_<t),
the response's mean token log-probability, which is SimPO's reference-free implicit reward (Meng
et al., 2024, "SimPO", arXiv:2405.14734; DPO's with a reference: Rafailov et al., 2023, "Your
Language Model is Secretly a Reward Model", arXiv:2305.18290), with a learned weight w starting at
reward.likelihood. Why: a scalar head at the last token must learn to carry a mistake made
anywhere in the response to the end, while the LM head already scores every token where it is
written; a fine-tuned model that gives a wrong step a low probability ranks most such pairs right
before any reward training (bench/RESULTS.md), and Bradley-Terry training then sharpens both
terms (the backbone, its LM head and w all train).

A reward workdir (trainers/reward.py) is a normal workdir (model.json, tokenizer, checkpoints)
plus REWARD_FILE; its checkpoint's params hold the backbone and the head.
"""
import contextlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from models import checkpoint
from models.llama import Llama, abstract_model
from models.losses import head_logprobs

REWARD_FILE = 'reward.json'


POOLINGS = ('last', 'mean')


class RewardModel(nnx.Module):
  """pooling says which hidden states the scalar reward reads: 'last', the head at the last
  response token (InstructGPT's), or 'mean', the mean of the head over the response's positions
  (every token that has read part of the response): a mistake anywhere in the response can lower
  the reward right where it is read, instead of having to be carried to the last token."""

  def __init__(self, backbone: Llama, *, head_init_std: float = 0.0, pooling: str = 'last',
               likelihood: float = 0.0, rngs: nnx.Rngs):
    if pooling not in POOLINGS:
      raise ValueError(f'reward.pooling={pooling!r}: expected one of {POOLINGS}')
    if likelihood < 0:
      raise ValueError(f'reward.likelihood={likelihood}: the start weight of the mean token '
                       'log-probability must be >= 0 (0 = not read)')
    self.backbone = backbone
    self.pooling = pooling
    self.likelihood = likelihood > 0
    if self.likelihood:  # The weight w of the module docstring, learned from this start.
      self.likelihood_weight = nnx.Param(jnp.full((), likelihood, jnp.float32))
    # Zero by default: every reward starts at 0, so the first loss is log 2 and accuracy is 0.5
    # whatever the backbone, and the backbone gets no gradient until the head has a direction.
    init = (nnx.initializers.zeros if head_init_std == 0.0
            else nnx.initializers.normal(head_init_std))
    self.head = nnx.Linear(backbone.cfg.d_model, 1, kernel_init=init, rngs=rngs)


def new_reward_model(backbone: Llama, mesh, *, head_init_std: float = 0.0,
                     pooling: str = 'last', likelihood: float = 0.0,
                     seed: int = 0) -> RewardModel:
  """RewardModel around a backbone already on `mesh`, its head (and likelihood weight)
  replicated over the mesh (they carry no logical axis names, and one jit cannot mix them on one
  device with a sharded backbone)."""
  model = RewardModel(backbone, head_init_std=head_init_std, pooling=pooling,
                      likelihood=likelihood, rngs=nnx.Rngs(seed))
  replicated = NamedSharding(mesh, PartitionSpec())
  nnx.update(model, jax.device_put(nnx.state(model, own_head), replicated))
  return model


def last_response_index(loss_mask: jax.Array) -> jax.Array:
  """[..., T] loss mask -> [...] index of its last masked position.

  The mask is on targets, so its last position predicts the end-of-turn token and its input is
  the last response token. A row without a mask (eval padding) gives T - 1; its pair weighs 0.
  """
  t = loss_mask.shape[-1]
  return t - 1 - jnp.argmax(jnp.flip(loss_mask > 0, -1), axis=-1)


def reward(model: RewardModel, tokens, positions, segment_ids, response_mask,
           targets=None) -> jax.Array:
  """tokens, positions, segment_ids [B, T] and the response's loss mask [B, T] (on targets, so its
  positions are the inputs from the last prompt token to the last response token) -> rewards [B]
  in fp32, pooled as model.pooling says. targets [B, T] (the next token of each position) are
  needed when the model reads its likelihood."""
  x, _ = model.backbone.hidden_states(tokens, positions, segment_ids)
  mask = response_mask.astype(jnp.float32)
  if model.pooling == 'mean':
    per_token = model.head(x.astype(jnp.float32))[..., 0]
    r = (per_token * mask).sum(-1) / jnp.maximum(mask.sum(-1), 1.0)
  else:
    last_index = last_response_index(response_mask)
    last = jnp.take_along_axis(x, last_index[:, None, None], axis=1)[:, 0]
    r = model.head(last.astype(jnp.float32))[:, 0]
  if model.likelihood:
    if targets is None:
      raise ValueError('this reward model reads its likelihood of the response: pass targets')
    logp, _ = head_logprobs(model.backbone, x, targets)
    r = r + model.likelihood_weight[...] * (logp * mask).sum(-1) / jnp.maximum(mask.sum(-1), 1.0)
  return r


def values(model: RewardModel, tokens, positions=None) -> jax.Array:
  """The head at every position: tokens [B, T] -> [B, T] fp32. PPO's critic (trainers/ppo.py) is
  a RewardModel read this way: values[:, t] estimates the return of the state that has read
  tokens[:, :t+1], the state in which targets[:, t] is generated."""
  x, _ = model.backbone.hidden_states(tokens, positions)
  return model.head(x.astype(jnp.float32))[..., 0]


def pair_rewards(model: RewardModel, batch: dict) -> jax.Array:
  """Rewards of data/preferences.py rows [B, 2, T] -> [B, 2] (0 = chosen, 1 = rejected)."""
  b, n, t = batch['inputs'].shape
  flat = lambda k: batch[k].reshape(b * n, t)
  r = reward(model, flat('inputs'), flat('positions'), flat('segment_ids'), flat('loss_mask'),
             flat('targets'))
  return r.reshape(b, n)


def bradley_terry_loss(r_chosen, r_rejected, weight=None) -> jax.Array:
  """Mean of -log sigmoid(r_chosen - r_rejected) over pairs ([B] each), weighted if given."""
  losses = -jax.nn.log_sigmoid(r_chosen - r_rejected)
  if weight is None:
    return losses.mean()
  return (losses * weight).sum() / jnp.maximum(weight.sum(), 1.0)


def write_marker(workdir: str, head_init_std: float, pooling: str = 'last',
                 likelihood: float = 0.0):
  with open(os.path.join(workdir, REWARD_FILE), 'w') as f:
    json.dump({'head': 'linear', 'pooling': pooling, 'head_init_std': head_init_std,
               'likelihood': likelihood}, f)


def read_options(workdir: str) -> dict:
  """The RewardModel options a reward workdir was trained with (pooling, likelihood)."""
  with open(os.path.join(workdir, REWARD_FILE)) as f:
    marker = json.load(f)
  # Workdirs written before these options existed: the last token, no likelihood.
  return {'pooling': marker.get('pooling', 'last'), 'likelihood': marker.get('likelihood', 0.0)}


def own_head(path, _value) -> bool:
  """An nnx filter of the reward model's scalar head (path ('head', ...)) and likelihood weight,
  not the backbone's LM head (('backbone', 'head', ...)): with adapters, they train beside
  them."""
  return len(path) > 0 and path[0] in ('head', 'likelihood_weight')


def _load_lora_reward_model(ckpt, step: int, spec, mesh, rules, config_overrides) -> RewardModel:
  """A LoRA reward workdir (adapters and head in its checkpoints, lora.json naming the base):
  the base backbone with the adapters merged in, and the trained head."""
  from models import lora
  base, _ = checkpoint.load_model(spec.base, mesh=mesh, rules=rules, **config_overrides)
  with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    backbone = lora.apply_lora(base, spec)
  options = read_options(os.path.dirname(ckpt.directory))
  model = (new_reward_model(backbone, mesh, **options) if mesh is not None
           else RewardModel(backbone, **options, rngs=nnx.Rngs(0)))
  trained = nnx.state(model, nnx.Any(nnx.LoRAParam, own_head))
  nnx.update(model, checkpoint.restore_params(ckpt, step, checkpoint.abstract_tree(trained)))
  merged = RewardModel(lora.merge_lora(model.backbone, spec), **options, rngs=nnx.Rngs(0))
  nnx.update(merged, nnx.state(model, own_head))
  return merged


def load_reward_model(workdir: str, *, step: int | None = None, mesh=None, rules=None,
                      **config_overrides) -> tuple[RewardModel, int]:
  """The RewardModel of a trainers/reward.py workdir at its newest (or the given) checkpoint, on
  the default device, or with a mesh its backbone laid out as `rules` say and its head
  replicated (as new_reward_model places them). config_overrides change non-architectural
  fields (dtype). -> (model, step)."""
  if not os.path.exists(os.path.join(workdir, REWARD_FILE)):
    raise FileNotFoundError(f'{workdir!r} has no {REWARD_FILE}: not a reward-model workdir '
                            f'(trainers/reward.py)')
  cfg = checkpoint.load_model_config(workdir, **config_overrides)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), async_save=False)
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'no checkpoint under {ckpt.directory}')
  from models import lora  # Here: qwix is only needed for adapter workdirs.
  spec = lora.read_spec(workdir)
  if spec is not None:
    try:
      return _load_lora_reward_model(ckpt, step, spec, mesh, rules, config_overrides), step
    finally:
      ckpt.close()
  with nnx.use_eager_sharding(False):  # As models/llama.abstract_model: no mesh to place on.
    abstract = nnx.eval_shape(
        lambda: RewardModel(Llama(cfg, rngs=nnx.Rngs(0)), **read_options(workdir),
                            rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), state)
  if mesh is not None:
    _, _, backbone = abstract_model(cfg, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    place = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    target['backbone'] = jax.tree.map(place, state['backbone'], backbone)
    for name in ('head', 'likelihood_weight'):
      if name in state:
        target[name] = jax.tree.map(lambda x: place(x, replicated), state[name])
  try:  # A damaged checkpoint: the same CheckpointError as every other reader's.
    return nnx.merge(graphdef, checkpoint.restore_params(ckpt, step, target)), step
  finally:
    ckpt.close()


class RewardScorer:
  """The frozen reward model's score of each (prompt, completion), read as trainers/reward.py
  trained it (models/reward.reward: the head, and the likelihood when the model reads it). Rows are padded to a
  fixed length and batch, so scoring compiles once."""

  def __init__(self, workdir: str, *, batch_size: int, mesh, rules, dtype: str):
    self.model, self.step = load_reward_model(workdir, mesh=mesh, rules=rules, dtype=dtype)
    self.batch_size = batch_size
    graphdef, state = nnx.split(self.model)
    self.state = state
    self._score = jax.jit(lambda s, tokens, mask, targets: reward(
        nnx.merge(graphdef, s), tokens, None, None, mask, targets))

  def __call__(self, prompts: list[list[int]], completions: list[list[int]], *,
               length: int) -> np.ndarray:
    n, b = len(prompts), self.batch_size
    total = -(-n // b) * b
    tokens = np.zeros((total, length), np.int32)
    targets = np.zeros((total, length), np.int32)
    mask = np.zeros((total, length), np.float32)
    for i, (p, c) in enumerate(zip(prompts, completions)):
      seq = (p + c)[:length + 1]
      tokens[i, :len(seq) - 1] = seq[:-1]
      targets[i, :len(seq) - 1] = seq[1:]
      # The targets that are completion tokens, as the loss mask of the reward model's training
      # rows: the last one is the end of turn when the completion finished.
      mask[i, len(p) - 1:len(seq) - 1] = 1.0
    scores = [jax.device_get(self._score(self.state, tokens[s:s + b], mask[s:s + b],
                                         targets[s:s + b]))
              for s in range(0, total, b)]
    return np.concatenate(scores)[:n].astype(np.float32)
