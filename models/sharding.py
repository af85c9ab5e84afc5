"""Logical axis names -> mesh axes, by one rules table (configs/base.py: DEFAULT_SHARDING_RULES).

Parameters are annotated with logical names (`nnx.with_partitioning(init, ('embed', 'mlp'))`) and
activations are constrained with `constrain(x, ('act_batch', 'act_length', 'act_embed'), rules)`;
nothing in the model names a mesh axis, so a new layout is a new table, not new code.
"""
from typing import Sequence

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import numpy as np

MESH_AXES = ('data', 'fsdp', 'tensor')
Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> jax.sharding.Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: all); one size may be -1."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise ValueError(f'mesh: at most one of data/fsdp/tensor may be -1, got {sizes}')
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f'mesh {sizes}: {len(devices)} devices do not divide by {known}')
    sizes[sizes.index(-1)] = len(devices) // known
  n = int(np.prod(sizes))
  if n > len(devices):
    raise ValueError(f'mesh data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]} needs {n} devices, '
                     f'but {len(devices)} are available')
  devices = devices[:n]  # A fully specified smaller mesh uses the first n devices.
  # Auto axes: the compiler propagates shardings; explicit axes break nnx.Embed on a sharded vocab.
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_to_mesh(names: Sequence[str | None], rules: Rules) -> P:
  """PartitionSpec for an array whose dimensions carry these logical names."""
  table = dict(rules)
  used, spec = set(), []
  for name in names:
    if name is None:
      spec.append(None)
      continue
    if name not in table:
      raise KeyError(f'logical axis {name!r} has no entry in sharding_rules')
    axes = table[name]
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if a not in used)  # A mesh axis may shard one dimension only.
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*spec)


def constrain(x: jax.Array, names: Sequence[str | None], rules: Rules | None) -> jax.Array:
  """Pins an activation's layout when a mesh is active; a no-op otherwise."""
  if not rules or jax.sharding.get_abstract_mesh().empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_mesh(names, rules))


def named_shardings(logical_specs, mesh: jax.sharding.Mesh, rules: Rules):
  """Maps a tree of logical PartitionSpecs (nnx.get_partition_spec) to NamedShardings."""
  return jax.tree.map(lambda spec: NamedSharding(mesh, logical_to_mesh(tuple(spec), rules)),
                      logical_specs, is_leaf=lambda x: isinstance(x, P))
