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
step 0, where pi == pi_ref). That is dpo.loss_type='sigmoid'; the other members of the family
(robust, hinge, ipo, rpo and the reference-free simpo and orpo) are defined at LOSS_TYPES below.

The reference log-probs are computed once for every pair before training, not in every step:
each pair's reference forward pass then runs once instead of once per epoch, the reference model
is freed before the policy trains (no second model in memory), and the values are the same on
every resumption. Everything else (optimizer, resumption, metrics, checkpoints) is the shared
loop's.
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from data import pipeline, preferences
from models.losses import pair_weights_and_accuracy
from trainers import cli, common, loop
from trainers import lora as adapters
from trainers import workdir as workdir_lib
from trainers.sft import eval_batches


# dpo.loss_type: the objective, each from its paper. Sums are over a response's tokens; `mean` is
# the per-token mean log-prob, log pi(y|x) / |y|; z is DPO's log-ratio margin
# (log pi(y_c) - log pi_ref(y_c)) - (log pi(y_r) - log pi_ref(y_r)).
#   sigmoid  Rafailov et al. 2023 (arXiv:2305.18290), with label smoothing eps as conservative
#            DPO (Mitchell 2023): -(1 - eps) log s(beta z) - eps log s(-beta z).
#   robust   Chowdhury et al. 2024, "Provably Robust DPO" (arXiv:2403.00409): the unbiased loss
#            under a label flip rate eps < 1/2: [-(1 - eps) log s(beta z) + eps log s(-beta z)]
#            / (1 - 2 eps).
#   hinge    SLiC-HF, Zhao et al. 2023 (arXiv:2305.10425): max(0, 1 - beta z).
#   ipo      Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
#            Preferences" (arXiv:2310.12036), eq. 17: (z - 1 / (2 beta))^2, z from summed log-probs
#            as in the paper (TRL averages over tokens instead).
#   rpo      Pang et al. 2024, "Iterative Reasoning Preference Optimization" (arXiv:2404.19733):
#            sigmoid + alpha * NLL of the chosen response per token, -mean(y_c); the remedy for
#            DPO lowering the chosen response's likelihood.
#   simpo    Meng et al. 2024, "SimPO" (arXiv:2405.14734), no reference model:
#            -log s(beta mean(y_c) - beta mean(y_r) - gamma).
#   orpo     Hong et al. 2024, "ORPO" (arXiv:2403.07691), no reference model: -mean(y_c)
#            + lambda * -log s(log odds(y_c) - log odds(y_r)), odds(y) = p / (1 - p) with
#            p = exp(mean(y)).
LOSS_TYPES = ('sigmoid', 'robust', 'hinge', 'ipo', 'rpo', 'simpo', 'orpo')
REFERENCE_FREE = ('simpo', 'orpo')


def preference_loss(loss_type: str, policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                    chosen_tokens, rejected_tokens, cfg):
  """Per-pair loss of `loss_type` from summed response log-probs and token counts, all [B]; cfg
  holds beta, label_smoothing, rpo_alpha, simpo_gamma, orpo_lambda (configs/dpo.py).

  Returns (loss, chosen_reward, rejected_reward, nll): the implicit rewards whose difference is
  the margin the loss pushes up (beta * log pi / pi_ref; beta * mean log-prob for simpo; the log
  odds for orpo) and the chosen response's per-token NLL (which rpo and orpo also train on).
  """
  beta, eps = cfg.beta, cfg.label_smoothing
  mean_c, mean_r = policy_chosen / chosen_tokens, policy_rejected / rejected_tokens
  nll = -mean_c
  if loss_type == 'simpo':
    chosen_reward, rejected_reward = beta * mean_c, beta * mean_r
    return (-jax.nn.log_sigmoid(chosen_reward - rejected_reward - cfg.simpo_gamma),
            chosen_reward, rejected_reward, nll)
  if loss_type == 'orpo':
    # log odds = log p - log(1 - p); mean < 0 always, so log1p(-exp(mean)) is finite (clipped
    # just below 0 for a response the model is certain of).
    log_odds = lambda m: m - jnp.log1p(-jnp.exp(jnp.minimum(m, -1e-6)))
    chosen_reward, rejected_reward = log_odds(mean_c), log_odds(mean_r)
    return (nll - cfg.orpo_lambda * jax.nn.log_sigmoid(chosen_reward - rejected_reward),
            chosen_reward, rejected_reward, nll)
  chosen_reward = beta * (policy_chosen - ref_chosen)
  rejected_reward = beta * (policy_rejected - ref_rejected)
  logits = chosen_reward - rejected_reward  # beta * z
  if loss_type in ('sigmoid', 'rpo'):
    loss = (-(1.0 - eps) * jax.nn.log_sigmoid(logits) - eps * jax.nn.log_sigmoid(-logits))
    if loss_type == 'rpo':
      loss = loss + cfg.rpo_alpha * nll
  elif loss_type == 'robust':
    loss = ((1.0 - eps) * -jax.nn.log_sigmoid(logits) + eps * jax.nn.log_sigmoid(-logits)) \
        / (1.0 - 2.0 * eps)
  elif loss_type == 'hinge':
    loss = jax.nn.relu(1.0 - logits)
  elif loss_type == 'ipo':
    loss = (logits / beta - 1.0 / (2.0 * beta)) ** 2
  else:
    raise ValueError(f'dpo.loss_type={loss_type!r}: expected one of {LOSS_TYPES}')
  return loss, chosen_reward, rejected_reward, nll


def check_config(cfg) -> None:
  if cfg.loss_type not in LOSS_TYPES:
    raise ValueError(f'dpo.loss_type={cfg.loss_type!r}: expected one of {LOSS_TYPES}')
  if cfg.beta <= 0:
    raise ValueError(f'dpo.beta={cfg.beta} must be > 0')
  if not 0 <= cfg.label_smoothing < 0.5:
    raise ValueError(f'dpo.label_smoothing={cfg.label_smoothing} must be in [0, 0.5)')
  if cfg.label_smoothing and cfg.loss_type not in ('sigmoid', 'rpo', 'robust'):
    raise ValueError(f'dpo.label_smoothing applies to sigmoid, rpo and robust, not '
                     f'{cfg.loss_type!r}')


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float,
             label_smoothing: float = 0.0):
  """The paper's loss (loss_type 'sigmoid'), per pair from sequence log-probs, all [B].

  Returns (loss, chosen_reward, rejected_reward) with reward = beta * (log pi - log pi_ref).
  """
  cfg = ml_collections.ConfigDict(dict(beta=beta, label_smoothing=label_smoothing))
  ones = jnp.ones_like(policy_chosen)
  return preference_loss('sigmoid', policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                         ones, ones, cfg)[:3]


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
  check_config(dpo_config)
  kind = dpo_config.loss_type

  def loss_fn(model, batch, rng):
    del rng  # No dropout.
    policy = sequence_logps(model, batch)
    ref = batch['ref_logps'] if kind not in REFERENCE_FREE else jnp.zeros_like(policy)
    tokens = jnp.maximum(batch['loss_mask'].sum(-1), 1.0)  # [B, 2]; padding pairs have none.
    loss, chosen_reward, rejected_reward, nll = preference_loss(
        kind, policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], tokens[:, 0], tokens[:, 1],
        dpo_config)
    margin = chosen_reward - rejected_reward
    weight, correct = pair_weights_and_accuracy(batch['loss_mask'], margin)
    sums = lambda x: (x * weight).sum()
    return sums(loss), weight.sum(), {
        'reward_accuracy': sums(correct), 'reward_margin': sums(margin),
        'chosen_reward': sums(chosen_reward), 'rejected_reward': sums(rejected_reward),
        'chosen_nll': sums(nll)}
  return loss_fn


@workdir_lib.stage('dpo')  # One live run per workdir; see trainers/workdir.py.
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

  check_config(config.dpo)
  adapters.spec(config)  # A bad lora block fails before anything is written.
  # With adapters (trainers/lora.py) the policy starts as exactly the base (B = 0; for QLoRA the
  # quantized base), which is then the reference: no second copy of the weights.
  model, spec = adapters.prepare_model(config, workdir, tokenizer, model_cfg, mesh)
  if config.dpo.loss_type not in REFERENCE_FREE:  # simpo and orpo need no reference pass.
    reference = model if spec is not None else common.load_init_from(config, model_cfg, mesh)
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
  trainable = adapters.trainable(spec)
  print(f'{adapters.describe(model, trainable, model_cfg, spec)} Preference loss '
        f'{config.dpo.loss_type!r}, beta={config.dpo.beta}, '
        f'label_smoothing={config.dpo.label_smoothing}.')
  return loop.train(config, workdir, model, adapters.wrap_loss(make_loss(config.dpo), spec),
                    train_iter, held_out_batches, mesh=mesh, rules=config.sharding_rules,
                    token_loss=False, trainable=trainable)


if __name__ == '__main__':
  cli.run_stage(run, 'configs/dpo.py:tiny')
