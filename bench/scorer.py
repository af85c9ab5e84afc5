"""Multiple-choice scoring speed: eval.benchmarks.Scorer with shared contexts against one full
row per choice, same process, same items.

  python -m bench.scorer --workdir=runs/smollm2 --task=hellaswag --limit=1000 --style=lighteval

Scores the first --limit items of the task twice, with share_prefix on (an item's context is
prefilled once into a KV cache and every choice runs from it) and off (the peer: one padded
forward pass per choice, as lm-evaluation-harness runs them), each after a warm-up pass over the
same items that compiles every shape, and prints continuations per second of both, their
ratio, the tokens each pass computes (padding included), the first pass's seconds and shapes
(compilation included: on a small --limit it dominates), and the largest difference of a summed
log-likelihood between the two (float rounding only).
"""
import argparse
import json
import time

import numpy as np


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--task', default='hellaswag')
  parser.add_argument('--style', default='harness')
  parser.add_argument('--limit', type=int, default=500)
  parser.add_argument('--batch_tokens', type=int, default=4096)
  parser.add_argument('--dtype', default='float32')
  args = parser.parse_args()
  from data.tokenizer import load_tokenizer
  from eval import benchmarks
  from models.checkpoint import load_model
  task = benchmarks.load_task(args.task, 0, args.limit, args.style)
  pairs = [(p, c) for d in task['docs'] for p, c in zip(d['prompts'], d['continuations'])]
  model, _ = load_model(args.workdir, dtype=args.dtype)
  tok = load_tokenizer(args.workdir)
  result = {'task': args.task, 'style': args.style, 'items': len(task['docs']),
            'continuations': len(pairs)}
  sums = {}
  for name, share in (('shared', True), ('per_choice', False)):
    scorer = benchmarks.Scorer(model, tok, args.batch_tokens, share_prefix=share)
    start = time.perf_counter()
    scorer(pairs)  # compiles every shape
    result[f'{name}_first_pass_s'] = round(time.perf_counter() - start, 1)
    result[f'{name}_shapes'] = len(scorer.shapes_compiled)
    start = time.perf_counter()
    sums[name] = np.array(scorer(pairs))
    seconds = time.perf_counter() - start
    result[f'{name}_continuations_per_s'] = round(len(pairs) / seconds, 1)
    result[f'{name}_tokens_computed'] = scorer.tokens_computed
  result['speedup'] = round(result['shared_continuations_per_s']
                            / result['per_choice_continuations_per_s'], 2)
  result['max_abs_loglikelihood_diff'] = float(np.max(np.abs(sums['shared'] - sums['per_choice'])))
  print(json.dumps(result))


if __name__ == '__main__':
  main()
