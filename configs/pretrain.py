"""Pretraining: next-token prediction on a built-in corpus or your own text.

  python -m trainers.pretrain --config=configs/pretrain.py:small --workdir=runs/small

Presets (the `:arg`):
  tiny        tests: 2 layers, d 64; trains in seconds on one CPU core.
  small       the CPU demo: 4 layers, d 256 (about 7M parameters with an 8k vocab) on Shakespeare,
              seq 256, batch 8; about 2k tokens/s on 2 CPU cores, loss ~7.5 -> ~4.5 in 300 steps.
  374m        the GPU benchmark shape (d 1024, 24 layers, vocab 32000), seq 2048, batch 16.
  1b, llama3_8b, llama3_70b
              larger shapes for accelerators; on a CPU only their shapes are checked
              (tests/test_presets.py).
"""
from configs.base import base_config

_PRESETS = {
    'tiny': dict(steps=40, batch=4, seq=64, vocab=512, lr=3e-3, warmup=5, max_chars=400_000),
    'small': dict(steps=300, batch=8, seq=256, vocab=8000, lr=2e-3, warmup=30, max_chars=0),
    '374m': dict(steps=2000, batch=16, seq=2048, vocab=32000, lr=6e-4, warmup=200, max_chars=0),
    '1b': dict(steps=20000, batch=64, seq=2048, vocab=32000, lr=3e-4, warmup=1000, max_chars=0),
    'llama3_8b': dict(steps=100000, batch=512, seq=8192, vocab=128256, lr=3e-4, warmup=2000,
                      max_chars=0),
    'llama3_70b': dict(steps=100000, batch=1024, seq=8192, vocab=128256, lr=1.5e-4, warmup=2000,
                       max_chars=0),
}


def get_config(arg: str = 'tiny'):
  if arg not in _PRESETS:
    raise ValueError(f'configs/pretrain.py: unknown preset {arg!r}; choose from {sorted(_PRESETS)}')
  p = _PRESETS[arg]
  c = base_config()
  c.model.preset = arg
  c.train.steps = p['steps']
  c.train.batch_size = p['batch']
  c.data.seq_len = p['seq']
  c.data.max_chars = p['max_chars']
  # Read, tokenize and pack documents as training consumes them (corpora larger than memory;
  # data/streaming.py) instead of tokenizing the whole corpus before step 1. Pretraining only:
  # the other stages' configs do not have the key, so setting it there is an error.
  c.data.streaming = False
  # With data.streaming and a data.source of several sources joined by '+': the share of the
  # training tokens drawn from each, in order ('0.7,0.3', or '0.7:0.3' in a launch.sweep grid;
  # normalised). '' = in proportion to the sources' sizes in bytes.
  c.data.mixture_weights = ''
  c.tokenizer.vocab_size = p['vocab']
  c.optimizer.learning_rate = p['lr']
  c.optimizer.warmup_steps = p['warmup']
  if arg == 'tiny':
    c.train.log_every = 5
    c.train.checkpoint_every = 20
    c.train.eval_every = 20
    c.train.eval_batches = 2
    c.data.eval_fraction = 0.05
  if arg == 'small':
    c.train.log_every = 10
    c.train.checkpoint_every = 100
    c.train.eval_every = 100
    c.train.eval_batches = 4
  return c
