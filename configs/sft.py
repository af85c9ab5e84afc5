"""Supervised fine-tuning (full parameters) of a pretrained workdir on chat-formatted data.

  python -m trainers.sft --config=configs/sft.py:tiny --workdir=runs/sft \
      --config.init_from=runs/pretrain
  python -m eval.accuracy --workdir=runs/sft

Presets (the `:arg`): model.preset names the shape, but with init_from the architecture is always
that workdir's own (trainers/common.py).
  tiny   tests: basic_arithmetic 'a +/- b +/- c' with one-digit terms, 300 steps of 32 x 128 tokens
         (two conversations a row); about 50 s on 2 CPU cores. Held-out exact-match accuracy
         rises from 0% (the pretrained model never answers in the `#### N` format) to about 25%.
  small  the CPU demo (make demo): the same task, 400 steps of 16 x 128 at lr 1e-3; about 6 minutes
         on 2 cores of an AMD EPYC (2026-12-02), accuracy 0% -> 53% on 300 held-out problems,
         76% of the steps of its worked solutions right, held-out answer loss 10.5 -> 0.05.
         The learning rate is what matters here (bench/RESULTS.md): 5e-4 gave 53%, 2e-4 21%,
         and 3e-3 (this preset until 2026-12-02) 16%, with 37% of the steps right. The demo
         itself trains on half bare solutions for 800 steps (configs/pipeline.py:
         data.worked_fraction=0.5, train.steps=800): 43% on 100 held-out problems, 36% of its
         greedy answers showing working (Intel Xeon, 2026-12-04; at 400 steps 13-19% there).
configs/lora.py and configs/qlora.py are this config with adapters instead of full fine-tuning.
"""
import ml_collections

from configs.base import base_config

_PRESETS = {
    'tiny': dict(steps=300, batch=32, seq=128, lr=5e-3, warmup=10),
    'small': dict(steps=400, batch=16, seq=128, lr=1e-3, warmup=25),
}


def get_config(arg: str = 'tiny'):
  if arg not in _PRESETS:
    raise ValueError(f'configs/sft.py: unknown preset {arg!r}; choose from {sorted(_PRESETS)}')
  p = _PRESETS[arg]
  c = base_config()
  c.model.preset = arg
  c.init_from = ''  # Required: the pretrained (or imported) workdir to fine-tune.
  # Built-in: basic_arithmetic, chain_sum, gsm_symbolic, chatterbot; or a .jsonl of
  # {"messages": [...]}; several join with '+' (data/sft_sources.py).
  c.data.source = 'basic_arithmetic'
  c.data.seq_len = p['seq']
  # Read, encode and pack the JSONL sources' conversations as training consumes them (data sets
  # larger than memory; data/streaming.py), holding lines out by a hash of their index, instead
  # of encoding every conversation before step 1. Built-in sets stay in memory either way.
  c.data.streaming = False
  add_task_keys(c)
  c.lora = lora_keys()

  c.train.steps = p['steps']
  c.train.batch_size = p['batch']
  c.train.log_every = 10
  c.train.checkpoint_every = 100
  c.train.eval_every = 100
  c.train.eval_batches = 4
  c.optimizer.learning_rate = p['lr']
  c.optimizer.warmup_steps = p['warmup']
  c.optimizer.weight_decay = 0.0  # Fine-tuning stays close to the pretrained weights.
  return c


def add_task_keys(c: ml_collections.ConfigDict):
  """The generated-task keys (data/sft_sources.py) and the held-out eval keys that SFT and the RL
  stages share (eval/accuracy.py rebuilds a run's problems from them)."""
  c.data.num_examples = 4000  # Generated training problems (before removing held-out ones).
  c.data.eval_examples = 100  # Generated held-out problems (eval loss and accuracy).
  # Three one-digit terms: 4,000 possible problems, so held-out ones are new as a whole, while the
  # single operations of their step-by-step solutions are all seen in training.
  c.data.num_terms = (3, 3)  # Terms per arithmetic problem (basic_arithmetic, chain_sum, products).
  c.data.num_digits = (1, 1)  # Digits per term (basic_arithmetic, chain_sum, products).
  c.data.operators = ('+', '-')  # basic_arithmetic's operators, out of '+', '-', '*', '/'.
  # Share of the generated training solutions that show their working; the others are the bare
  # `#### N` answer, as in SFT sets that mix sources with and without rationales. Held-out
  # solutions always show it.
  c.data.worked_fraction = 1.0
  c.data.eval_fraction = 0.05  # Held-out fraction of chat and JSONL sets.

  c.eval = ml_collections.ConfigDict()
  c.eval.num_problems = 100  # Held-out problems eval/accuracy.py generates answers for.
  c.eval.max_new_tokens = 48  # Longest answer generated.


def lora_keys() -> ml_collections.ConfigDict:
  """Adapter keys (models/lora.py), off by default; configs/lora.py and qlora.py set them."""
  l = ml_collections.ConfigDict()
  l.rank = 0  # Adapter rank; 0 = full fine-tuning (configs/lora.py sets it).
  l.alpha = 16.0  # Adapter output scale alpha / rank.
  l.dropout = 0.0  # Dropout on the adapters' input (also active in the loop's eval loss).
  # Regex over module paths such as 'layers/0/attn/wq': every attention and MLP projection.
  l.target = r'layers/\d+/(attn/(wq|wk|wv|wo)|mlp/(gate|up|down))'
  l.weight_qtype = ''  # '' = base as is; 'nf4' = QLoRA; 'int4' / 'int8' also work.
  l.tile_size = 64  # Rows of a weight sharing one quantization scale (NF4 block size).
  return l
