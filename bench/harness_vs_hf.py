"""Our benchmark harness against transformers on the same weights and items, one run.

  python -m bench.harness_vs_hf --workdir=runs/smollm2 --task=arc_easy --limit=200

Exports the workdir as a Hugging Face directory (launch.export_checkpoint), scores the first
--limit items of the task with eval.benchmarks (ours) and with transformers'
AutoModelForCausalLM in float32 (the peer: the continuation's summed log-probs, tokenised as
lm-evaluation-harness does), and prints both accuracies, how often the two pick the same choice,
and the largest difference of a continuation's log-likelihood. A harness bug (tokenisation, the
split between prompt and continuation, an off-by-one in the summed positions) shows here; a gap
between ours and a published number that this does not show is the weights'.
"""
import argparse
import json
import subprocess
import sys
import tempfile

import numpy as np


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--task', default='arc_easy')
  parser.add_argument('--shots', type=int, default=0)
  parser.add_argument('--limit', type=int, default=200)
  args = parser.parse_args()
  import torch
  from transformers import AutoModelForCausalLM, AutoTokenizer
  from data.tokenizer import load_tokenizer
  from eval import benchmarks
  from models.checkpoint import load_model
  task = benchmarks.load_task(args.task, args.shots, args.limit)
  model, _ = load_model(args.workdir, dtype='float32')
  ours_ll = benchmarks.Scorer(model, load_tokenizer(args.workdir))(
      [(p, c) for d in task['docs'] for p, c in zip(d['prompts'], d['continuations'])])
  with tempfile.TemporaryDirectory() as out:
    subprocess.run([sys.executable, '-m', 'launch.export_checkpoint', f'--workdir={args.workdir}',
                    '--format=hf', f'--out={out}/hf'], check=True, capture_output=True)
    tok = AutoTokenizer.from_pretrained(f'{out}/hf')
    hf = AutoModelForCausalLM.from_pretrained(f'{out}/hf', torch_dtype=torch.float32).eval()
    bos = [tok.bos_token_id] if load_tokenizer(args.workdir).add_bos else []

    def ll(context, continuation):
      spaces = len(context) - len(context.rstrip(' '))
      if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
      whole = bos + tok(context + continuation, add_special_tokens=False)['input_ids']
      n_context = len(bos) + len(tok(context, add_special_tokens=False)['input_ids'])
      ids = torch.tensor([whole])
      with torch.no_grad():
        logp = torch.log_softmax(hf(ids).logits[0, :-1].float(), -1)
      return float(logp[torch.arange(len(whole) - 1), ids[0, 1:]][n_context - 1:].sum())

    peer_ll = [ll(p, c) for d in task['docs'] for p, c in zip(d['prompts'], d['continuations'])]
  i, agree, right, mine_right = 0, 0, 0, 0
  for d in task['docs']:
    k = len(d['continuations'])
    mine, theirs = int(np.argmax(ours_ll[i:i + k])), int(np.argmax(peer_ll[i:i + k]))
    agree += mine == theirs
    right += theirs == d['gold']
    mine_right += mine == d['gold']
    i += k
  n = len(task['docs'])
  print(json.dumps({'task': args.task, 'shots': args.shots, 'items': n, 'acc_ours': mine_right / n,
                    'acc_transformers': right / n, 'same_choice': agree / n,
                    'max_abs_loglikelihood_diff': float(np.max(np.abs(
                        np.array(ours_ll) - np.array(peer_ll))))}))


if __name__ == '__main__':
  main()
