"""Orbax checkpoints of a run, and loading a workdir's model for eval, serving and later stages.

Layout under WORKDIR/checkpoints/<step>/: `params` (the trained parameters), `opt_state`, `meta`
(step and anything else a stage keeps as JSON) and `data` (the grain iterator's position). Params
are their own item so eval and serving restore them alone, straight onto their own mesh. Saves are
asynchronous and atomic (orbax writes a temporary directory and renames it), so a crash mid-save
never damages the newest complete checkpoint.

Damage that happens outside a save (a half-finished copy to or from a bucket truncates files or
leaves out `commit_success.txt`) is found when restoring: a trainer resumes from the newest
checkpoint that restores completely, saying which it skipped and why, and moves the damaged ones
aside to WORKDIR/damaged_checkpoints/ (kept, never deleted) so that the run can save those steps
again; readers (eval, export, serving) stop with one CheckpointError naming the checkpoint, the
item that failed and the older steps to pass as --step.
"""
import contextlib
import dataclasses
import json
import os
import shutil

import jax
from flax import nnx
import orbax.checkpoint as ocp

from models.llama import Llama, abstract_model
from models.presets import LlamaConfig, resolve_dtype

MODEL_CONFIG_FILE = 'model.json'
COMMIT_FILE = 'commit_success.txt'  # Orbax writes it last, in the step and in each item.
DAMAGED_DIR = 'damaged_checkpoints'


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be restored, with what to do about it."""


def _first_line(e: BaseException, limit: int = 400) -> str:
  text = (f'{type(e).__name__}: {e}'.strip().splitlines() or [type(e).__name__])[0]
  return text if len(text) <= limit else text[:limit] + ' ...'


def abstract_tree(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class Checkpointer:

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=async_save))
    self._pending, self._failed = None, False  # The step of the save in flight; a write failed.

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def incomplete(self, step: int) -> str | None:
    """Why the step's directory is not a finished checkpoint, or None if it looks finished.

    Orbax writes commit_success.txt last, in the step and in each item. Its absence marks an
    unfinished save or copy only where the marker is in use: the step lacks it while another
    step has it, or one item lacks it while another item of the step has it (so an orbax
    version that writes none on this filesystem is judged by the restore alone)."""
    marked = lambda path: os.path.exists(os.path.join(path, COMMIT_FILE))
    top = self.step_dir(step)
    if not marked(top) and any(marked(self.step_dir(s)) for s in self.manager.all_steps()
                               if s != step and os.path.isdir(self.step_dir(s))):
      return f'{step} has no {COMMIT_FILE} (an unfinished save or copy)'
    items = [d for d in sorted(os.listdir(top)) if os.path.isdir(os.path.join(top, d))]
    unmarked = [d for d in items if not marked(os.path.join(top, d))]
    if unmarked and len(unmarked) < len(items):
      return f'{step}/{unmarked[0]} has no {COMMIT_FILE} (an unfinished save or copy)'
    return None

  def restore_newest(self, restore, log=print):
    """restore(step) for the newest step that is complete and restores; returns (step, result),
    or (None, None) with no checkpoints. Steps that fail are skipped with a line saying why and
    then moved aside to ../damaged_checkpoints/<step> (renamed, not deleted), so the run can
    save those step numbers again. Raises CheckpointError (closed) when none restores."""
    failures = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      why = self.incomplete(step)
      if why is None:
        try:
          result = restore(step)
        except Exception as e:  # Orbax and tensorstore raise many kinds.
          why = _first_line(e)
        else:
          if failures:
            self._set_aside([s for s, _ in failures], log)
          return step, result
      log(f'Skipping checkpoint {self.step_dir(step)}: {why}')
      failures.append((step, why))
    if failures:
      self.manager.close()  # An open manager's threads garble the traceback at exit.
      raise CheckpointError(
          f'no checkpoint under {self.directory} restores: '
          + '; '.join(f'step {s}: {why}' for s, why in failures)
          + '. Nothing was deleted; restore the directory from a good copy, or start the stage '
            'in a new --workdir.')
    return None, None

  def _set_aside(self, steps, log):
    damaged = os.path.join(os.path.dirname(self.directory), DAMAGED_DIR)
    os.makedirs(damaged, exist_ok=True)
    for step in steps:
      target = os.path.join(damaged, str(step))
      while os.path.exists(target):
        target += '_'
      shutil.move(self.step_dir(step), target)
      log(f'Moved the damaged checkpoint {self.step_dir(step)} to {target} (kept, not deleted).')
    self.manager.reload()

  def save(self, step: int, params, opt_state=None, meta: dict | None = None, data_iter=None,
           force: bool = False, extra: dict | None = None):
    """extra: more named pytrees saved as items of their own beside `params` (PPO's critic and
    its optimizer state), so readers that restore `params` alone never see them."""
    import grain  # Imported here: the params-only readers (serving) do not need grain.
    items = {'params': ocp.args.StandardSave(params),
             'meta': ocp.args.JsonSave(dict(meta or {}, step=step))}
    if opt_state is not None:
      items['opt_state'] = ocp.args.StandardSave(opt_state)
    for name, tree in (extra or {}).items():
      items[name] = ocp.args.StandardSave(tree)
    if hasattr(data_iter, 'get_state'):  # grain iterators; a plain iterator is not saved.
      items['data'] = grain.checkpoint.CheckpointSave(data_iter)
    self.wait()  # The previous asynchronous save must have landed (orbax waits anyway).
    try:
      self.manager.save(step, args=ocp.args.Composite(**items), force=force)
    except Exception as e:
      self._failed = True
      raise self._write_error(step, e) from e
    self._pending = step

  def _write_error(self, step: int | None, e: Exception) -> CheckpointError:
    try:
      free = f'{shutil.disk_usage(self.directory).free / 2**20:,.1f} MiB free'
    except OSError:
      free = 'free space unknown'
    good = [s for s in sorted(self.manager.all_steps(), reverse=True)
            if s != step and os.path.isdir(self.step_dir(s)) and self.incomplete(s) is None]
    target = self.step_dir(step) if step is not None else f'a checkpoint under {self.directory}'
    return CheckpointError(
        f'could not write {target} ({_first_line(e)}); {free} on {self.directory}. '
        + (f'The last good checkpoint, step {good[0]}, is intact: free space (or fix the '
           f'permissions) and run the same command again to resume from it.' if good else
           'There is no earlier checkpoint.'))

  def restore(self, step: int, params, opt_state=None, data_iter=None, extra: dict | None = None):
    """Restores into the shapes, dtypes and shardings of the given (live or abstract) trees;
    extra names the items `save` wrote beside params, with their target trees."""
    import grain
    items = {'params': ocp.args.StandardRestore(abstract_tree(params)),
             'meta': ocp.args.JsonRestore()}
    if opt_state is not None:
      items['opt_state'] = ocp.args.StandardRestore(abstract_tree(opt_state))
    for name, tree in (extra or {}).items():
      items[name] = ocp.args.StandardRestore(abstract_tree(tree))
    if hasattr(data_iter, 'get_state'):
      items['data'] = grain.checkpoint.CheckpointRestore(data_iter)
    return self.manager.restore(step, args=ocp.args.Composite(**items))

  def check(self):
    """Raises the CheckpointError of a finished asynchronous save that failed (non-blocking), so
    a run stops at its next step instead of its next checkpoint."""
    if self._failed or self._pending is None:
      return
    try:
      self.manager.check_for_errors()
    except Exception as e:
      self._failed = True
      raise self._write_error(self._pending, e) from e

  def wait(self):
    """Blocks until the last save is on disk; a CheckpointError naming it if it failed."""
    if self._failed:  # Already reported; the run is stopping.
      return
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # An asynchronous write failed in orbax's thread.
      self._failed = True
      raise self._write_error(self._pending, e) from e

  def close(self):
    """Waits for the last save (a CheckpointError if it failed), then closes the manager."""
    try:
      self.wait()
    finally:
      self.manager.close()


def save_model_config(workdir: str, cfg: LlamaConfig):
  with open(os.path.join(workdir, MODEL_CONFIG_FILE), 'w') as f:
    json.dump(dataclasses.asdict(cfg), f, indent=2)


def load_model_config(workdir: str, **overrides) -> LlamaConfig:
  path = os.path.join(workdir, MODEL_CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: {workdir!r} is not a workdir written by a trainer')
  with open(path) as f:
    fields = json.load(f)
  fields.update({k: v for k, v in overrides.items() if v is not None})
  # A reader's dtype='auto' is chosen for inference (float32 on a CPU); without an override the
  # dtype the run trained in, as model.json records it.
  fields['dtype'] = resolve_dtype(fields['dtype'], 'inference')
  return LlamaConfig(**fields)


def load_model(workdir: str, *, step: int | None = None, mesh=None, rules=None,
               **config_overrides) -> tuple[Llama, int]:
  """The model of a workdir at its newest (or the given) checkpoint, placed on `mesh`.

  config_overrides change non-architectural fields (dtype, attention, remat) for the reader.
  A LoRA/QLoRA workdir (one with models/lora.py's lora.json) gives its base with the adapters
  merged in: a plain Llama like any other. Returns (model, step).
  """
  cfg = load_model_config(workdir, **config_overrides)
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  ckpt = Checkpointer(ckpt_dir, async_save=False) if os.path.isdir(ckpt_dir) else None
  step = ckpt.latest_step() if step is None and ckpt else step
  if ckpt is None or step is None:
    raise FileNotFoundError(f'no checkpoint under {ckpt_dir}')
  try:
    if step not in ckpt.manager.all_steps():
      raise CheckpointError(f'{workdir} has no checkpoint at step {step}; it has steps '
                            f'{sorted(ckpt.manager.all_steps())}')
    from models import lora  # Here: qwix is only needed for adapter workdirs.
    spec = lora.read_spec(workdir)
    if spec is not None:
      return _load_lora_merged(ckpt, step, spec, mesh, rules, config_overrides), step
    graphdef, abstract_params, shardings = abstract_model(cfg, mesh, rules)
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract_params, shardings)
    restored = restore_params(ckpt, step, target)
    return nnx.merge(graphdef, restored), step
  finally:
    ckpt.close()  # Also on errors: an open manager's threads garble the traceback at exit.


def restore_params(ckpt: Checkpointer, step: int, target):
  """The `params` item of one step, or a CheckpointError that says which checkpoint failed, how,
  and which older steps a reader can pass as --step instead."""
  why = ckpt.incomplete(step)
  if why is None:
    try:
      return ckpt.manager.restore(step, args=ocp.args.Composite(
          params=ocp.args.StandardRestore(target)))['params']
    except Exception as e:  # Orbax and tensorstore raise many kinds.
      why = f'item params: {_first_line(e)}'
  older = sorted((s for s in ckpt.manager.all_steps() if s < step), reverse=True)
  hint = (f'older checkpoints: steps {older}; pass --step={older[0]} to read one'
          if older else 'there is no older checkpoint')
  raise CheckpointError(f'checkpoint {ckpt.step_dir(step)} cannot be restored ({why}). It is '
                        f'damaged or incomplete (a half-finished copy?); nothing was deleted; '
                        f'{hint}.')


def _load_lora_merged(ckpt: Checkpointer, step: int, spec, mesh, rules, config_overrides) -> Llama:
  """The base workdir's model with the adapters of `ckpt` (adapters only) applied and merged."""
  from models import lora
  base, _ = load_model(spec.base, mesh=mesh, rules=rules, **config_overrides)
  with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    model = lora.apply_lora(base, spec)
  adapters = abstract_tree(nnx.state(model, nnx.LoRAParam))
  nnx.update(model, restore_params(ckpt, step, adapters))
  return lora.merge_lora(model, spec)
