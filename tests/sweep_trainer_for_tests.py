"""A stand-in trainer for tests/test_sweep.py: takes a trainer's command line, writes a
metrics.jsonl whose loss depends on the learning rate, and fails when told to (the sweep's own
behaviour is under test; the real trainers have their own tests)."""
import json
import os
import sys


def main(argv):
  args = dict(a[2:].split('=', 1) for a in argv if a.startswith('--') and '=' in a)
  workdir = args['workdir']
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'runs.txt'), 'a') as f:  # how often this point ran
    f.write('run\n')
  if args.get('config.train.steps') == 'fail':
    sys.exit(3)
  lr = float(args.get('config.optimizer.learning_rate', 1e-3))
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    for step in (1, 2):
      f.write(json.dumps({'step': step, 'loss': 1 / (lr * 1000 * step)}) + '\n')
    f.write(json.dumps({'step': 2, 'eval_loss': 2 / (lr * 1000)}) + '\n')


if __name__ == '__main__':
  main(sys.argv[1:])
