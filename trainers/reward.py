"""Reward-model training with the Bradley-Terry pair loss (Bradley & Terry, 1952), as for
InstructGPT's reward model (Ouyang et al., 2022, arXiv:2203.02155); the model is models/reward.py.

  python -m trainers.reward --config=configs/reward.py:tiny --workdir=runs/rm --config.init_from=runs/sft

The backbone starts from init_from (an SFT workdir) and the scalar head from zero; all parameters
train. For each pair (data/preferences.py) L = -log sigmoid(r_c - r_r); we report the accuracy,
the fraction of pairs with r_c > r_r (a tie counts one half, so it is 0.5 at step 0 with a zero
head), and the mean margin r_c - r_r. The workdir gets models/reward.py's reward.json, so
models.reward.load_reward_model(workdir) rebuilds the model. Everything else (optimizer,
resumption, metrics, checkpoints) is the shared loop's.
"""
import jax
import ml_collections

from data import pipeline, preferences
from models import reward
from models.losses import pair_weights_and_accuracy
from trainers import cli, common, loop
from trainers import lora as adapters
from trainers import workdir as workdir_lib
from trainers.sft import eval_batches


def loss_fn(model, batch, rng):
  del rng  # No dropout.
  r = reward.pair_rewards(model, batch)
  margin = r[:, 0] - r[:, 1]
  weight, correct = pair_weights_and_accuracy(batch['loss_mask'], margin)
  # The loop wants sums, so micro-batches combine exactly.
  loss_sum = reward.bradley_terry_loss(r[:, 0], r[:, 1], weight) * weight.sum()
  sums = lambda x: (x * weight).sum()
  return loss_sum, weight.sum(), {'accuracy': sums(correct), 'margin': sums(margin)}


@workdir_lib.stage('reward')  # One live run per workdir; see trainers/workdir.py.
def run(config: ml_collections.ConfigDict, workdir: str) -> loop.Result:
  if config.reward.pooling not in reward.POOLINGS:
    raise ValueError(f'reward.pooling={config.reward.pooling!r}: expected one of '
                     f'{reward.POOLINGS}')
  if config.reward.likelihood < 0:
    raise ValueError(f'reward.likelihood={config.reward.likelihood}: the start weight of the '
                     'response\'s mean token log-probability must be >= 0 (0 = not read)')
  if not config.init_from:
    raise ValueError('A reward model starts from a fine-tuned model: set '
                     '--config.init_from=WORKDIR')
  tokenizer = common.tokenizer_for(config, workdir)
  train, held_out = preferences.load_preference_pairs(config.data, config.seed)
  train_rows = preferences.encode_pairs(tokenizer, train, config.data.seq_len)
  print(f'Reward data {config.data.source!r}: {len(train)} training pairs, '
        f'{len(held_out)} held out.')
  model_cfg = common.model_config(config, tokenizer.vocab_size)
  mesh = common.mesh_from_config(config)
  per_process = common.per_process_batch(config)

  rows = pipeline.RowTable(train_rows)
  train_iter = pipeline.make_train_iterator(
      rows, batch_size=per_process, seed=config.seed, process_index=jax.process_index(),
      process_count=jax.process_count(), worker_count=config.data.worker_count)
  held_out_batches = None
  if held_out and config.train.eval_batches:
    eval_rows = preferences.encode_pairs(tokenizer, held_out, config.data.seq_len)
    held_out_batches = eval_batches(eval_rows, batch_size=per_process,
                                    max_batches=config.train.eval_batches)
  # With adapters (trainers/lora.py): the backbone's adapters and the head train, nothing else.
  backbone, spec = adapters.prepare_model(config, workdir, tokenizer, model_cfg, mesh)
  reward.write_marker(workdir, config.reward.head_init_std, config.reward.pooling,
                      config.reward.likelihood)
  model = reward.new_reward_model(backbone, mesh, head_init_std=config.reward.head_init_std,
                                  pooling=config.reward.pooling,
                                  likelihood=config.reward.likelihood, seed=config.seed)
  trainable = adapters.trainable(spec, with_head=True)
  print('Reward ' + adapters.describe(model, trainable, model_cfg, spec).lower())
  return loop.train(config, workdir, model, adapters.wrap_loss(loss_fn, spec), train_iter,
                    held_out_batches, mesh=mesh, rules=config.sharding_rules, token_loss=False,
                    trainable=trainable, eval_at_start=True)


if __name__ == '__main__':
  cli.run_stage(run, 'configs/reward.py:tiny')
