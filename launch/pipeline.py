"""The end-to-end runner: tokenizer -> pretrain -> eval -> samples (later stages extend it).

  python -m launch.pipeline --config=configs/pipeline.py:demo --workdir=runs/demo

Each stage runs in WORKDIR/<stage> with the same outputs as when run alone, so any stage can be
inspected, evaluated or resumed with its own command. Rerunning the pipeline resumes the stage that
was interrupted and skips the finished ones (their trainers find the final checkpoint).
"""
import json
import os
import time

import jax
from absl import flags
from ml_collections import config_flags

from configs import entry
from data.tokenizer import load_tokenizer
from eval.perplexity import evaluate_perplexity
from models import checkpoint
from serving.sampling import generate
from trainers import pretrain


def _table(rows: list[tuple[str, str, str]]) -> str:
  widths = [max(len(r[i]) for r in rows) for i in range(3)]
  line = lambda r: '  '.join(c.ljust(w) for c, w in zip(r, widths))
  return '\n'.join([line(rows[0]), line(tuple('-' * w for w in widths))] + [line(r) for r in rows[1:]])


def run(config, workdir: str) -> dict:
  os.makedirs(workdir, exist_ok=True)
  report, rows = {}, [('stage', 'measure', 'value')]

  t0 = time.time()
  pre_dir = os.path.join(workdir, 'pretrain')
  result = pretrain.run(config.pretrain, pre_dir)
  if not result.completed:
    raise SystemExit(143)
  with open(os.path.join(pre_dir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  model_cfg = checkpoint.load_model_config(pre_dir)
  speeds = [r['tokens_per_s'] for r in records if r.get('tokens_per_s')]
  report['pretrain'] = {'params': model_cfg.num_params(), 'steps': result.step,
                        'first_loss': records[0]['loss'], 'final_loss': records[-1]['loss'],
                        'tokens_per_s': sorted(speeds)[len(speeds) // 2] if speeds else 0.0,
                        'seconds': time.time() - t0}
  p = report['pretrain']
  rows += [('tokenizer', 'vocabulary', f'{model_cfg.vocab_size:,} BPE'),
           ('pretrain', 'parameters', f'{p["params"]:,} ({config.pretrain.model.preset})'),
           ('pretrain', 'steps x batch x seq', f'{p["steps"]} x {config.pretrain.train.batch_size}'
                                               f' x {config.pretrain.data.seq_len}'),
           ('pretrain', 'train loss', f'{p["first_loss"]:.3f} (step {records[0]["step"]}) -> '
                                      f'{p["final_loss"]:.3f}'),
           ('pretrain', 'tokens/s (median)', f'{p["tokens_per_s"]:,.0f}'),
           ('pretrain', 'wall time', f'{p["seconds"]:.0f} s')]

  ev = evaluate_perplexity(pre_dir)
  report['eval'] = ev
  rows += [('eval', 'held-out perplexity', f'{ev["perplexity"]:.1f} (uniform: '
                                           f'{model_cfg.vocab_size:,})'),
           ('eval', 'next-token accuracy', f'{ev["accuracy"]:.3f}')]

  s = config.samples
  tokenizer = load_tokenizer(pre_dir)
  prompts = [tokenizer.encode(text, bos=True) for text in s.prompts]
  outs = generate(result.model, prompts, max_new_tokens=s.max_new_tokens,
                  temperature=s.temperature, top_k=s.top_k, seed=config.pretrain.seed,
                  eos_id=tokenizer.eos_id)
  report['samples'] = [{'prompt': t, 'continuation': tokenizer.decode(o)}
                       for t, o in zip(s.prompts, outs)]

  with open(os.path.join(workdir, 'report.json'), 'w') as f:
    json.dump(report, f, indent=2)
  print('\nSamples:')
  for sample in report['samples']:
    print(f'--- {sample["prompt"]!r}\n{sample["prompt"]}{sample["continuation"]}')
  print(f'\nDevice: {jax.devices()[0].device_kind} x {jax.device_count()}\n')
  print(_table(rows))
  print(f'\nEverything is in {workdir}/ (report.json, pretrain/metrics.jsonl, pretrain/tb, ...).')
  return report


def main():
  config = config_flags.DEFINE_config_file('config', 'configs/pipeline.py:demo',
                                           'Pipeline config file:preset.', lock_config=True)
  workdir = flags.DEFINE_string('workdir', 'runs/demo', 'Pipeline directory.')

  def _main(argv):
    del argv
    run(config.value, workdir.value)

  entry.run_main(_main)


if __name__ == '__main__':
  main()
