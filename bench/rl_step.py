"""One GRPO step, measured: where its time goes, our engine's rollout speed against Hugging Face
`generate` on the same prompts, and the memory that chunked log-probs save.

  python -m bench.rl_step                                   # CPU: the demo's SFT model
  python -m bench.rl_step --preset=374m --dtype=bfloat16 --prompts=16 --group=16 --new=512 \\
      --chunk=128                                           # a GPU shape, random weights

1. Step split: trainers/grpo.py through trainers/rl.py exactly as a run uses them (engine rollouts,
   old and reference log-probs, one update), --steps steps in a temporary workdir; the medians
   of the metrics each step logs (time_generate_s, time_logprobs_s, time_update_s) after the
   first, compiling, step. --init_from gives the tokenizer and prompts (the task of that SFT
   run); with --preset the weights are random (completions then run to --new tokens).
2. Rollouts, ours against Hugging Face: the same prompts, --group samples each at temperature
   1, at most --new tokens, stopping at the end-of-turn token; ours is serving/offline.generate
   (the G samples of a prompt share a prefill), HF is transformers' LlamaForCausalLM with the
   same weights, `generate(do_sample=True, num_return_sequences=G)`. Tokens/s counts the tokens
   each actually generated; each side's fastest of --repeat runs after a warm-up.
3. Memory: XLA's compiled temporary memory of the GRPO loss and gradient for one minibatch, with
   the log-probs computed at once (the [B, T, V] fp32 logits exist) and in --chunk-position
   chunks; the size of that logits tensor is printed beside it.
"""
import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np


def grpo_config(args):
  from configs import grpo as grpo_cfg
  c = grpo_cfg.get_config('small')
  c.init_from = args.init_from
  c.model.dtype = args.dtype
  c.mesh.data = 1
  c.train.steps = args.steps
  c.train.eval_every = 0
  c.train.log_every = 1
  c.train.checkpoint_every = 10 ** 6
  c.train.batch_size = args.prompts * args.group
  c.grpo.num_generations = args.group
  c.rl.max_completion_tokens = args.new
  c.rl.logprob_chunk = args.chunk
  c.rl.max_slots = args.prompts * args.group
  return c


def build(args, config):
  """(policy, rollouts, mesh) as trainers/grpo.run builds them, random weights with --preset."""
  from data import prompts as prompt_sources
  from data.tokenizer import load_tokenizer
  from models import llama, presets
  from trainers import common, rl
  tokenizer = load_tokenizer(args.init_from)
  train, held_out = prompt_sources.load_prompts(config.data, config.seed)
  mesh = common.mesh_from_config(config)
  if args.preset:
    cfg = presets.resolve(args.preset, dtype=args.dtype)
    if cfg.vocab_size < tokenizer.vocab_size:
      raise ValueError(f'--preset={args.preset} has a smaller vocabulary than the tokenizer')
    model = llama.create_model(cfg, seed=0, mesh=mesh, rules=config.sharding_rules)
  else:
    model = common.load_init_from(config, common.model_config(config, tokenizer.vocab_size), mesh)
  policy = rl.Policy(model, None, chunk=args.chunk, engine_dtype=rl.engine_dtype(config, model.cfg),
                     mesh=mesh)
  rollouts = rl.Rollouts(config, policy, tokenizer, train, held_out, group_size=args.group,
                         mesh=mesh, rules=config.sharding_rules)
  return policy, rollouts, mesh


def step_split(args):
  from trainers import grpo, rl
  config = grpo_config(args)
  policy, rollouts, mesh = build(args, config)
  with tempfile.TemporaryDirectory() as workdir:
    rl.train(config, workdir, policy, rollouts, grpo.make_algorithm(config), mesh=mesh,
             rules=config.sharding_rules)
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      records = [json.loads(line) for line in f][1:]  # the first step compiles
  med = lambda k: statistics.median(r[k] for r in records)
  return {k: med(k) for k in ('time_generate_s', 'time_logprobs_s', 'time_update_s',
                              'time_step_s', 'rollout_tokens_per_s', 'completion_len')}


def rollout_speed(args):
  import jax
  import torch
  import transformers
  from launch import hf_weights
  from serving import offline
  from serving.engine import SamplingParams
  config = grpo_config(args)
  policy, rollouts, _ = build(args, config)
  prompts = rollouts.train_tokens[:args.prompts]
  eos = rollouts.eos_id

  def ours():
    start = time.perf_counter()
    outs = offline.generate(rollouts.engine, prompts, params=policy.engine_params(
        policy.initial_params), n=args.group, max_tokens=args.new,
        sampling=SamplingParams(temperature=1.0, seed=int(time.time())), eos_id=eos)
    return sum(len(o.tokens) for o in outs), time.perf_counter() - start

  model_cfg = policy.engine_model.cfg
  hf_cfg = hf_weights.config_to_hf(model_cfg, rollouts.tokenizer.bos_id, eos)
  gpu = torch.cuda.is_available()
  dtype = torch.bfloat16 if args.dtype == 'bfloat16' else torch.float32
  hf = transformers.AutoModelForCausalLM.from_config(
      transformers.AutoConfig.for_model(**{k: v for k, v in hf_cfg.items()
                                           if k != 'architectures'}), attn_implementation='sdpa')
  hf.load_state_dict({name: torch.from_numpy(a) for name, a in
                      hf_weights.hf_tensors(policy.engine_model)}, strict=False)
  hf = hf.to(dtype).to('cuda' if gpu else 'cpu').eval()

  def theirs():
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=hf.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts],
                        device=hf.device)
    if gpu:
      torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
      out = hf.generate(ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                        num_return_sequences=args.group, max_new_tokens=args.new,
                        eos_token_id=eos, pad_token_id=0)
    if gpu:
      torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    new = out[:, width:].cpu().numpy()
    # Tokens up to and including the first end-of-turn, as ours counts them.
    counted = sum(int(np.argmax(row == eos)) + 1 if (row == eos).any() else len(row) for row in new)
    return counted, seconds

  results = {}
  for name, fn in (('ours', ours), ('hf', theirs)):
    fn()  # warm-up (compiles ours)
    tokens, seconds = min((fn() for _ in range(args.repeat)), key=lambda r: r[1])
    results[name] = {'tokens': tokens, 'seconds': seconds, 'tokens_per_s': tokens / seconds}
  results['device'] = jax.devices()[0].device_kind
  return results


def logprob_memory(args):
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from trainers import grpo
  config = grpo_config(args)
  policy, rollouts, _ = build(args, config)
  rows = args.prompts * args.group
  length = rollouts.row_length
  batch = {'inputs': jnp.zeros((rows, length), jnp.int32),
           'targets': jnp.zeros((rows, length), jnp.int32),
           'positions': jnp.broadcast_to(jnp.arange(length), (rows, length)),
           'mask': jnp.ones((rows, length)), 'old_logp': jnp.zeros((rows, length)),
           'ref_logp': jnp.zeros((rows, length)), 'is_weight': jnp.ones((rows, length)),
           'advantages': jnp.ones((rows,))}
  out = {}
  for chunk in (0, args.chunk):
    config.rl.logprob_chunk = chunk
    loss_fn = grpo.make_algorithm(config).loss_fn

    def loss_and_grad(p, b):
      return jax.grad(lambda p: (lambda s, w, _: s / w)(*loss_fn(
          nnx.merge(policy.graphdef, p, policy.frozen), b, None)))(p)

    compiled = jax.jit(loss_and_grad).lower(policy.initial_params, batch).compile()
    out[chunk] = compiled.memory_analysis().temp_size_in_bytes

  def body_only(p, b):  # The same model without its vocabulary projection: the baseline.
    return jax.grad(lambda p: nnx.merge(policy.graphdef, p, policy.frozen)(
        b['inputs'], b['positions'], return_hidden=True).astype(jnp.float32).sum())(p)

  base = jax.jit(body_only).lower(policy.initial_params, batch).compile()
  vocab = policy.engine_model.cfg.vocab_size
  return {'rows': rows, 'length': length, 'vocab': vocab,
          'logits_bytes': rows * length * vocab * 4, 'temp_bytes_unchunked': out[0],
          'temp_bytes_chunked': out[args.chunk], 'chunk': args.chunk,
          'temp_bytes_without_head': base.memory_analysis().temp_size_in_bytes}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--init_from', default='runs/demo/sft',
                      help='SFT workdir: tokenizer, task, and the weights unless --preset')
  parser.add_argument('--preset', default='', help='random weights of this preset instead')
  parser.add_argument('--dtype', default='bfloat16', help='trainer compute dtype (the engine '
                      'follows rl.engine_dtype: float32 on a CPU)')
  parser.add_argument('--prompts', type=int, default=8)
  parser.add_argument('--group', type=int, default=8)
  parser.add_argument('--new', type=int, default=40, help='max completion tokens')
  parser.add_argument('--chunk', type=int, default=32, help='log-prob chunk (positions)')
  parser.add_argument('--steps', type=int, default=6)
  parser.add_argument('--repeat', type=int, default=3)
  parser.add_argument('--parts', default='split,rollout,memory')
  args = parser.parse_args()
  if not os.path.isdir(args.init_from):
    raise SystemExit(f'--init_from={args.init_from} does not exist (run `make demo` first, or '
                     'pass an SFT workdir)')
  import jax
  print(f'device {jax.devices()[0].device_kind}; {args.prompts} prompts x {args.group} samples, '
        f'<= {args.new} new tokens, dtype {args.dtype}, model '
        f'{args.preset or args.init_from}')
  parts = args.parts.split(',')
  if 'split' in parts:
    s = step_split(args)
    total = s['time_step_s']
    print(f'GRPO step (median of {args.steps - 1}): {total:.2f} s = generation '
          f'{s["time_generate_s"]:.2f} s ({s["time_generate_s"] / total:.0%}), log-probs '
          f'{s["time_logprobs_s"]:.2f} s ({s["time_logprobs_s"] / total:.0%}), update '
          f'{s["time_update_s"]:.2f} s ({s["time_update_s"] / total:.0%}); rollouts '
          f'{s["rollout_tokens_per_s"]:,.0f} tokens/s, {s["completion_len"]:.1f} tokens each')
  if 'rollout' in parts:
    r = rollout_speed(args)
    print(f'rollouts, same prompts: ours {r["ours"]["tokens_per_s"]:,.0f} tokens/s '
          f'({r["ours"]["tokens"]} tokens in {r["ours"]["seconds"]:.2f} s), HF generate '
          f'{r["hf"]["tokens_per_s"]:,.0f} tokens/s ({r["hf"]["tokens"]} in '
          f'{r["hf"]["seconds"]:.2f} s): {r["ours"]["tokens_per_s"] / r["hf"]["tokens_per_s"]:.1f}x')
  if 'memory' in parts:
    m = logprob_memory(args)
    mib = lambda b: f'{b / 2 ** 20:,.1f} MiB'
    head = lambda k: m[k] - m['temp_bytes_without_head']
    print(f'loss + gradient of {m["rows"]} rows x {m["length"]} positions, vocab {m["vocab"]} '
          f'(the fp32 logits: {mib(m["logits_bytes"])}): XLA temporary memory '
          f'{mib(m["temp_bytes_unchunked"])} at once, {mib(m["temp_bytes_chunked"])} in chunks of '
          f'{m["chunk"]}; of which the vocabulary projection (over the '
          f'{mib(m["temp_bytes_without_head"])} of the model without it): '
          f'{mib(head("temp_bytes_unchunked"))} at once, {mib(head("temp_bytes_chunked"))} '
          f'chunked ({head("temp_bytes_unchunked") / max(head("temp_bytes_chunked"), 1):.1f}x less)')


if __name__ == '__main__':
  main()
