"""Solvers that walk functionally invariant paths (FIP).

Two forms of the same geometry:

* **Geodesic step** (the paper): ``dθ = argmin ½⟨dθ, (G + λI) dθ⟩ + β⟨∇L_new, dθ⟩`` ⇒ ``(G + λI) dθ = −β ∇L_new``,
  solved by matrix-free conjugate gradients, then shrunk so that ``‖dθ‖ ≤ ε`` and, optionally,
  ``dθᵀ G dθ ≤ max_quad`` (the second-order functional change on the reference inputs).
* **Penalty form** (the authors' code, and what scales to BERT): ``L_new(θ) + β · mean D(f(θ, x_old), z_ref)`` with
  reference outputs ``z_ref = f(θ_ref, x_old)`` computed once and stored; no frozen copy of the network is kept.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fipjax import geometry
from fipjax import linalg
from fipjax import tree as tu

PyTree = Any


class GeodesicInfo(NamedTuple):
  new_loss: jax.Array        # L_new at θ (before the step); 0 where unknown (geodesic_direction)
  step_norm: jax.Array       # ‖dθ‖ after scaling
  quad: jax.Array            # dθᵀ G dθ after scaling (undamped G); NaN where not measured
  scale: jax.Array           # factor applied to the CG solution (≤ 1)
  cg_residual: jax.Array     # ‖(G+λI)x − rhs‖ at CG exit
  cg_relative_residual: jax.Array   # the same over ‖rhs‖: what ``cg_tol`` bounds
  cg_iterations: jax.Array
  solution: PyTree           # the unscaled CG solution, to warm-start the next step


def solve_and_scale(metric: geometry.Metric, rhs: PyTree, x0: PyTree | None, *, damping: float,
                    max_norm: float | None = None, max_quad: float | None = None, cg_iters: int, cg_tol: float,
                    measure_quad: bool) -> tuple[PyTree, GeodesicInfo]:
  """Solve ``(G + λI) x = rhs`` by CG, then scale x by ``s ≤ 1``: ``‖s x‖ ≤ max_norm``, ``s² xᵀGx ≤ max_quad``.

  Args:
    metric: G (undamped); ``rhs``, ``x0`` and the result live in its space.
    rhs: right-hand side pytree.
    x0: CG warm start, or None for zeros.
    damping: λ.
    max_norm, max_quad: optional bounds (None: unbounded).
    cg_iters, cg_tol: CG budget and relative tolerance.
    measure_quad: report ``quad`` even when ``max_quad`` is None (one more G·v); otherwise it is NaN then.

  Returns:
    (s·x, :class:`GeodesicInfo` with ``new_loss`` 0, for the caller to fill in, and the unscaled x as
    ``solution``).
  """
  sol = linalg.cg(metric.damped(damping), rhs, x0, maxiter=cg_iters, tol=cg_tol)
  norm = tu.tree_norm(sol.x)
  scale = jnp.ones((), norm.dtype)
  quad = jnp.full((), jnp.nan, norm.dtype)
  if max_norm is not None:
    scale = jnp.minimum(scale, max_norm / jnp.maximum(norm, 1e-30))
  if measure_quad or max_quad is not None:
    quad = metric.quad(sol.x)
  if max_quad is not None:
    scale = jnp.minimum(scale, jnp.sqrt(max_quad / jnp.maximum(quad, 1e-30)))
  relative = sol.residual_norm / jnp.maximum(tu.tree_norm(rhs), jnp.finfo(norm.dtype).tiny)
  info = GeodesicInfo(jnp.zeros((), norm.dtype), norm * scale, quad * scale**2, scale, sol.residual_norm,
                      relative, sol.iterations, sol.x)
  return tu.tree_scale(scale, sol.x), info


def geodesic_step(f: geometry.Apply, loss_new: Callable[[PyTree, Any], jax.Array], params: PyTree,
                  ref_inputs: PyTree, new_batch: Any, *, beta: float = 1.0, damping: float = 1e-3,
                  max_norm: float = 1e-2, max_quad: float | None = None,
                  output_metric: str | geometry.OutputMetric = "fisher_rao", cg_iters: int = 20,
                  cg_tol: float = 1e-6, x0: PyTree | None = None, mask: PyTree | None = None,
                  chunk_size: int | None = None) -> tuple[PyTree, GeodesicInfo]:
  """One FIP step from θ; pure and jit-able (close over ``f``/``loss_new`` and mark keywords static).

  Args:
    f: ``f(params, inputs) -> outputs`` (old-task outputs, e.g. logits).
    loss_new: ``loss_new(params, new_batch) -> scalar`` for the new task.
    params: θ.
    ref_inputs: old-task reference inputs ``[N, ...]`` that define G.
    new_batch: new-task batch passed to ``loss_new``.
    beta: weight of the new-task gradient.
    damping: λ in ``G + λI`` (λ → ∞ recovers plain gradient descent).
    max_norm: ε, the bound on ``‖dθ‖``.
    max_quad: optional bound on ``dθᵀ G dθ`` per step.
    output_metric: metric on outputs ('fisher_rao' matches cross-entropy / KL / Bhattacharyya).
    cg_iters, cg_tol: CG budget and relative tolerance.
    x0: warm start (the previous step's ``info.solution``).
    mask: optional boolean pytree: move only these parameters (metric restricted to them).
    chunk_size: reference micro-batch size for ``G·v`` (see :func:`geometry.pullback_metric`).

  Returns:
    (θ + dθ, :class:`GeodesicInfo`).
  """
  loss, grad = jax.value_and_grad(loss_new)(params, new_batch)
  metric = geometry.pullback_metric(f, params, ref_inputs, output_metric, chunk_size=chunk_size)
  if mask is not None:
    metric, grad = metric.restrict(mask), tu.select(grad, mask)
  step, info = solve_and_scale(metric, tu.tree_scale(-beta, grad), x0, damping=damping, max_norm=max_norm,
                               max_quad=max_quad, cg_iters=cg_iters, cg_tol=cg_tol, measure_quad=True)
  if mask is not None:
    step = tu.embed(step, mask, params)
  return tu.tree_add(params, step), info._replace(new_loss=loss)


def reference_outputs(f: geometry.Apply, params: PyTree, inputs: PyTree, batch_size: int | None = None) -> jax.Array:
  """``f(θ_ref, x)`` for an old-task buffer, computed once (in micro-batches of ``batch_size``) and stored."""
  n = geometry.num_rows(inputs)
  if batch_size is None or batch_size >= n:
    return jax.lax.stop_gradient(f(params, inputs))
  apply = jax.jit(f)
  parts = [apply(params, jax.tree.map(lambda x: x[i:i + batch_size], inputs)) for i in range(0, n, batch_size)]
  return jnp.concatenate(parts)


def fip_penalty(f: geometry.Apply, distance: str | geometry.Distance = "bhattacharyya",
                beta: float = 1.0) -> Callable[[PyTree, PyTree, jax.Array], jax.Array]:
  """The FIP penalty ``β · mean_n D(f(θ, x_n), z_ref_n)`` on a replay batch with stored reference outputs.

  Returns:
    ``penalty(params, replay_inputs, ref_outputs) -> scalar``. Add it to the new-task loss. The authors sum
    the distance over their replay batch of 8 (≈ β = 8 in this mean form).
  """
  d = geometry.get_distance(distance)

  def penalty(params, replay_inputs, ref_outputs):
    return beta * jnp.mean(d.fn(f(params, replay_inputs), ref_outputs))

  return penalty


class PathRecord:
  """Per-step record of a path: new-task loss, functional distance to the start on old inputs, Euclidean step
  length, and the cumulative functional (``Σ √D(θ_t, θ_{t+1})``) and Euclidean (``Σ ‖dθ_t‖``) path lengths.

  Feed it host scalars; ``as_dict()`` gives plain lists for JSON.
  """

  FIELDS = ("step", "new_loss", "functional_distance", "step_length", "functional_length", "euclidean_length")

  def __init__(self):
    self.rows: list[dict[str, float]] = []

  def append(self, step: int, new_loss, functional_distance, step_length, step_functional_distance) -> None:
    prev = self.rows[-1] if self.rows else {"functional_length": 0.0, "euclidean_length": 0.0}
    self.rows.append({
        "step": int(step),
        "new_loss": float(new_loss),
        "functional_distance": float(functional_distance),
        "step_length": float(step_length),
        "functional_length": prev["functional_length"] + float(np.sqrt(max(float(step_functional_distance), 0.0))),
        "euclidean_length": prev["euclidean_length"] + float(step_length),
    })

  def as_dict(self) -> dict[str, list[float]]:
    return {k: [r[k] for r in self.rows] for k in self.FIELDS}

  def __len__(self) -> int:
    return len(self.rows)


def old_tasks(f: geometry.Apply | Mapping[str, geometry.Apply], params: PyTree, ref_inputs: PyTree,
              model_fn: Callable[[PyTree], PyTree] | None, *, who: str) -> dict[Any, tuple[geometry.Apply, PyTree]]:
  """``{task: (its f on the trained parameters (after model_fn), its reference inputs)}`` for one old task (key
  None) or a mapping of several; ``who`` names the caller in the error for missing arguments."""
  if params is None or ref_inputs is None:
    raise ValueError(f"{who} needs params and the extra argument ref_inputs")
  fs, xs = (f, ref_inputs) if isinstance(f, Mapping) else ({None: f}, {None: ref_inputs})
  on_trained = lambda fn: fn if model_fn is None else (lambda p, z: fn(model_fn(p), z))
  return {name: (on_trained(fn), xs[name]) for name, fn in fs.items()}


def old_task_metric(f: geometry.Apply | Mapping[str, geometry.Apply], params: PyTree, ref_inputs: PyTree,
                    model_fn: Callable[[PyTree], PyTree] | None, *, output_metric, chunk_size: int | None,
                    who: str) -> geometry.Metric:
  """G at ``params``: the pull-back through ``f`` (after ``model_fn``) on ``ref_inputs``; with several old tasks
  (mappings by name) the mean of their metrics."""
  tasks = old_tasks(f, params, ref_inputs, model_fn, who=who)
  return (1.0 / len(tasks)) * sum(geometry.pullback_metric(fn, params, x, output_metric, chunk_size=chunk_size)
                                  for fn, x in tasks.values())


class GeodesicState(NamedTuple):
  solution: PyTree           # last CG solution (warm start)
  info: GeodesicInfo | None = None


def geodesic_direction(f: geometry.Apply | Mapping[str, geometry.Apply], *, damping: float = 1e-3, max_norm: float | None = None,
                       max_quad: float | None = None, output_metric: str | geometry.OutputMetric = "fisher_rao",
                       cg_iters: int = 20, cg_tol: float = 1e-6, chunk_size: int | None = None):
  """The geodesic step as an optax transformation: gradient ``g`` ↦ ``(G(θ) + λI)⁻¹ g`` (CG, warm-started).

  Chain it before ``optax.scale(-β)`` (or any optimiser) to run FIP in the one training loop. ``update`` takes the
  reference inputs as the extra argument ``ref_inputs``, and optionally ``model_fn``: trained parameters ↦ the
  parameters ``f`` takes (a LoRA merge, or re-inserting frozen leaves), so that G is the metric pulled back to
  the trained coordinates. With several old tasks, ``f`` and ``ref_inputs`` are mappings by task and G is the
  mean of their metrics. ``max_norm``/``max_quad`` bound ``‖x‖`` and ``xᵀGx`` of the preconditioned direction
  before the learning rate is applied.

  Returns:
    ``optax.GradientTransformationExtraArgs``.
  """
  import optax

  def init(params):
    zero = jnp.zeros((), jnp.result_type(*jax.tree.leaves(params)))
    info = GeodesicInfo(zero, zero, zero, zero, zero, zero, jnp.zeros((), jnp.int32), None)
    return GeodesicState(tu.tree_zeros_like(params), info)

  def update(grads, state, params=None, *, ref_inputs=None, model_fn=None, **_):
    metric = old_task_metric(f, params, ref_inputs, model_fn, output_metric=output_metric, chunk_size=chunk_size,
                             who="geodesic_direction")
    # The quad costs one more G·v per update: measured only when it is bounded.
    direction, info = solve_and_scale(metric, grads, state.solution, damping=damping, max_norm=max_norm,
                                      max_quad=max_quad, cg_iters=cg_iters, cg_tol=cg_tol, measure_quad=False)
    return direction, GeodesicState(info.solution, info._replace(solution=None))

  return optax.GradientTransformationExtraArgs(init, update)


class PreconditionedState(NamedTuple):
  base: PyTree               # the diagonal optimiser's state
  geodesic: GeodesicState    # the last solve's info (no warm start: a placeholder solution)


def adam_diagonal(*, b2: float = 0.999, eps: float = 1e-8, floor: float = 0.1) -> Callable[[PyTree], PyTree]:
  """``base_state -> P``, Adam's diagonal preconditioner ``1 / max(√v̂ + ε, floor · mean √v̂)`` read from the
  (first) ``optax.ScaleByAdamState`` in an optimiser state (``optax.adam``/``adamw`` with these ``b2``, ``eps``).

  The floor (relative to the mean over every parameter) keeps parameters with no gradient history yet (v̂ = 0:
  embeddings of tokens not seen so far) from costing nothing in the metric ``P⁻¹``: a solve against
  ``κG + P⁻¹`` would otherwise move them without bound to cancel the functional change of the others."""
  import optax

  def diagonal(base_state):
    found = [s for s in jax.tree.leaves(base_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
             if isinstance(s, optax.ScaleByAdamState)]
    if not found:
      raise ValueError("adam_diagonal: the base optimiser's state holds no optax.ScaleByAdamState; pass the "
                       "diagonal of your preconditioner as `diagonal`")
    nu, count = found[0].nu, found[0].count
    root = jax.tree.map(lambda v: jnp.sqrt(v / (1.0 - b2 ** count.astype(v.dtype))) + eps, nu)
    mean = sum(jnp.sum(r) for r in jax.tree.leaves(root)) / tu.tree_size(root)
    return jax.tree.map(lambda r: 1.0 / jnp.maximum(r, floor * mean.astype(r.dtype)), root)

  return diagonal


def functional_precondition(base, f: geometry.Apply | Mapping[str, geometry.Apply], *, kappa: float,
                            diagonal: Callable[[PyTree], PyTree] | None = None, corrector: bool = False,
                            corrector_weight: float = 1.0, output_metric: str = "fisher_rao", cg_iters: int = 5,
                            cg_tol: float = 1e-6):
  """A diagonal optimiser's step, shrunk in the old task's functional directions.

  With ``u`` the update of ``base`` (e.g. AdamW's, ``−lr·(m̂/(√v̂+ε) + wd·θ)``) and ``P = D⁻¹`` its diagonal
  preconditioner (``diagonal(base_state)``; Adam's by default, :func:`adam_diagonal`), the step solves
  ``(κ G + D) dθ = D u``: the optimiser's metric D plus κ times the functional metric ``G = ĴᵀĴ``. In G's null
  space the step is exactly ``base``'s; along an eigendirection of ``D^-½ G D^-½`` with eigenvalue μ it is shrunk
  by ``1/(1 + κμ)``. ``κ = 0`` is ``base`` itself.

  The solve runs in output space (N·K dimensions for N reference inputs of K outputs), by the push-through
  identity ``dθ = u − κ P Ĵᵀ w`` with ``(I + κ Ĵ P Ĵᵀ) w = Ĵ u`` (CG, eigenvalues ≥ 1, from zero: the reference
  inputs change every step). The null-space part of ``u`` is never touched, however few the iterations or
  however wide the spread of P and G: the parameter-space form needs products ``G·v`` on vectors whose
  G-image should vanish, which float32 does not resolve when ``κ‖P^½GP^½‖`` is large. Each product is one JVP
  and one transposed JVP, as ``G·v``; ``Ĵᵀ w`` is accumulated inside CG (``tracked``), so k iterations cost k
  products and none after them. The solve's residual and iterations are in the state (:func:`solver_metrics`).

  With ``corrector`` the step also pulls the old outputs back towards their stored references ``z_ref``
  (``update``'s ``ref_outputs``): it minimises ``½‖dθ − u‖²_D + ½κ‖Ĵ dθ + e‖²`` with
  ``e = N^-½ B (f(θ, x) − z_ref)``, the Gauss–Newton model of the Fisher–Rao distance to the references after the
  step, i.e. ``(κG + D) dθ = D u − κ Ĵᵀ e``: a predictor (AdamW, shrunk in G's range) and a corrector (back to the
  level set ``f(θ, x_ref) = z_ref``) in one solve, the right-hand side ``Ĵ u + e``. ``corrector_weight`` γ scales
  ``e`` (``Ĵ u + γ e``; 1 is the Gauss–Newton model's own pull). Without it, the shrinking
  only bounds each step's change on the current reference inputs, and drift elsewhere accumulates.

  ``update`` takes ``ref_inputs`` (and optionally ``model_fn``) as :func:`geodesic_direction` does; several old
  tasks (mappings by name) give ``G`` the mean of their metrics.

  Returns:
    ``optax.GradientTransformationExtraArgs``: the final update (``base``'s learning rate included).
  """
  import optax
  diagonal = adam_diagonal() if diagonal is None else diagonal

  def init(params):
    zero = jnp.zeros((), jnp.result_type(*jax.tree.leaves(params)))
    info = GeodesicInfo(zero, zero, zero, zero, zero, zero, jnp.zeros((), jnp.int32), None)
    return PreconditionedState(base.init(params), GeodesicState(zero, info))

  def update(grads, state, params=None, *, ref_inputs=None, ref_outputs=None, model_fn=None, **_):
    if corrector and ref_outputs is None:
      raise ValueError("functional_precondition with corrector=True needs the extra argument ref_outputs")
    tasks = old_tasks(f, params, ref_inputs, model_fn, who="functional_precondition")
    zs = (ref_outputs if isinstance(f, Mapping) else {None: ref_outputs}) if corrector else None
    factors = {name: geometry.pullback_factor(fn, params, x, output_metric) for name, (fn, x) in tasks.items()}
    share = 1.0 / np.sqrt(len(factors))                       # G = mean of the tasks' metrics
    jhat = lambda v: {k: tu.tree_scale(share, fa.apply(v)) for k, fa in factors.items()}
    jhat_t = lambda w: tu.tree_scale(share, functools.reduce(
        tu.tree_add, [fa.transpose(w[k]) for k, fa in factors.items()]))
    u, base_state = base.update(grads, state.base, params)
    p = diagonal(base_state)
    scaled = lambda v: jax.tree.map(jnp.multiply, p, v)
    rhs = jhat(u)
    if corrector:       # + N^-½ B (f(θ, x) − z_ref): the Gauss–Newton pull back to the reference outputs
      rhs = {k: tu.tree_add(rhs[k], tu.tree_scale(share * corrector_weight, fa.residual(zs[k])))
             for k, fa in factors.items()}

    def matvec(w):                                            # (I + κ Ĵ P Ĵᵀ) w, and Ĵᵀ w for the step
      back = jhat_t(w)
      return tu.tree_axpy(kappa, jhat(scaled(back)), w), back

    sol = linalg.cg(matvec, rhs, maxiter=cg_iters, tol=cg_tol, tracked=True)
    step = tu.tree_axpy(-kappa, scaled(sol.image), u)
    zero = jnp.zeros((), sol.residual_norm.dtype)
    relative = sol.residual_norm / jnp.maximum(tu.tree_norm(rhs), jnp.finfo(zero.dtype).tiny)
    info = GeodesicInfo(zero, tu.tree_norm(step), jnp.full((), jnp.nan, zero.dtype), jnp.ones((), zero.dtype),
                        sol.residual_norm, relative, sol.iterations, None)
    return step, PreconditionedState(base_state, GeodesicState(zero, info))

  return optax.GradientTransformationExtraArgs(init, update)


class ProjectionState(NamedTuple):
  base: PyTree               # the base optimiser's state
  basis: PyTree              # G's top eigenvectors at the last refresh: leaves [rank, *shape], orthonormal
  count: jax.Array           # updates so far
  residual: jax.Array        # largest ‖G y − λ y‖ / λ_max of the last refresh's Ritz pairs (y, λ)
  share: jax.Array           # ‖V Vᵀ u‖ / ‖u‖ of the last update: the share of base's step projected out


def functional_projection(base, f: geometry.Apply | Mapping[str, geometry.Apply], *, rank: int, refresh_every: int,
                          krylov_size: int | None = None, output_metric: str = "fisher_rao",
                          chunk_size: int | None = None):
  """``base``'s update with its part in G's top-``rank`` eigenspace removed: ``u ↦ u − V Vᵀ u``.

  The Fisher–Rao analogue of orthogonal-gradient / gradient-projection methods: ``V`` (orthonormal, ``rank``
  columns) holds the top eigenvectors of the old tasks' G on the reference inputs of the update where it was last
  refreshed, by Lanczos (one pass of ``krylov_size`` products, default ``3 · rank``, and ``rank`` more for the
  residuals), every ``refresh_every`` updates; in between, ``V`` is frozen. Eigenvalues below ``100 eps · λ_max``
  (G has rank at most N·K on N reference inputs of K outputs) leave their vectors out, so a rank above G's removes
  nothing more. A Euclidean relative of :func:`functional_precondition` as κ → ∞ without its corrector (which
  removes G's range in the base optimiser's own metric D instead), on a subspace fixed between refreshes. Memory:
  ``rank`` parameter-sized vectors in the state (and its checkpoints), about ``krylov_size + 2 · rank`` during a
  refresh.

  ``update`` takes ``ref_inputs`` (and optionally ``model_fn``) as :func:`geodesic_direction` does; the refresh's
  largest relative residual and the share of ``u`` removed are in the state (:func:`solver_metrics`).

  Returns:
    ``optax.GradientTransformationExtraArgs``: the final update (``base``'s learning rate included).
  """
  import optax
  krylov_size = 3 * rank if krylov_size is None else krylov_size
  if not 0 < rank <= krylov_size or refresh_every < 1:
    raise ValueError(f"functional_projection needs 0 < rank ≤ krylov_size and refresh_every ≥ 1, got rank={rank}, "
                     f"krylov_size={krylov_size}, refresh_every={refresh_every}")

  def init(params):
    zero = jnp.zeros((), jnp.result_type(*jax.tree.leaves(params)))
    basis = jax.tree.map(lambda x: jnp.zeros((rank, *x.shape), x.dtype), params)
    return ProjectionState(base.init(params), basis, jnp.zeros((), jnp.int32), zero, zero)

  def update(grads, state, params=None, *, ref_inputs=None, model_fn=None, **_):
    u, base_state = base.update(grads, state.base, params)

    def refresh():
      metric = old_task_metric(f, params, ref_inputs, model_fn, output_metric=output_metric, chunk_size=chunk_size,
                               who="functional_projection")
      top = metric.eigh(rank, num_iters=krylov_size, max_iters=krylov_size, on_unconverged="ignore")
      dtype = state.residual.dtype
      scale = jnp.maximum(jnp.max(jnp.abs(top.eigenvalues)), jnp.finfo(dtype).tiny)
      # Past G's rank, Lanczos restarts from random directions in its null space: those are not G's to remove.
      kept = (top.eigenvalues > 100 * jnp.finfo(dtype).eps * scale).astype(dtype)
      basis = jax.tree.map(lambda v: v * kept.reshape(-1, *[1] * (v.ndim - 1)).astype(v.dtype), top.eigenvectors)
      return basis, (jnp.max(top.residual_norms) / scale).astype(dtype)

    basis, residual = jax.lax.cond(state.count % refresh_every == 0, refresh,
                                   lambda: (state.basis, state.residual))
    coeffs = sum(jax.tree.leaves(jax.tree.map(
        lambda b, x: jnp.tensordot(b.reshape(rank, -1), x.reshape(-1), axes=1,
                                   preferred_element_type=jnp.promote_types(b.dtype, jnp.float32)),
        basis, u)))
    removed = jax.tree.map(lambda b: jnp.tensordot(coeffs.astype(b.dtype), b, axes=1), basis)
    step = tu.tree_sub(u, removed)
    # ‖V Vᵀu‖ = ‖Vᵀu‖: V's columns are orthonormal (or zero, with a zero coefficient).
    share = jnp.linalg.norm(coeffs) / jnp.maximum(tu.tree_norm(u), jnp.finfo(residual.dtype).tiny)
    return step, ProjectionState(base_state, basis, state.count + 1, residual, share.astype(residual.dtype))

  return optax.GradientTransformationExtraArgs(init, update)


SOLVER_METRICS = {"cg": ("cg_residual", "cg_iterations"), "projection": ("lanczos_residual", "projected_share")}
"""The step metrics each kind of solver reports (:func:`solver_metrics`): the one place they are named."""


def solver_metrics(opt_state: PyTree) -> dict[str, jax.Array]:
  """The solver inside an optimiser state, as step metrics: a :func:`geodesic_direction`'s or
  :func:`functional_precondition`'s last CG solve (``cg_residual``, relative: ‖(G+λI)x − g‖ / ‖g‖, and
  ``cg_iterations``), or a :func:`functional_projection`'s last refresh and update (``lanczos_residual``,
  ``projected_share``); empty where there is none."""
  solvers = (GeodesicState, ProjectionState)
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, solvers)) if isinstance(s, solvers)]
  if found and isinstance(found[0], ProjectionState):
    return dict(zip(SOLVER_METRICS["projection"], (found[0].residual, found[0].share)))
  found = [s for s in found if isinstance(s, GeodesicState) and s.info is not None]
  if not found:
    return {}
  info = found[0].info
  return dict(zip(SOLVER_METRICS["cg"], (info.cg_relative_residual, info.cg_iterations)))
