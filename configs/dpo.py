"""Direct Preference Optimization (trainers/dpo.py) of a fine-tuned workdir on preference pairs.

  python -m trainers.dpo --config=configs/dpo.py:tiny --workdir=runs/dpo --config.init_from=runs/sft

The pairs are correct vs corrupted step-by-step solutions of generated arithmetic problems
(data/preferences.py); init_from should be an SFT workdir trained on the same task, so that both
responses are in its distribution. With init_from the architecture is always that workdir's own.

Presets (the `:arg`):
  tiny   tests: from a tiny SFT run (100 steps), 100 steps of 32 pairs x 2 x 96 tokens; about
         18 s on 2 CPU cores. Held-out reward accuracy rises from 0.5 (policy == reference) to
         about 0.63 and the reward margin from 0 to about 0.1: the pairs whose final answer
         contradicts the working are learned (0.83), the arithmetic slips hardly (0.53; too few
         steps for a 164k-parameter model to learn the sums).
  small  the CPU demo shape: from the small SFT run (runs/demo/sft), 200 steps of 32 pairs x 2 x
         96 tokens; about 4.5 minutes on 2 CPU cores (2026-11-23). Held-out reward accuracy
         0.5 -> 0.76, reward margin 0 -> 0.28 (chosen -0.19, rejected -0.47). Greedy exact-match
         accuracy (eval/accuracy.py) still drops from the SFT model's 17% to 11% and the answer
         loss rises 0.11 -> 0.17: the preference is learned mostly by pushing rejected solutions
         down, not correct ones up. At learning rate 3e-4 it was 0.71 and 10% (loss 0.41).
"""
import ml_collections

from configs import sft
from configs.base import base_config

_PRESETS = {
    'tiny': dict(steps=100, batch=32, seq=96, lr=5e-4, warmup=5),
    'small': dict(steps=200, batch=32, seq=96, lr=5e-5, warmup=20),
}


def get_config(arg: str = 'tiny'):
  if arg not in _PRESETS:
    raise ValueError(f'configs/dpo.py: unknown preset {arg!r}; choose from {sorted(_PRESETS)}')
  p = _PRESETS[arg]
  c = base_config()
  c.model.preset = arg
  c.init_from = ''  # Required: the fine-tuned workdir; it is both the start and the reference.
  # basic_arithmetic or chain_sum (built-in pairs), or your own pairs as .jsonl (the formats are in
  # data/preferences.py), several joined with '+'.
  c.data.source = 'basic_arithmetic'
  c.data.eval_fraction = 0.05  # Held-out fraction of a JSONL's pairs (built-in: eval_examples).
  c.data.seq_len = p['seq']  # Tokens per response row; a pair that does not fit is an error.
  c.data.num_examples = 2000  # Generated training problems, one pair each.
  c.data.eval_examples = 100  # Generated held-out problems (eval loss and reward accuracy).
  # The SFT task's shape (configs/sft.py): keep them equal to the init_from run's.
  c.data.num_terms = (3, 3)  # Terms per arithmetic problem.
  c.data.num_digits = (1, 1)  # Digits per term.
  c.data.operators = ('+', '-')  # basic_arithmetic's operators, out of '+', '-', '*', '/'.
  c.lora = sft.lora_keys()  # lora.rank > 0: adapters (trainers/lora.py; configs/lora.py).

  c.dpo = ml_collections.ConfigDict()
  # The objective (trainers/dpo.py cites each): sigmoid (DPO), robust, hinge, ipo, rpo, and the
  # reference-free simpo and orpo (no reference pass at all).
  c.dpo.loss_type = 'sigmoid'
  # Strength of the pull toward the reference: the implicit reward is beta * log(pi / pi_ref);
  # for simpo the scale of the mean log-prob reward (its paper uses 2.0-2.5).
  c.dpo.beta = 0.1
  # Assumed fraction of flipped labels, < 0.5 (sigmoid/rpo: conservative DPO; robust: rDPO).
  c.dpo.label_smoothing = 0.0
  c.dpo.rpo_alpha = 1.0  # rpo: weight of the chosen response's per-token NLL.
  c.dpo.simpo_gamma = 0.5  # simpo: the target reward margin gamma.
  c.dpo.orpo_lambda = 0.1  # orpo: weight of the odds-ratio term beside the NLL.

  c.train.steps = p['steps']
  c.train.batch_size = p['batch']  # Pairs per step (each two rows of data.seq_len).
  c.train.log_every = 10
  c.train.checkpoint_every = 100
  c.train.eval_every = 50
  c.train.eval_batches = 4
  c.optimizer.learning_rate = p['lr']
  c.optimizer.warmup_steps = p['warmup']
  c.optimizer.weight_decay = 0.0  # The reference term already keeps the policy close.
  return c
