"""Narrow parameters, float32 training: parameters stored in bfloat16 (or float16) while the optimiser keeps a
float32 master copy and float32 moments.

A bfloat16 weight carries 8 significant bits, so an AdamW step of relative size 1e-3 (a fine-tuning learning rate)
rounds away on most weights. :func:`float32_master` keeps the float32 weights the steps accumulate into; the model
runs on their bfloat16 rounding. Per parameter that is 2 (weights) + 4 (master) + 8 (AdamW's moments) bytes
against float32's 4 + 8, and every frozen copy (LoRA's base, a reference policy) costs half.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

PyTree = Any

# ``--model.param-dtype`` / ``--param-dtype``: the dtype the parameters are stored in ('auto': the compute dtype's
# wide dtype, float32 for float32 and bfloat16 compute; Hugging Face's ``dtype="auto"``).
PARAM_DTYPES = {"auto": None, "float32": jnp.float32, "bfloat16": jnp.bfloat16}
PARAM_DTYPE_HELP = ("dtype the parameters are stored in: bfloat16 halves them and every frozen copy (LoRA's base), "
                    "training keeps float32 master weights and AdamW moments; 'auto': float32 (float64 for float64 "
                    "compute)")


def is_narrow(x) -> bool:
  """Whether ``x`` is a floating array narrower than float32 (bfloat16, float16)."""
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jnp.issubdtype(dtype, jnp.floating) and jnp.dtype(dtype).itemsize < 4


def cast_floating(tree: PyTree, dtype) -> PyTree:
  """``tree`` with every floating leaf cast to ``dtype`` (integer leaves unchanged)."""
  cast = lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
  return jax.tree.map(cast, tree)


class MasterState(NamedTuple):
  master: PyTree         # float32 copies of the narrow parameters; None at the others
  inner: optax.OptState  # the inner transform's state, over the float32 parameters


class Float32Master(optax.GradientTransformationExtraArgs):
  """The transform :func:`float32_master` returns (wrapping it again returns it unchanged)."""
  __slots__ = ()


def float32_master(inner: optax.GradientTransformation) -> Float32Master:
  """``inner`` run in float32 on parameters some of which are narrow.

  ``init(params)`` copies each narrow leaf to float32 (the master weights) and initialises ``inner`` on the
  float32 parameters, so its moments are float32. ``update(grads, state, params)`` gives ``inner`` the float32
  gradients and the master parameters, adds its update to the master weights, and returns the float32 update
  that takes each narrow parameter to its master weight's rounding under ``optax.apply_updates``. Where no
  parameter is narrow, init returns ``inner``'s state and update is ``inner``'s exactly.
  """
  if isinstance(inner, Float32Master):
    return inner
  inner = optax.with_extra_args_support(inner)
  master_of = lambda p: p.astype(jnp.float32) if is_narrow(p) else None
  is_none = lambda x: x is None

  def wide(master, params):
    return jax.tree.map(lambda m, p: p if m is None else m, master, params, is_leaf=is_none)

  def init(params):
    if not any(is_narrow(p) for p in jax.tree.leaves(params)):
      return inner.init(params)
    master = jax.tree.map(master_of, params)
    return MasterState(master, inner.init(wide(master, params)))

  def update(grads, state, params=None, **extra):
    if not isinstance(state, MasterState):
      return inner.update(grads, state, params, **extra)
    if params is None:
      raise ValueError("float32_master needs the parameters in update (their narrow copies are re-rounded)")
    grads = jax.tree.map(lambda g: g.astype(jnp.float32) if is_narrow(g) else g, grads)
    updates, inner_state = inner.update(grads, state.inner, wide(state.master, params), **extra)
    master = jax.tree.map(lambda m, u: None if m is None else m + u.astype(jnp.float32), state.master, updates,
                          is_leaf=is_none)
    # A float32 update: ``apply_updates`` adds it to the narrow weight in float32, then rounds to the master.
    updates = jax.tree.map(lambda m, u, p: u if m is None else m - p.astype(jnp.float32), master, updates, params,
                           is_leaf=is_none)
    return updates, MasterState(master, inner_state)

  return Float32Master(init, update)
