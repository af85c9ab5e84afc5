"""The training loop every stage shares.

A stage supplies a model, a loss function and its data; this loop does the rest the same way for
all of them: AdamW with warmup and cosine decay, global-norm clipping, gradient accumulation, a
jit-compiled step with donated state, a NaN/Inf guard, held-out eval, metrics, progress, orbax
checkpoints (parameters, optimizer state and the data iterator), exact resumption and saving on
SIGTERM (Cloud TPU preemption).

The loss function has the signature

    loss_fn(model, batch, rng) -> (loss_sum, weight, metric_sums)

returning sums (e.g. summed token cross-entropy, token count, summed correct predictions) so that
micro-batches combine exactly: the step's loss is sum(loss_sum) / sum(weight), and each metric is
sum(metric) / sum(weight).
"""
import dataclasses
import signal
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding

from models import presets
from models.checkpoint import Checkpointer
from models.sharding import logical_to_mesh
from trainers.metrics import MetricsWriter

LossFn = Callable[[nnx.Module, dict, jax.Array], tuple[jax.Array, jax.Array, dict]]


SCHEDULES = ('cosine', 'linear', 'wsd')
DECAY_SHAPES = ('linear', '1-sqrt')


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup from 0 to the peak over optimizer.warmup_steps, then to peak * min_lr_ratio at
  train.steps: a cosine or a straight line (`optimizer.schedule`), or 'wsd' (warmup-stable-
  decay, as MiniCPM, Hu et al., 2024, and SmolLM2 trained): the peak until the last
  optimizer.decay_fraction of the steps, then a linear or 1-sqrt decay (Hägele et al., 2024,
  "Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations"). A wsd run
  stopped before its decay can be resumed with a larger train.steps and has trained exactly as
  a run given those steps from the start (tested)."""
  o, steps = config.optimizer, config.train.steps
  warmup = min(o.warmup_steps, max(steps - 1, 0))
  peak, end = o.learning_rate, o.learning_rate * o.min_lr_ratio
  kind = o.get('schedule', 'cosine')
  if kind not in SCHEDULES:
    raise ValueError(f'optimizer.schedule={kind!r} is not one of {", ".join(SCHEDULES)}')
  if kind == 'cosine':
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup,
        decay_steps=max(steps, warmup + 1), end_value=end)
  warm = optax.linear_schedule(0.0, peak, warmup)
  if kind == 'linear':
    return optax.join_schedules([warm, optax.linear_schedule(peak, end, max(steps - warmup, 1))],
                                [warmup])
  if not 0 < o.decay_fraction <= 1:
    raise ValueError(f'optimizer.decay_fraction={o.decay_fraction} is not in (0, 1]')
  if o.decay_shape not in DECAY_SHAPES:
    raise ValueError(f'optimizer.decay_shape={o.decay_shape!r} is not one of '
                     f'{", ".join(DECAY_SHAPES)}')
  decay_start = max(steps - round(o.decay_fraction * steps), warmup)
  n_decay = max(steps - decay_start, 1)

  def decay(count):
    done = jnp.clip(count / n_decay, 0.0, 1.0)
    return end + (peak - end) * (1.0 - (done if o.decay_shape == 'linear' else jnp.sqrt(done)))

  return optax.join_schedules([warm, optax.constant_schedule(peak), decay],
                              [warmup, decay_start])


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  o = config.optimizer
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # No decay on norms.
  return optax.chain(
      optax.clip_by_global_norm(o.grad_clip) if o.grad_clip > 0 else optax.identity(),
      optax.adamw(learning_rate_schedule(config), b1=o.b1, b2=o.b2, eps=o.eps,
                  weight_decay=o.weight_decay, mask=decay_mask))


@dataclasses.dataclass
class Result:
  model: nnx.Module  # The trained model (trainable parameters merged back in).
  step: int  # The last step done.
  completed: bool  # False when stopped early (SIGTERM or train.stop_after).
  metrics: dict  # The last logged metrics.


class Preemption:
  """Turns SIGTERM into a flag the loop checks after every step."""

  def __init__(self):
    self.requested = False

  def __enter__(self):
    self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    self.requested = True

  def __exit__(self, *exc):
    signal.signal(signal.SIGTERM, self._previous)


def batch_sharding(mesh, rules) -> NamedSharding:
  return NamedSharding(mesh, logical_to_mesh(('act_batch',), rules))


def to_global_batch(batch: dict, sharding: NamedSharding) -> dict:
  """This process's rows -> one global array per field, laid out over the batch axes."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def _accumulate(loss_and_grad, params, batch, rng, micro_batches):
  """Sums loss, weight, metrics and gradients over micro-batches (a scan keeps memory flat)."""
  if micro_batches == 1:
    return loss_and_grad(params, batch, rng)
  split = jax.tree.map(lambda x: x.reshape(micro_batches, -1, *x.shape[1:]), batch)
  (sums, grads) = jax.eval_shape(loss_and_grad, params, jax.tree.map(lambda x: x[0], split), rng)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (sums, grads))

  def body(carry, xs):
    mb, i = xs
    out = loss_and_grad(params, mb, jax.random.fold_in(rng, i))
    return jax.tree.map(jnp.add, carry, out), None

  total, _ = jax.lax.scan(body, zeros, (split, jnp.arange(micro_batches)))
  return total


def metric_means(metric_sums: dict, weight) -> dict:
  """A loss function's metric sums as means: sum / the loss weight, or sum / count for a metric
  given as a (sum, count) pair (one with its own normaliser, such as a per-token rate in a loss
  weighted per sequence)."""
  return {k: v[0] / jnp.maximum(v[1], 1.0) if isinstance(v, tuple) else v / weight
          for k, v in metric_sums.items()}


def make_train_step(config: ml_collections.ConfigDict, graphdef, frozen, loss_fn: LossFn,
                    tx: optax.GradientTransformation):
  """The optimizer step every stage shares (the RL stages call it once per minibatch):

    train_step(params, opt_state, batch, step) -> (params, opt_state, metrics)

  summing the loss over config.train.grad_accum micro-batches, dividing by the summed weight,
  applying tx, and guarding against non-finite values. The step's random key is
  fold_in(key(config.seed), step). Jit it with donate_argnums=(0, 1).
  """
  t = config.train

  def loss_and_grad(p, batch, rng):
    def f(p):
      loss_sum, weight, metrics = loss_fn(nnx.merge(graphdef, p, frozen), batch, rng)
      return loss_sum, (weight, metrics)
    (loss_sum, (weight, metrics)), grads = jax.value_and_grad(f, has_aux=True)(p)
    return (loss_sum, weight, metrics), grads

  def train_step(params, opt_state, batch, step):
    rng = jax.random.fold_in(jax.random.key(config.seed), step)
    (loss_sum, weight, metric_sums), grads = _accumulate(
        loss_and_grad, params, batch, rng, t.grad_accum)
    weight = jnp.maximum(weight, 1.0)
    grads = jax.tree.map(lambda g: g / weight, grads)
    loss, grad_norm = loss_sum / weight, optax.global_norm(grads)
    updates, new_opt_state = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    # The guard: a non-finite loss or gradient leaves parameters and optimizer state untouched;
    # the host sees `finite` and stops, so nothing bad is ever applied or saved.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    out = {'loss': loss, 'grad_norm': grad_norm, 'finite': finite,
           **metric_means(metric_sums, weight)}
    return keep(new_params, params), keep(new_opt_state, opt_state), out

  return train_step


def raise_if_not_finite(out: dict, step: int, last_good_step: int | None):
  """Stops the run after train_step reported a non-finite loss or gradient (never applied)."""
  if not out['finite']:
    raise FloatingPointError(
        f'loss or gradient became NaN/Inf at or before step {step} (loss={out["loss"]}, '
        f'grad_norm={out["grad_norm"]}); the update was not applied and the newest good '
        f'checkpoint (step {last_good_step}) is kept. Lower optimizer.learning_rate '
        f'or check the data.')


def init_optimizer_state(tx: optax.GradientTransformation, params, mesh):
  """tx.init(params), every leaf placed on the mesh."""
  opt_state = tx.init(params)  # Eager: zeros_like keeps each parameter's sharding.
  # Scalars such as Adam's step count come out on one device; replicate them over the mesh up
  # front, or the first step returns them resharded and the second step compiles again.
  replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.tree.map(
      lambda x: x if isinstance(getattr(x, 'sharding', None), NamedSharding)
      else jax.device_put(x, replicated), opt_state)


def train(config: ml_collections.ConfigDict, workdir: str, model: nnx.Module, loss_fn: LossFn,
          train_iter: Iterator[dict], eval_batches: list[dict] | dict[str, list[dict]] | None,
          *, mesh, rules, trainable: Any = nnx.Param, extra_meta: dict | None = None,
          token_loss: bool = True, eval_at_start: bool = False,
          flops_per_token: float = 0.0) -> Result:
  """Trains `model` in place of its `trainable` variables for config.train.steps steps.

  Resumes from the newest checkpoint in workdir/checkpoints if there is one (model, optimizer and
  data iterator), so running the same command again continues the run exactly. token_loss says
  the loss is a mean token cross-entropy, so exp(eval_loss) is reported as eval_perplexity.
  eval_at_start: a fresh run also writes the held-out eval of its starting point as step 0 (the
  origin of its curve, where that is not known in advance).
  flops_per_token (> 0: the model's training FLOPs per token, `LlamaConfig.
  train_flops_per_token`) adds `tflops_per_device` (achieved model TFLOP/s per device) and, on
  a device whose datasheet peak is known (models.presets.PEAK_FLOPS), `mfu`.
  """
  t = config.train
  if t.batch_size % t.grad_accum:
    raise ValueError(f'train.batch_size={t.batch_size} is not divisible by '
                     f'train.grad_accum={t.grad_accum}')
  graphdef, params, frozen = nnx.split(model, trainable, ...)
  tx = make_optimizer(config)
  opt_state = init_optimizer_state(tx, params, mesh)
  schedule = learning_rate_schedule(config)

  ckpt = Checkpointer(f'{workdir}/checkpoints', keep=t.keep_checkpoints)
  # The newest checkpoint that restores completely (damaged newer ones are skipped, said so).
  start, restored = ckpt.restore_newest(lambda s: ckpt.restore(s, params, opt_state, train_iter))
  start = start or 0
  if start:
    params, opt_state = restored['params'], restored['opt_state']
    print(f'Resumed from {workdir}/checkpoints/{start}.')
  if start >= t.steps or (t.stop_after and start >= t.stop_after):
    ckpt.close()  # Nothing to do: finished, or already stopped where train.stop_after says.
    return Result(nnx.merge(graphdef, params, frozen), start, start >= t.steps, {})

  train_step = make_train_step(config, graphdef, frozen, loss_fn, tx)

  def eval_step(params, batch):
    loss_sum, weight, metric_sums = loss_fn(nnx.merge(graphdef, params, frozen), batch,
                                            jax.random.key(0))
    return loss_sum, weight, metric_sums

  with jax.set_mesh(mesh):
    train_step = jax.jit(train_step, donate_argnums=(0, 1))
    eval_step = jax.jit(eval_step)
  sharding = batch_sharding(mesh, rules)

  def summarize(totals, suffix=''):
    loss_sum, weight, metric_sums = jax.device_get(totals)
    loss = float(loss_sum / weight)
    perplexity = ({f'eval_perplexity{suffix}': float(np.exp(min(loss, 50.0)))}
                  if token_loss else {})
    return {f'eval_loss{suffix}': loss, **perplexity,
            **{f'eval_{k}{suffix}': float(v)
               for k, v in metric_means(metric_sums, weight).items()}}

  def evaluate(params) -> dict:
    """The held-out metrics; for eval sets by name ({name: batches}, a pretraining mixture's
    sources) each set's as eval_loss_<name>, ... beside the pooled ones."""
    sets = eval_batches if isinstance(eval_batches, dict) else {'': eval_batches}
    totals, each = None, {}
    with jax.set_mesh(mesh):
      for name, batches in sets.items():
        mine = None
        for batch in batches:
          out = eval_step(params, to_global_batch(batch, sharding))
          mine = out if mine is None else jax.tree.map(jnp.add, mine, out)
        if name:
          each.update(summarize(mine, f'_{name}'))
        totals = mine if totals is None else jax.tree.map(jnp.add, totals, mine)
    return {**summarize(totals), **each}

  peak = presets.peak_flops(jax.devices()[0].device_kind)
  writer = MetricsWriter(workdir, start_step=start, total_steps=t.steps)
  meta = {'seed': config.seed, **(extra_meta or {})}  # The step RNG is fold_in(key(seed), step).
  last_metrics, step, stop_reason = {}, start, None
  window_start, window_tokens = None, 0
  if start == 0 and eval_at_start and eval_batches:
    writer.write(0, evaluate(params))
  try:
    with Preemption() as preemption:
      while step < t.steps:
        batch = to_global_batch(next(train_iter), sharding)
        tokens = int(np.prod(batch['inputs'].shape))
        with jax.set_mesh(mesh):
          params, opt_state, out = train_step(params, opt_state, batch, jnp.int32(step))
        step += 1
        ckpt.check()  # A checkpoint write that failed in the background stops the run now.
        if window_start is None:  # The first step compiles: time from the end of it.
          jax.block_until_ready(out['loss'])
          window_start, window_tokens = time.perf_counter(), 0
        else:
          window_tokens += tokens
        writer.advance()

        is_last = step == t.steps
        stop_reason = ('SIGTERM' if preemption.requested else
                       'train.stop_after' if t.stop_after and step >= t.stop_after else None)
        do_eval = eval_batches and (is_last or (t.eval_every and step % t.eval_every == 0))
        if step % t.log_every == 0 or is_last or do_eval or stop_reason:
          out = jax.device_get(out)
          raise_if_not_finite(out, step, ckpt.latest_step())
          elapsed = time.perf_counter() - window_start
          metrics = {'loss': float(out['loss']), 'lr': float(schedule(step - 1)),
                     'grad_norm': float(out['grad_norm']),
                     **{k: float(v) for k, v in out.items()
                        if k not in ('loss', 'grad_norm', 'finite')},
                     'tokens_per_s': window_tokens / elapsed if elapsed > 0 and window_tokens else 0.0}
          if flops_per_token:
            achieved = metrics['tokens_per_s'] * flops_per_token / jax.device_count()
            metrics['tflops_per_device'] = achieved / 1e12
            if peak:
              metrics['mfu'] = achieved / peak
          if do_eval:
            metrics.update(evaluate(params))
          writer.write(step, metrics)
          writer.advance(0, loss=metrics['loss'], tok_s=metrics['tokens_per_s'])
          last_metrics = metrics
          window_start, window_tokens = time.perf_counter(), 0
        if step % t.checkpoint_every == 0 or is_last or stop_reason:
          ckpt.save(step, params, opt_state, meta, train_iter, force=True)
        if stop_reason:
          print(f'Stopped at step {step} ({stop_reason}); checkpoint saved. '
                f'Run the same command again to resume.')
          break
  finally:
    try:
      ckpt.close()  # Raises a CheckpointError naming the path if the last write failed.
    finally:
      writer.close()
  return Result(nnx.merge(graphdef, params, frozen), step, step >= t.steps, last_metrics)
