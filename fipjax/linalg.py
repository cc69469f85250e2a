"""Matrix-free linear algebra on pytrees: conjugate gradients and Lanczos."""

from __future__ import annotations

import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from fipjax import tree as tu

PyTree = Any


class CGResult(NamedTuple):
  x: PyTree                  # the solution estimate, shaped like b
  residual_norm: jax.Array   # ‖b − A x‖ at exit
  iterations: jax.Array      # iterations run (int32)
  image: PyTree = None       # L x, for ``cg(..., tracked=True)``; None otherwise


def cg(matvec: Callable[[PyTree], PyTree], b: PyTree, x0: PyTree | None = None, *,
       maxiter: int = 20, tol: float = 1e-6, tracked: bool = False) -> CGResult:
  """Conjugate gradients for a symmetric positive-definite ``A``, stopping at ``‖r‖ ≤ tol·‖b‖`` or ``maxiter``.

  ``maxiter`` is a static budget, so the solve jits to one ``while_loop``; warm-start with ``x0`` (from zeros no
  product is spent on the initial residual).

  Args:
    matvec: v ↦ A v on pytrees shaped like ``b``; with ``tracked``, v ↦ (A v, L v) for a linear map L whose
      image ``L x`` of the solution is wanted (e.g. ``Jᵀ x`` when ``A = I + J P Jᵀ``): accumulated alongside x,
      it costs no product after the solve.
    b: right-hand side pytree.
    x0: initial guess (zeros by default).
    maxiter: iteration budget.
    tol: relative residual tolerance.
  """
  apply = matvec if tracked else (lambda v: (matvec(v), ()))
  if x0 is None:
    x, r = tu.tree_zeros_like(b), b
    image = tu.tree_zeros_like(jax.eval_shape(apply, b)[1])
  else:
    ax, image = apply(x0)
    x, r = x0, tu.tree_sub(b, ax)
  rs = tu.tree_vdot(r, r)
  threshold = (tol * tu.tree_norm(b)) ** 2

  def cond(state):
    *_, rs, k = state
    return (k < maxiter) & (rs > threshold)

  def body(state):
    x, image, r, p, rs, k = state
    ap, lp = apply(p)
    alpha = rs / tu.tree_vdot(p, ap)
    x = tu.tree_axpy(alpha, p, x)
    image = tu.tree_axpy(alpha, lp, image)
    r = tu.tree_axpy(-alpha, ap, r)
    rs_new = tu.tree_vdot(r, r)
    p = tu.tree_axpy(rs_new / rs, p, r)
    return x, image, r, p, rs_new, k + 1

  x, image, _, _, rs, k = jax.lax.while_loop(cond, body, (x, image, r, r, rs, jnp.zeros((), jnp.int32)))
  return CGResult(x, jnp.sqrt(rs), k, image if tracked else None)


def lanczos_tridiag(matvec: Callable[[jax.Array], jax.Array], v0: jax.Array, num_iters: int,
                    key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``num_iters`` Lanczos steps with full re-orthogonalisation on flat vectors.

  Returns:
    (alphas [m], betas [m-1], basis [m, n]) with T = tridiag(betas, alphas, betas) ≈ Vᵀ A V.
    When the Krylov space closes early, the basis is restarted with a fresh random direction orthogonal to
    it and the matching beta is zero, so T stays exact for the symmetric ``A``.
  """
  n = v0.shape[0]
  m = num_iters
  basis = jnp.zeros((m + 1, n), v0.dtype).at[0].set(v0 / jnp.linalg.norm(v0))
  scale = jnp.finfo(v0.dtype).eps ** 0.5

  def orthogonalise(w, basis):
    for _ in range(2):  # twice is enough ("twice is enough", Kahan/Parlett)
      w = w - basis.T @ (basis @ w)
    return w

  def body(j, carry):
    basis, alphas, betas = carry
    v = basis[j]
    w = matvec(v).astype(v0.dtype)
    alpha = jnp.vdot(v, w)
    w_norm = jnp.linalg.norm(w)
    w = orthogonalise(w, basis)
    beta = jnp.linalg.norm(w)
    restart = beta <= scale * w_norm + jnp.finfo(v0.dtype).tiny
    # A cond, not a select: a fresh vector costs as much as a product with a large operator's basis.
    w = jax.lax.cond(restart, lambda: orthogonalise(jax.random.normal(jax.random.fold_in(key, j), (n,), v0.dtype),
                                                    basis), lambda: w)
    beta = jnp.where(restart, 0.0, beta)
    basis = basis.at[j + 1].set(w / jnp.linalg.norm(w))
    return basis, alphas.at[j].set(alpha), betas.at[j].set(beta)

  basis, alphas, betas = jax.lax.fori_loop(
      0, m, body, (basis, jnp.zeros((m,), v0.dtype), jnp.zeros((m,), v0.dtype)))
  return alphas, betas[: m - 1], basis[:m]


class EighResult(NamedTuple):
  eigenvalues: jax.Array      # [k], descending for 'largest', ascending for 'smallest'
  eigenvectors: Any           # [k, n] (flat), or a pytree with leading axis k (Metric.eigh)
  residual_norms: jax.Array   # [k] ‖A y − θ y‖ of each Ritz pair, computed with k more products
  tolerance: jax.Array        # tol · ‖A‖, ‖A‖ estimated by the largest |Ritz value| of the pass
  num_iters: int              # Krylov size m of the pass that produced them

  @property
  def converged(self) -> jax.Array:
    """[k] bool: each pair's residual is within the tolerance."""
    return self.residual_norms <= self.tolerance


class ConvergenceWarning(UserWarning):
  """A requested Ritz pair did not reach the residual tolerance within the Krylov budget."""


def default_tol(dtype) -> float:
  """√eps of ``dtype``: residuals at this level give eigenvalues accurate to about eps·‖A‖."""
  return float(jnp.finfo(dtype).eps) ** 0.5


def lanczos_eigh(matvec: Callable[[jax.Array], jax.Array], dim: int, k: int, *, which: str = "largest",
                 num_iters: int | None = None, max_iters: int | None = None, tol: float | None = None,
                 key: jax.Array | None = None, dtype=jnp.float32, on_unconverged: str = "warn") -> EighResult:
  """k extreme eigenpairs of a symmetric operator on R^dim by Lanczos, grown until they converge.

  Each pass runs m Lanczos steps with full re-orthogonalisation and measures every requested Ritz pair's residual
  ``‖A y − θ y‖``. While one exceeds ``tol · ‖A‖`` the Krylov size doubles, up to ``max_iters``: clustered ends of
  a spectrum (the small end of a pull-back metric) need far larger spaces than well-separated ones. Memory is
  ``(m + 1) · dim`` numbers. Under ``jit`` (residuals not concrete) one pass of ``num_iters`` runs and the
  result's ``converged`` says whether to trust it.

  Args:
    matvec: flat v ↦ A v.
    dim: dimension n.
    k: number of eigenpairs.
    which: 'largest' or 'smallest'.
    num_iters: first Krylov size m (k ≤ m ≤ n); defaults to min(n, max(2k + 20, 40)). m = n is exact.
    max_iters: largest Krylov size tried; defaults to min(n, 4 · num_iters). ``max_iters = num_iters`` runs
      one pass.
    tol: residual tolerance relative to ‖A‖; defaults to √eps of ``dtype`` (:func:`default_tol`).
    key: PRNG key for the start vector.
    dtype: dtype of the Lanczos vectors.
    on_unconverged: 'warn' (a :class:`ConvergenceWarning`), 'raise' (``ValueError``) or 'ignore'.

  Returns:
    :class:`EighResult`.
  """
  if which not in ("largest", "smallest"):
    raise ValueError(f"which must be 'largest' or 'smallest', got {which!r}")
  if on_unconverged not in ("warn", "raise", "ignore"):
    raise ValueError(f"on_unconverged must be 'warn', 'raise' or 'ignore', got {on_unconverged!r}")
  m = min(dim, max(2 * k + 20, 40)) if num_iters is None else num_iters
  top = min(dim, 4 * m) if max_iters is None else max_iters
  if not k <= m <= top <= dim:
    raise ValueError(f"need k ≤ num_iters ≤ max_iters ≤ dim, got k={k}, num_iters={m}, max_iters={top}, dim={dim}")
  tol = default_tol(dtype) if tol is None else tol
  key = jax.random.PRNGKey(0) if key is None else key
  k0, k1 = jax.random.split(key)
  v0 = jax.random.normal(k0, (dim,), dtype)
  while True:
    result = _ritz_pairs(matvec, v0, m, k, which, tol, k1)
    if isinstance(result.converged, jax.core.Tracer) or bool(jnp.all(result.converged)) or m == top:
      break
    m = min(2 * m, top)
  if not isinstance(result.converged, jax.core.Tracer) and not bool(jnp.all(result.converged)):
    bad = int(jnp.sum(~result.converged))
    msg = (f"lanczos_eigh: {bad} of the {k} {which} eigenpairs did not converge: the worst residual "
           f"‖A y − θ y‖ is {float(jnp.max(result.residual_norms)):.3g}, above tol · ‖A‖ = "
           f"{float(result.tolerance):.3g} (tol = {tol:.3g}), after a Krylov space of {m} (max_iters). Raise max_iters "
           f"(at most dim = {dim}; memory grows as (max_iters + 1) · dim), ask for fewer pairs, loosen tol, or "
           "compute in float64; the result's residual_norms and converged say which pairs to trust.")
    if on_unconverged == "raise":
      raise ValueError(msg)
    if on_unconverged == "warn":
      warnings.warn(msg, ConvergenceWarning, stacklevel=2)
  return result


def _ritz_pairs(matvec, v0, m: int, k: int, which: str, tol: float, key) -> EighResult:
  """One Lanczos pass of size m: the k wanted Ritz pairs with explicit residuals."""
  alphas, betas, basis = lanczos_tridiag(matvec, v0, m, key)
  t = jnp.diag(alphas) + jnp.diag(betas, 1) + jnp.diag(betas, -1)
  evals, evecs = jnp.linalg.eigh(t)
  order = jnp.arange(m - 1, m - 1 - k, -1) if which == "largest" else jnp.arange(k)
  values, vectors = evals[order], (basis.T @ evecs[:, order]).T
  residuals = jax.lax.map(lambda yv: jnp.linalg.norm(matvec(yv[0]) - yv[1] * yv[0]), (vectors, values))
  return EighResult(values, vectors, residuals, tol * jnp.max(jnp.abs(evals)), m)
