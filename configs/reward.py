"""Bradley-Terry reward model (trainers/reward.py, models/reward.py) from a fine-tuned workdir.

  python -m trainers.reward --config=configs/reward.py:tiny --workdir=runs/rm --config.init_from=runs/sft

The pairs are correct vs corrupted step-by-step solutions of generated arithmetic problems
(data/preferences.py); init_from should be an SFT workdir trained on the same task. With
init_from the architecture is always that workdir's own. Load the result with
models.reward.load_reward_model(workdir).

Presets (the `:arg`):
  tiny   tests: from a tiny SFT run (100 steps), 60 steps of 32 pairs x 2 x 96 tokens; about
         14 s on 2 CPU cores. Held-out accuracy rises from 0.5 (zero head) to 0.64 and the margin
         r_c - r_r from 0 to 0.08 (2026-11-23). Learning rate 3e-3 stayed at 0.53; 5e-4 gave
         0.61, and 100 steps at 1e-3 gave 0.61 (margin 0.19).
  small  the CPU demo (make demo): from the demo's SFT model, reading its likelihood of the
         response beside the head (reward.likelihood=1), 50 steps of 32 pairs x 2 x 96 tokens at
         lr 1e-5, scored on 487 held-out pairs (512 problems, repeats dropped: 100 left the
         figure +-3 points); about 3 minutes on 2 cores of an AMD EPYC. From the demo's
         mixed-format SFT model: 0.912 at step 0 (the SFT model's own likelihood ranks the pairs)
         and 0.910 after training; at lr 2e-5, 0.901 (2026-12-03). From an all-worked SFT model
         (lr 2e-5, 100 pairs): 0.95 at step 0 and 0.94-0.95 after (2026-12-02,
         bench/RESULTS.md). Training at lr 1e-4 lowered it (0.90 -> 0.81 in 200 steps: the 2,000
         training pairs are overfit); the head alone (reward.likelihood=0)
         reached 0.66-0.75 from the same model and 0.61 from the older, weaker one.
"""
import ml_collections

from configs import sft
from configs.base import base_config

_PRESETS = {
    'tiny': dict(steps=60, batch=32, seq=96, lr=1e-3, warmup=5),
    'small': dict(steps=50, batch=32, seq=96, lr=1e-5, warmup=5, likelihood=1.0, eval_every=50,
                  eval_examples=512, eval_batches=16),
}


def get_config(arg: str = 'tiny'):
  if arg not in _PRESETS:
    raise ValueError(f'configs/reward.py: unknown preset {arg!r}; choose from {sorted(_PRESETS)}')
  p = _PRESETS[arg]
  c = base_config()
  c.model.preset = arg
  c.init_from = ''  # Required: the fine-tuned workdir the backbone starts from.
  # basic_arithmetic or chain_sum (built-in pairs), or your own pairs as .jsonl (the formats are in
  # data/preferences.py), several joined with '+'.
  c.data.source = 'basic_arithmetic'
  c.data.eval_fraction = 0.05  # Held-out fraction of a JSONL's pairs (built-in: eval_examples).
  c.data.seq_len = p['seq']  # Tokens per response row; a pair that does not fit is an error.
  c.data.num_examples = 2000  # Generated training problems, one pair each.
  # Generated held-out problems (eval loss and accuracy); the few repeats are dropped.
  c.data.eval_examples = p.get('eval_examples', 100)
  # The SFT task's shape (configs/sft.py): keep them equal to the init_from run's.
  c.data.num_terms = (3, 3)  # Terms per arithmetic problem.
  c.data.num_digits = (1, 1)  # Digits per term.
  c.data.operators = ('+', '-')  # basic_arithmetic's operators, out of '+', '-', '*', '/'.
  c.lora = sft.lora_keys()  # lora.rank > 0: adapters (trainers/lora.py; configs/lora.py).

  c.reward = ml_collections.ConfigDict()
  # Std of the scalar head's initial weights; 0 starts every reward at 0 (accuracy 0.5).
  c.reward.head_init_std = 0.0
  # What the reward reads: 'last' (the head at the last response token, InstructGPT's) or 'mean'
  # (the head's mean over the response's positions; models/reward.py).
  c.reward.pooling = 'last'
  # > 0: the reward also reads the backbone's mean token log-probability of the response (SimPO's
  # implicit reward) with a learned weight starting here; 0 = the head alone (models/reward.py).
  c.reward.likelihood = p.get('likelihood', 0.0)

  c.train.steps = p['steps']
  c.train.batch_size = p['batch']  # Pairs per step (each two rows of data.seq_len).
  c.train.log_every = 10
  c.train.checkpoint_every = 100
  c.train.eval_every = p.get('eval_every', 30)
  c.train.eval_batches = p.get('eval_batches', 4)  # Of train.batch_size pairs each.
  c.optimizer.learning_rate = p['lr']
  c.optimizer.warmup_steps = p['warmup']
  return c
