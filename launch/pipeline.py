"""The end-to-end runner: tokenizer -> pretrain -> eval -> samples -> SFT -> accuracy -> GRPO ->
reward model -> PPO -> DPO, each scored on the same held-out problems (exact match; for the
preference stages also the reward model's score of the greedy answers).

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
from eval.accuracy import describe_change, evaluate_accuracy, paired_comparison
from eval.perplexity import evaluate_perplexity
from eval.reward import evaluate_reward_accuracy, score_policy
from launch.onpolicy_pairs import make_pairs
from models import checkpoint
from serving import offline
from serving.engine import SamplingParams
from trainers import dpo, grpo, ppo, pretrain, reward, sft
from trainers.metrics import read_metrics


def _table(rows: list[tuple[str, str, str]]) -> str:
  widths = [max(len(r[i]) for r in rows) for i in range(3)]
  line = lambda r: '  '.join(c.ljust(w) for c, w in zip(r, widths))
  return '\n'.join([line(rows[0]), line(tuple('-' * w for w in widths))] + [line(r) for r in rows[1:]])


def matmul_rate(n: int = 2048) -> float:
  """The device's fp32 matmul rate in GFLOP/s (best of 3 x 5 products of n x n), printed with the
  demo's timings so that they can be compared across machines."""
  x = jax.numpy.ones((n, n), jax.numpy.float32)
  product = jax.jit(lambda a: a @ a)
  product(x).block_until_ready()
  best = float('inf')
  for _ in range(3):
    start = time.perf_counter()
    for _ in range(5):
      product(x).block_until_ready()
    best = min(best, (time.perf_counter() - start) / 5)
  return 2 * n ** 3 / best / 1e9


def _train_stage(module, cfg, stage_dir: str, init_from: str = ''):
  """Runs a trainer stage in stage_dir, starting from init_from unless its config names another
  run, and stops the pipeline (exit 143, as the stages do) if it stopped early.
  -> (loop.Result, seconds)."""
  t0 = time.time()
  cfg.init_from = cfg.init_from or init_from
  result = module.run(cfg, stage_dir)
  if not result.completed:
    raise SystemExit(143)
  return result, time.time() - t0


def run(config, workdir: str) -> dict:
  os.makedirs(workdir, exist_ok=True)
  report, rows = {}, [('stage', 'measure', 'value')]

  pre_dir = os.path.join(workdir, 'pretrain')
  result, seconds = _train_stage(pretrain, config.pretrain, pre_dir)
  records = read_metrics(os.path.join(pre_dir, 'metrics.jsonl'))
  model_cfg = checkpoint.load_model_config(pre_dir)
  def median(key):
    values = sorted(r[key] for r in records if r.get(key))
    return values[len(values) // 2] if values else 0.0
  report['pretrain'] = {'params': model_cfg.num_params(), 'steps': result.step,
                        'first_loss': records[0]['loss'], 'final_loss': records[-1]['loss'],
                        'tokens_per_s': median('tokens_per_s'),
                        'tflops_per_device': median('tflops_per_device'), 'mfu': median('mfu'),
                        'seconds': seconds}
  p = report['pretrain']
  rows += [('tokenizer', 'vocabulary', f'{model_cfg.vocab_size:,} BPE'),
           ('pretrain', 'parameters', f'{p["params"]:,} ({config.pretrain.model.preset})'),
           ('pretrain', 'steps x batch x seq', f'{p["steps"]} x {config.pretrain.train.batch_size}'
                                               f' x {config.pretrain.data.seq_len}'),
           ('pretrain', 'train loss', f'{p["first_loss"]:.3f} (step {records[0]["step"]}) -> '
                                      f'{p["final_loss"]:.3f}'),
           ('pretrain', 'tokens/s (median)', f'{p["tokens_per_s"]:,.0f} '
                                             f'({p["tflops_per_device"]:.2f} model TFLOP/s per '
                                             'device' + (f', MFU {p["mfu"]:.1%}' if p['mfu'] else
                                                         '') + ')'),
           ('pretrain', 'wall time', f'{p["seconds"]:.0f} s')]

  ev = evaluate_perplexity(pre_dir)
  report['eval'] = ev
  rows += [('eval', 'held-out perplexity', f'{ev["perplexity"]:.1f} (uniform: '
                                           f'{model_cfg.vocab_size:,})'),
           ('eval', 'next-token accuracy', f'{ev["accuracy"]:.3f}')]

  s = config.samples
  tokenizer = load_tokenizer(pre_dir)
  prompts = [tokenizer.encode_prompt(text) for text in s.prompts]
  outs = offline.generate(
      offline.engine_for(result.model, prompts, s.max_new_tokens, tokenizer=tokenizer), prompts,
      max_tokens=s.max_new_tokens, eos_id=tokenizer.eos_id,
      sampling=SamplingParams(temperature=s.temperature, top_k=s.top_k, seed=config.pretrain.seed))
  report['samples'] = [{'prompt': t, 'continuation': o.text} for t, o in zip(s.prompts, outs)]

  rows += _sft_stage(config, workdir, pre_dir, report)
  rows += _grpo_stage(config, workdir, os.path.join(workdir, 'sft'), report)
  rows += _preference_stages(config, workdir, os.path.join(workdir, 'sft'), report)

  with open(os.path.join(workdir, 'report.json'), 'w') as f:
    json.dump(report, f, indent=2)
  print('\nSamples:')
  for sample in report['samples']:
    print(f'--- {sample["prompt"]!r}\n{sample["prompt"]}{sample["continuation"]}')
  rate = matmul_rate()
  report['device'] = {'kind': jax.devices()[0].device_kind, 'count': jax.device_count(),
                      'fp32_matmul_gflops': rate}
  rows.append(('device', 'fp32 matmul', f'{rate:,.0f} GFLOP/s ({jax.devices()[0].device_kind} x '
                                        f'{jax.device_count()}; compare when timings differ)'))
  print(_table(rows))
  s = report['sft']['samples'][0]
  print(f'SFT sample: {s["question"]!r} -> {s["answer"]!r} (expected {s["expected"]})\n')
  s = report['grpo']['samples'][0]
  print(f'GRPO sample: {s["question"]!r} -> {s["answer"]!r} (expected {s["expected"]})\n')
  print(f'Everything is in {workdir}/ (report.json, pretrain/, sft/, grpo/, reward/, ppo/, dpo/ '
        f'with metrics.jsonl, tb, ...).')
  return report


def _sft_stage(config, workdir: str, pre_dir: str, report: dict) -> list[tuple[str, str, str]]:
  """Fine-tunes the pretrained model on arithmetic problems and scores both on held-out ones."""
  sft_dir = os.path.join(workdir, 'sft')
  result, seconds = _train_stage(sft, config.sft, sft_dir, pre_dir)
  before = evaluate_accuracy(pre_dir, task_from=sft_dir)  # The same problems, pretrained model.
  after = evaluate_accuracy(sft_dir)
  paired = paired_comparison(before['correct'], after['correct'])
  report['sft'] = {'steps': result.step, 'seconds': seconds, 'accuracy_before': before['accuracy'],
                   'accuracy_after': after['accuracy'], 'paired': paired,
                   'format_rate': after['format_rate'],
                   'eval_loss_before': before['eval_loss'],
                   'eval_loss_after': after['eval_loss'], 'samples': after['samples']}
  kind = f'LoRA rank {config.sft.lora.rank}' if config.sft.lora.rank else 'full'
  return [('sft', 'task', f'{config.sft.data.source} ({after["problems"]} held-out problems), '
                          f'{kind}, {result.step} steps'),
          ('sft', 'exact-match accuracy', describe_change(before['accuracy'], after['accuracy'],
                                                          paired, 'pretrained')),
          ('sft', 'answers showing working', f'{after["format_rate"]:.0%} (greedy)'),
          ('sft', 'held-out answer loss', f'{before["eval_loss"]:.2f} -> {after["eval_loss"]:.2f}'),
          ('sft', 'wall time', f'{seconds:.0f} s')]


def _grpo_stage(config, workdir: str, sft_dir: str, report: dict) -> list[tuple[str, str, str]]:
  """GRPO from the SFT model on the same task, scored on the same held-out problems."""
  grpo_dir = os.path.join(workdir, 'grpo')
  c = config.grpo
  result, seconds = _train_stage(grpo, c, grpo_dir, sft_dir)
  after = evaluate_accuracy(grpo_dir)
  before = evaluate_accuracy(c.init_from, task_from=grpo_dir)
  records = [r for r in read_metrics(os.path.join(grpo_dir, 'metrics.jsonl')) if r['step'] > 0]
  mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)
  n = max(1, min(5, len(records) // 4))
  split = {k: mean(records, f'time_{k}_s') for k in ('generate', 'logprobs', 'update', 'step')}
  report['grpo'] = {'steps': result.step, 'seconds': seconds, 'accuracy_before': before['accuracy'],
                    'accuracy_after': after['accuracy'],
                    'paired': paired_comparison(before['correct'], after['correct']),
                    'format_rate_before': before['format_rate'],
                    'format_rate_after': after['format_rate'],
                    'reward_first': mean(records[:n], 'reward_mean'),
                    'reward_last': mean(records[-n:], 'reward_mean'),
                    'time_split': split, 'samples': after['samples']}
  g = report['grpo']
  pct = lambda k: f'{split[k] / split["step"]:.0%}'
  kind = f'LoRA rank {c.lora.rank}' if c.lora.rank else 'full'
  return [('grpo', 'task', f'{c.data.source}, {c.train.batch_size // c.grpo.num_generations} '
                           f'prompts x {c.grpo.num_generations} samples, {result.step} steps, '
                           f'{kind}, loss {c.grpo.loss_type}'),
          ('grpo', 'exact-match accuracy', describe_change(g['accuracy_before'],
                                                           g['accuracy_after'], g['paired'],
                                                           'SFT')),
          ('grpo', 'answers showing working', f'{g["format_rate_before"]:.0%} (SFT) -> '
                                              f'{g["format_rate_after"]:.0%}'),
          ('grpo', 'mean reward', f'{g["reward_first"]:.2f} (first {n} steps) -> '
                                  f'{g["reward_last"]:.2f} (last {n})'),
          ('grpo', 'step time split', f'generation {pct("generate")}, log-probs '
                                      f'{pct("logprobs")}, updates {pct("update")}'),
          ('grpo', 'wall time', f'{seconds:.0f} s')]


def _preference_stages(config, workdir: str, sft_dir: str,
                       report: dict) -> list[tuple[str, str, str]]:
  """The RLHF stages from the SFT model: a reward model on preference pairs, PPO against it, and
  DPO on the pairs; each policy scored by exact match and by the reward model's mean score of
  its greedy answers to the same held-out problems."""
  rows = []
  rm_dir = os.path.join(workdir, 'reward')
  c = config.reward
  result, seconds = _train_stage(reward, c, rm_dir, sft_dir)
  acc = evaluate_reward_accuracy(rm_dir)
  start = read_metrics(os.path.join(rm_dir, 'metrics.jsonl'))[0]  # The step-0 eval.
  report['reward'] = {'steps': result.step, 'seconds': seconds, 'accuracy': acc['accuracy'],
                      'accuracy_start': start['eval_accuracy'], 'margin': acc['margin'],
                      'pairs': acc['pairs']}
  kind = f'LoRA rank {c.lora.rank}' if c.lora.rank else 'full'
  reads = 'head + likelihood' if c.reward.likelihood else 'head'
  rows += [('reward', 'pairs', f'{c.data.source}: correct vs corrupted solutions, {kind}, '
                               f'{reads}, {result.step} steps'),
           ('reward', 'held-out pair accuracy', f'{start["eval_accuracy"]:.2f} (step 0) -> '
                                                f'{acc["accuracy"]:.2f} ({acc["pairs"]} pairs)'),
           ('reward', 'wall time', f'{seconds:.0f} s')]

  for name, module, cfg in (('ppo', ppo, config.ppo), ('dpo', dpo, config.dpo)):
    t0 = time.time()  # The DPO stage's time includes making its pairs.
    stage_dir = os.path.join(workdir, name)
    if name == 'ppo':
      cfg.ppo.reward_model = cfg.ppo.reward_model or rm_dir
    else:  # On-policy pairs of the SFT model, made once (a rerun reuses the file).
      pairs_path = os.path.join(workdir, 'dpo_pairs.jsonl')
      summary_path = os.path.join(workdir, 'dpo_pairs.json')
      if not (os.path.exists(pairs_path) and os.path.exists(summary_path)):
        made = make_pairs(sft_dir, out=pairs_path, k=config.onpolicy.k,
                          num_prompts=config.onpolicy.num_prompts)
        made['seconds'] = time.time() - t0
        with open(summary_path, 'w') as f:
          json.dump(made, f, indent=2)
      with open(summary_path) as f:
        made = json.load(f)
      report['dpo_pairs'] = made
      rows.append(('dpo', 'on-policy pairs', f'{made["pairs"]} of {made["prompts"]} prompts x '
                                             f'{made["samples_per_prompt"]} samples (score '
                                             f'{made["chosen_score_mean"]:.2f} vs '
                                             f'{made["rejected_score_mean"]:.2f}), '
                                             f'{made["seconds"]:.0f} s'))
      cfg.data.source = pairs_path
    result, _ = _train_stage(module, cfg, stage_dir, sft_dir)
    seconds = time.time() - t0
    after = score_policy(rm_dir, stage_dir)
    # The SFT model on this stage's own held-out problems (the stages' configs may hold out
    # other ones than the SFT run's), so that the two are compared problem by problem.
    before = score_policy(rm_dir, sft_dir, task_from=stage_dir)
    paired = paired_comparison(before['correct'], after['correct'])
    report[name] = {'steps': result.step, 'seconds': seconds, 'accuracy_before':
                    before['accuracy'], 'accuracy_after': after['accuracy'], 'paired': paired,
                    'score_before': before['score_mean'], 'score_after': after['score_mean']}
    kind = f'LoRA rank {cfg.lora.rank}' if cfg.lora.rank else 'full'
    what = (f'{cfg.train.batch_size} prompts x {cfg.ppo.epochs} epochs, {kind}, {result.step} '
            f'steps' if name == 'ppo' else
            f'loss {cfg.dpo.loss_type}, {kind}, {result.step} steps of {cfg.train.batch_size} '
            f'pairs')
    rows += [(name, 'setting', what),
             (name, 'exact-match accuracy', describe_change(before['accuracy'],
                                                            after['accuracy'], paired, 'SFT')),
             (name, 'reward-model score', f'{before["score_mean"]:.2f} (SFT) -> '
                                          f'{after["score_mean"]:.2f}')]
    if name == 'ppo':
      records = [r for r in read_metrics(os.path.join(stage_dir, 'metrics.jsonl'))
                 if r['step'] > 0]
      report[name]['kl_last'] = records[-1]['kl']
      rows.append((name, 'KL to SFT (per token)', f'{records[-1]["kl"]:.3f} at the last step'))
    rows.append((name, 'wall time', f'{seconds:.0f} s'))
  return rows


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
