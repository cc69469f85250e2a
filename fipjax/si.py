"""Synaptic Intelligence (Zenke, Poole & Ganguli, 2017) as optax transforms.

While a task trains, each parameter accumulates the path integral of the task loss's gradient along the update:
``ω_i = −Σ_t g_i(t) · Δθ_i(t)``, where ``g(t)`` is the task loss's gradient at step t (the one the optimiser is
given, before any penalty is added: the paper's unregularised gradient) and ``Δθ(t)`` the update actually applied
(AdamW's step, weight decay included; for plain SGD ``−lr·g``). At the task's end its importance is
``Ω_i = ω_i / (Δ_i² + ξ)`` with ``Δ = θ_end − θ_start`` over that task; importances add up over tasks, and later
tasks train with the surrogate penalty ``c · Σ_i Ω_i (θ_i − θ*_i)²``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

PyTree = Any


class PathIntegralState(NamedTuple):
  omega: PyTree          # −Σ_t g(t) ⊙ Δθ(t) so far, shaped like the parameters
  inner: optax.OptState


def path_integral(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """``inner`` unchanged, recording SI's ``ω = −Σ_t g(t) ⊙ u(t)`` with ``g`` the gradient this transform is given
  and ``u`` the update ``inner`` returns (the step applied to the parameters)."""
  inner = optax.with_extra_args_support(inner)

  def init(params):
    return PathIntegralState(jax.tree.map(jnp.zeros_like, params), inner.init(params))

  def update(grads, state, params=None, **extra):
    updates, inner_state = inner.update(grads, state.inner, params, **extra)
    omega = jax.tree.map(lambda w, g, u: w - g * u, state.omega, grads, updates)
    return updates, PathIntegralState(omega, inner_state)

  return optax.GradientTransformationExtraArgs(init, update)


def recorded(opt_state) -> PyTree | None:
  """The ``ω`` a :func:`path_integral` optimiser state holds (at its top or inside a wrapping state), or None."""
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, PathIntegralState))
           if isinstance(s, PathIntegralState)]
  return found[0].omega if found else None


def importance(omega: PyTree, change: PyTree, *, xi: float) -> PyTree:
  """``Ω = ω / (Δ² + ξ)`` of one task, ``Δ = θ_end − θ_start`` over it."""
  return jax.tree.map(lambda w, d: w / (d * d + xi), omega, change)


def penalty(params: PyTree, importance_: PyTree, anchor: PyTree, *, strength: float) -> jax.Array:
  """The surrogate loss ``c · Σ_i Ω_i (θ_i − θ*_i)²``."""
  terms = jax.tree.map(lambda p, w, a: jnp.sum(w * (p - a) ** 2), params, importance_, anchor)
  return strength * sum(jax.tree.leaves(terms))


def add_penalty_gradient(importance_: PyTree, anchor: PyTree, *, strength: float) -> optax.GradientTransformation:
  """``g ↦ g + 2c · Ω ⊙ (θ − θ*)``: the gradient of :func:`penalty` added in the optimiser, so that a
  :func:`path_integral` around the chain still sees the unregularised task gradient."""

  def update(grads, state, params=None):
    if params is None:
      raise ValueError("add_penalty_gradient needs params")
    return jax.tree.map(lambda g, p, w, a: g + 2.0 * strength * w * (p - a), grads, params, importance_,
                        anchor), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)
