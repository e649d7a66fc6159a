"""Sharding over a `jax.sharding.Mesh` with axes ``"data"`` (batch) and ``"model"`` (heads, MLP).

Parameters are tensor-parallel: attention projections split over heads (q/k/v outputs, o_proj
inputs), MLPs over their hidden width F, the LM head over the vocabulary; norms, biases of
unsplit outputs and embeddings are replicated. The KV cache is split over batch (``"data"``)
and KV heads (``"model"``). A dimension is split only when the axis size divides it; otherwise
it stays replicated (e.g. 2 KV heads on a 4-way ``"model"`` axis: q is split, k/v are not).

Inside jitted code, `constrain` pins an array's batch / head dimensions to the mesh of the
surrounding ``jax.set_mesh`` context and does nothing without one, so the same functions serve
one device and a mesh.
"""

from __future__ import annotations

import contextlib
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXES = ("data", "model")
DATA, MODEL = AXES

# (path regex, the logical axis of each dimension): "model" marks the split dimension.
_RULES = (
  (r"(^|/)(q|k|v)_proj/w$", (None, MODEL, None)),  # [D, N|K, H]
  (r"(^|/)(q|k|v)_proj/b$", (MODEL, None)),  # [N|K, H]
  (r"(^|/)(o_proj|out_proj|proj)/w$", (MODEL, None, None)),  # [N, H, D]
  (r"(^|/)qkv/w$", (None, None, MODEL, None)),  # [D, 3, N, H] (Qwen2-VL vision)
  (r"(^|/)qkv/b$", (None, MODEL, None)),  # [3, N, H]
  (r"(^|/)(gate_proj|up_proj|fc1)/w$", (None, MODEL)),  # [D, F]
  (r"(^|/)(gate_proj|up_proj|fc1)/b$", (MODEL,)),  # [F]
  (r"(^|/)(down_proj|fc2)/w$", (MODEL, None)),  # [F, D]
  (r"(^|/)lm_head/w$", (None, MODEL)),  # [D, V]
)


def check_mesh(mesh: Mesh) -> Mesh:
  if not isinstance(mesh, Mesh):
    raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
  unknown = [a for a in mesh.axis_names if a not in AXES]
  if unknown:
    raise ValueError(
      f"mesh axes must be named {AXES} (data-parallel batch, tensor-parallel heads/MLP); "
      f"got {tuple(mesh.axis_names)}"
    )
  if any(t != jax.sharding.AxisType.Auto for t in mesh.axis_types):
    # jmmkv annotates the cache and lets XLA propagate the rest (auto sharding mode)
    mesh = Mesh(
      mesh.devices, mesh.axis_names, axis_types=(jax.sharding.AxisType.Auto,) * mesh.devices.ndim
    )
  return mesh


def _spec(shape, logical, mesh_shape: dict) -> PartitionSpec:
  """The PartitionSpec that splits each dimension over its axis where the size divides."""
  dims = []
  for n, axis in zip(shape, logical):
    size = mesh_shape.get(axis, 1) if axis is not None else 1
    dims.append(axis if size > 1 and n % size == 0 else None)
  return PartitionSpec(*dims)


def _path(keys) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in keys)


def param_specs(params, mesh: Mesh):
  """A PartitionSpec per parameter (same tree as ``params``)."""
  mesh_shape = dict(mesh.shape)

  def one(keys, x):
    path = _path(keys)
    for pattern, logical in _RULES:
      if re.search(pattern, path) and len(logical) == np.ndim(x):
        return _spec(np.shape(x), logical, mesh_shape)
    return PartitionSpec()

  return jax.tree_util.tree_map_with_path(one, params)


def shard_params(params, mesh: Mesh):
  """``params`` placed on ``mesh`` by `param_specs`."""
  mesh = check_mesh(mesh)
  specs = param_specs(params, mesh)
  return jax.device_put(params, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))


def param_shardings(shapes, mesh: Mesh):
  """NamedShardings for a tree of (abstract) arrays: restore checkpoints straight onto the mesh."""
  mesh = check_mesh(mesh)
  specs = param_specs(shapes, mesh)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs)


def constrain(x, logical):
  """``x`` pinned to the current mesh by ``logical`` (one axis name or None per dimension);
  unchanged outside a ``jax.set_mesh`` context."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or x is None:
    return x
  spec = _spec(x.shape, logical, dict(mesh.shape))
  return jax.lax.with_sharding_constraint(x, spec)


def constrain_BK(x, lead: int = 0):
  """Batch and KV-head split for an array whose dims ``lead``, ``lead + 1`` are ``[B, K]``."""
  logical = [None] * x.ndim
  logical[lead], logical[lead + 1] = DATA, MODEL
  return constrain(x, tuple(logical))


def put_batch(x, mesh: Mesh | None, axis: int = 0):
  """A host array placed on ``mesh`` split over its batch ``axis`` (or as is, without a mesh)."""
  if mesh is None:
    return x
  logical = [None] * np.ndim(x)
  logical[axis] = DATA
  return jax.device_put(x, NamedSharding(mesh, _spec(np.shape(x), logical, dict(mesh.shape))))


def context(mesh: Mesh | None):
  """``jax.set_mesh(mesh)``, or a no-op context without a mesh."""
  return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def per_head(fn, *arrays, lead: int = 1):
  """``fn(*arrays)`` run shard-locally when a mesh is current: every array (and every output)
  has ``[B, K]`` at dims ``lead, lead + 1`` and ``fn`` treats each (row, KV head) on its own, so
  each device works on its own rows and heads and nothing is gathered. Without a mesh, or when
  neither split divides, it is plain ``fn(*arrays)``."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return fn(*arrays)
  shape = dict(mesh.shape)
  b, kh = arrays[0].shape[lead : lead + 2]
  dims = [DATA if shape.get(DATA, 1) > 1 and b % shape[DATA] == 0 else None]
  dims.append(MODEL if shape.get(MODEL, 1) > 1 and kh % shape[MODEL] == 0 else None)
  if dims == [None, None]:
    return fn(*arrays)
  spec = lambda x: PartitionSpec(*([None] * lead + dims + [None] * (x.ndim - lead - 2)))
  out_shapes = jax.eval_shape(fn, *arrays)
  return jax.shard_map(
    fn,
    in_specs=tuple(spec(x) for x in arrays),
    out_specs=jax.tree.map(spec, out_shapes),
    check_vma=False,
  )(*arrays)
