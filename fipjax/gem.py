"""Gradient Episodic Memory (Lopez-Paz & Ranzato, 2017) and A-GEM (Chaudhry et al., 2019) as optax transforms.

GEM projects the new task's gradient ``g`` onto the closest ``g̃`` (in ‖·‖₂) whose inner product with every old
task's memory gradient ``g_k`` is non-negative. Its dual over ``v ∈ R^K`` is the small quadratic programme

    min_v ½ vᵀ (G Gᵀ) v + (G g)ᵀ v   s.t.  v ≥ γ,        g̃ = Gᵀ v + g,

(``G`` the K memory gradients as rows, γ the paper's memory-strength margin), solved here exactly by enumerating
the active sets (K ≤ 12 old tasks); GEM projects only when some ``⟨g, g_k⟩ < 0``. A-GEM keeps one constraint,
on the gradient of the memory pooled over old tasks: ``g̃ = g − (gᵀg_ref / g_refᵀg_ref) g_ref`` when
``gᵀg_ref < 0``, and ``g`` when the memory gradient is zero.

Both papers train with SGD, where projecting the gradient projects the step. Under a preconditioning optimiser
(AdamW) it does not: :func:`on_steps` projects the optimiser's step instead, so that the step applied keeps every
constraint.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fipjax import tree as tu

PyTree = Any
MAX_TASKS = 12


def solve_dual(gram: jax.Array, linear: jax.Array, margin: float = 0.0) -> jax.Array:
  """The exact minimiser of ``½ vᵀ A v + bᵀ v`` over ``v ≥ margin`` for a PSD ``A = gram`` ``[K, K]``.

  With ``w = v − margin ≥ 0`` and ``c = A·margin + b``, every active set S (the coordinates free of their bound)
  gives the stationary point ``A_SS w_S = −c_S`` (least squares where ``A_SS`` is singular); the answer is the
  candidate that is feasible and satisfies the KKT conditions ``(A w + c)_i ≥ 0`` off S with the least objective.
  """
  k = gram.shape[0]
  if k > MAX_TASKS:
    raise ValueError(f"GEM's exact dual solver enumerates 2^K active sets; K = {k} old tasks is above {MAX_TASKS}")
  c = gram @ jnp.full((k,), margin, gram.dtype) + linear
  sets = jnp.asarray(list(itertools.product([0.0, 1.0], repeat=k)), gram.dtype)       # [2^K, K]
  scale = jnp.maximum(jnp.max(jnp.abs(gram)), jnp.finfo(gram.dtype).tiny)

  def candidate(s):
    sub = s[:, None] * gram * s[None, :] + jnp.diag(1.0 - s)        # A on S, identity elsewhere
    w = s * (jnp.linalg.pinv(sub, hermitian=True, rtol=1e-7) @ (-s * c))
    grad = gram @ w + c
    # w is unitless; the KKT gradient has the units of A and c.
    w_tol = 1e-5 * (1.0 + jnp.max(jnp.abs(w)))
    grad_tol = 1e-5 * scale * (1.0 + jnp.linalg.norm(w)) + 1e-5 * jnp.max(jnp.abs(c))
    violation = jnp.maximum(jnp.max(-w) - w_tol, 0.0) + jnp.max(jnp.where(s > 0, 0.0, -grad - grad_tol)).clip(0.0)
    return jnp.maximum(w, 0.0), 0.5 * w @ gram @ w + c @ w, violation

  ws, objs, violation = jax.vmap(candidate)(sets)
  ok = violation <= 0
  # The KKT point of least objective; were rounding to reject every candidate, the least violating one.
  best = jnp.where(jnp.any(ok), jnp.argmin(jnp.where(ok, objs, jnp.inf)), jnp.argmin(violation))
  return ws[best] + margin


def project(grads: PyTree, memory: list[PyTree], margin: float = 0.0) -> tuple[PyTree, jax.Array]:
  """GEM's projection of ``grads`` against the memory gradients (one pytree per old task): (g̃, violated?)."""
  rows = jnp.stack([tu.tree_vdot(m, grads) for m in memory])                       # G g
  gram = jnp.stack([jnp.stack([tu.tree_vdot(a, b) for b in memory]) for a in memory])
  v = solve_dual(gram, rows, margin)
  projected = grads
  for vk, m in zip(v, memory):
    projected = tu.tree_axpy(vk, m, projected)
  violated = jnp.any(rows < 0)
  return jax.tree.map(lambda p, g: jnp.where(violated, p, g), projected, grads), violated


def project_one(grads: PyTree, ref: PyTree) -> tuple[PyTree, jax.Array]:
  """A-GEM's projection against one (averaged) memory gradient: (g̃, projected?)."""
  dot, norm2 = tu.tree_vdot(grads, ref), tu.tree_vdot(ref, ref)
  active = (dot < 0) & (norm2 > 0)
  coef = jnp.where(active, dot / jnp.where(norm2 > 0, norm2, 1.0), 0.0)
  return tu.tree_axpy(-coef, ref, grads), active


class ProjectionState(NamedTuple):
  projected: jax.Array       # whether the last update was changed (a step metric)


LossOnMemory = Callable[[PyTree, Any, jax.Array | None], Any]


def _memory_grads(losses: Mapping[str, LossOnMemory], params, model_fn, replay, rng) -> list[PyTree]:
  model_fn = model_fn or (lambda p: p)

  def value(loss, batch, p):
    out = loss(model_fn(p), batch, rng)
    return out[0] if isinstance(out, tuple) else out      # a task loss may return (loss, metrics)

  return [jax.grad(lambda p: value(fn, replay[name], p))(params) for name, fn in losses.items()]


def _rescaled(memory: list[PyTree], norm: jax.Array) -> list[PyTree]:
  """Each memory gradient rescaled to ``norm`` (a zero one stays zero)."""
  def scale(m):
    nm = tu.tree_norm(m)
    return tu.tree_scale(jnp.where(nm > 0, norm / jnp.where(nm > 0, nm, 1.0), 0.0), m)
  return [scale(m) for m in memory]


def gem(losses: Mapping[str, LossOnMemory], *, margin: float = 0.0,
        relative: bool = False) -> optax.GradientTransformationExtraArgs:
  """GEM: ``update`` projects the gradient against each old task's memory gradient, the gradient of
  ``losses[name](model_params, replay[name], rng)`` (extra arguments ``replay``, ``rng`` and ``model_fn``).

  With ``relative`` each memory gradient is first rescaled to the norm of the vector projected: the constraints
  are unchanged, and the margin's push ``γ·g_k`` is measured in that vector's units (an optimiser's step is
  orders of magnitude shorter than a gradient).
  """

  def update(grads, state, params=None, *, replay=None, rng=None, model_fn=None, **_):
    memory = _memory_grads(losses, params, model_fn, replay, rng)
    if relative:
      memory = _rescaled(memory, tu.tree_norm(grads))
    out, violated = project(grads, memory, margin)
    return out, ProjectionState(violated)

  return optax.GradientTransformationExtraArgs(lambda p: ProjectionState(jnp.zeros((), bool)), update)


def agem(losses: Mapping[str, LossOnMemory]) -> optax.GradientTransformationExtraArgs:
  """A-GEM: ``update`` projects the gradient against the mean of the old tasks' memory gradients."""

  def update(grads, state, params=None, *, replay=None, rng=None, model_fn=None, **_):
    memory = _memory_grads(losses, params, model_fn, replay, rng)
    ref = jax.tree.map(lambda *xs: sum(xs) / len(xs), *memory)
    out, active = project_one(grads, ref)
    return out, ProjectionState(active)

  return optax.GradientTransformationExtraArgs(lambda p: ProjectionState(jnp.zeros((), bool)), update)


def on_steps(projection: optax.GradientTransformationExtraArgs) -> optax.GradientTransformationExtraArgs:
  """``projection`` applied after an optimiser, to its step ``u``: the descent direction ``−u`` is projected, so
  that the step applied satisfies ``⟨u, g_k⟩ ≤ 0`` for every memory gradient (to first order no old loss rises)."""

  def update(updates, state, params=None, **extra):
    direction, state = projection.update(jax.tree.map(jnp.negative, updates), state, params, **extra)
    return jax.tree.map(jnp.negative, direction), state

  return optax.GradientTransformationExtraArgs(projection.init, update)
