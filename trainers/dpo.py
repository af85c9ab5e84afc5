"""Direct Preference Optimization (DPO): Rafailov et al., 2023, "Direct Preference Optimization:
Your Language Model is Secretly a Reward Model", arXiv:2305.18290.

  python -m trainers.dpo --config=configs/dpo.py:tiny --workdir=runs/dpo --config.init_from=runs/sft

The policy starts from init_from (an SFT workdir) and so does the reference pi_ref, which stays
frozen. For a prompt x with chosen response y_c and rejected response y_r (data/preferences.py),
with log pi(y|x) summed over the response tokens,
    z = (log pi(y_c|x) - log pi_ref(y_c|x)) - (log pi(y_r|x) - log pi_ref(y_r|x))
    L = -(1 - eps) * log sigmoid(beta * z) - eps * log sigmoid(-beta * z)
where eps = dpo.label_smoothing (0: the paper's loss; > 0: conservative DPO, which assumes a
fraction eps of the labels are flipped). beta * (log pi - log pi_ref) is the implicit reward of
a response; we report its mean for chosen and rejected responses, their mean margin beta * z, and
the reward accuracy, the fraction of pairs with z > 0 (a tie counts one half, so it is 0.5 at
step 0, where pi == pi_ref).

The reference log-probs are computed once for every pair before training, not in every step:
each pair's reference forward pass then runs once instead of once per epoch, the reference model
is freed before the policy trains (no second model in memory), and the values are the same on
every resumption. Everything else (optimizer, resumption, metrics, checkpoints) is the shared
loop's.
"""
import jax
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from data import pipeline, preferences
from models.losses import pair_weights_and_accuracy
from trainers import cli, common, loop
from trainers.sft import eval_batches


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float,
             label_smoothing: float = 0.0):
  """Per-pair DPO loss and implicit rewards from sequence log-probs, all [B].

  Returns (loss, chosen_reward, rejected_reward) with reward = beta * (log pi - log pi_ref).
  """
  chosen_reward = beta * (policy_chosen - ref_chosen)
  rejected_reward = beta * (policy_rejected - ref_rejected)
  logits = chosen_reward - rejected_reward  # beta * z
  loss = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(logits)
          - label_smoothing * jax.nn.log_sigmoid(-logits))
  return loss, chosen_reward, rejected_reward


def sequence_logps(model, batch: dict) -> jax.Array:
  """Summed log-probs of the masked (response) tokens: [B, 2, T] rows -> [B, 2]."""
  b, n, t = batch['inputs'].shape
  flat = lambda k: batch[k].reshape(b * n, t)
  logits = model(flat('inputs'), flat('positions'), flat('segment_ids'))
  logp = -optax.softmax_cross_entropy_with_integer_labels(logits, flat('targets'))
  return (logp * flat('loss_mask')).sum(-1).reshape(b, n)


def reference_logps(model, rows: dict, *, batch_size: int, mesh, rules) -> np.ndarray:
  """sequence_logps of every row, [N, 2], in batches of batch_size (the last one padded).

  Every process holds all rows, so each batch is laid out over the mesh from the full array and
  the result comes back replicated: this also works on several hosts.
  """
  n = len(rows['inputs'])
  padded = -(-n // batch_size) * batch_size
  sharding = loop.batch_sharding(mesh, rules)
  graphdef, state = nnx.split(model)
  with jax.set_mesh(mesh):
    forward = jax.jit(lambda state, batch: sequence_logps(nnx.merge(graphdef, state), batch),
                      out_shardings=NamedSharding(mesh, PartitionSpec()))
    out = []
    for start in range(0, padded, batch_size):
      batch = {}
      for k, v in rows.items():
        chunk, part = v[start:start + batch_size], np.zeros((batch_size,) + v.shape[1:], v.dtype)
        part[:len(chunk)] = chunk
        batch[k] = jax.make_array_from_callback(part.shape, sharding, lambda i, p=part: p[i])
      out.append(np.asarray(jax.device_get(forward(state, batch))))
  return np.concatenate(out)[:n]


def make_loss(dpo_config: ml_collections.ConfigDict):
  beta, label_smoothing = dpo_config.beta, dpo_config.label_smoothing

  def loss_fn(model, batch, rng):
    del rng  # No dropout.
    policy = sequence_logps(model, batch)
    ref = batch['ref_logps']
    loss, chosen_reward, rejected_reward = dpo_loss(
        policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], beta, label_smoothing)
    margin = chosen_reward - rejected_reward
    weight, correct = pair_weights_and_accuracy(batch['loss_mask'], margin)
    sums = lambda x: (x * weight).sum()
    return sums(loss), weight.sum(), {
        'reward_accuracy': sums(correct), 'reward_margin': sums(margin),
        'chosen_reward': sums(chosen_reward), 'rejected_reward': sums(rejected_reward)}
  return loss_fn


def run(config: ml_collections.ConfigDict, workdir: str) -> loop.Result:
  if not config.init_from:
    raise ValueError('DPO starts from a fine-tuned model: set --config.init_from=WORKDIR')
  tokenizer = common.tokenizer_for(config, workdir)
  train, held_out = preferences.load_preference_pairs(config.data, config.seed)
  train_rows = preferences.encode_pairs(tokenizer, train, config.data.seq_len)
  eval_rows = preferences.encode_pairs(tokenizer, held_out, config.data.seq_len) \
      if held_out else None
  print(f'DPO data {config.data.source!r}: {len(train)} training pairs, {len(held_out)} held out.')
  model_cfg = common.model_config(config, tokenizer.vocab_size)
  mesh = common.mesh_from_config(config)
  per_process = common.per_process_batch(config)

  reference = common.load_init_from(config, model_cfg, mesh)
  for rows in (train_rows, eval_rows):
    if rows is not None:
      rows['ref_logps'] = reference_logps(reference, rows, batch_size=config.train.batch_size,
                                          mesh=mesh, rules=config.sharding_rules)
  del reference

  rows = pipeline.RowTable(train_rows)
  train_iter = pipeline.make_train_iterator(
      rows, batch_size=per_process, seed=config.seed, process_index=jax.process_index(),
      process_count=jax.process_count(), worker_count=config.data.worker_count)
  held_out_batches = None
  if eval_rows is not None and config.train.eval_batches:
    held_out_batches = eval_batches(eval_rows, batch_size=per_process,
                                    max_batches=config.train.eval_batches)
  common.write_workdir(config, workdir, tokenizer, model_cfg)
  model = common.initial_model(config, workdir, model_cfg, mesh)
  print(f'Model of {model_cfg.num_params():,} parameters; DPO beta={config.dpo.beta}, '
        f'label_smoothing={config.dpo.label_smoothing}.')
  return loop.train(config, workdir, model, make_loss(config.dpo), train_iter, held_out_batches,
                    mesh=mesh, rules=config.sharding_rules, token_loss=False)


if __name__ == '__main__':
  cli.run_stage(run, 'configs/dpo.py:tiny')
