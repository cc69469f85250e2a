"""Matrix-free linear algebra on pytrees: conjugate gradients and Lanczos."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from fipjax import tree as tu

PyTree = Any


class CGResult(NamedTuple):
  x: PyTree                  # the solution estimate, shaped like b
  residual_norm: jax.Array   # ‖b − A x‖ at exit
  iterations: jax.Array      # iterations run (int32)


def cg(matvec: Callable[[PyTree], PyTree], b: PyTree, x0: PyTree | None = None, *,
       maxiter: int = 20, tol: float = 1e-6) -> CGResult:
  """Conjugate gradients for a symmetric positive-definite ``A``, stopping at ``‖r‖ ≤ tol·‖b‖`` or ``maxiter``.

  ``maxiter`` is a static budget, so the solve jits to one ``while_loop``; warm-start with ``x0``.

  Args:
    matvec: v ↦ A v on pytrees shaped like ``b``.
    b: right-hand side pytree.
    x0: initial guess (zeros by default).
    maxiter: iteration budget.
    tol: relative residual tolerance.
  """
  x = tu.tree_zeros_like(b) if x0 is None else x0
  r = tu.tree_sub(b, matvec(x))
  rs = tu.tree_vdot(r, r)
  threshold = (tol * tu.tree_norm(b)) ** 2

  def cond(state):
    _, _, _, rs, k = state
    return (k < maxiter) & (rs > threshold)

  def body(state):
    x, r, p, rs, k = state
    ap = matvec(p)
    alpha = rs / tu.tree_vdot(p, ap)
    x = tu.tree_axpy(alpha, p, x)
    r = tu.tree_axpy(-alpha, ap, r)
    rs_new = tu.tree_vdot(r, r)
    p = tu.tree_axpy(rs_new / rs, p, r)
    return x, r, p, rs_new, k + 1

  x, _, _, rs, k = jax.lax.while_loop(cond, body, (x, r, r, rs, jnp.zeros((), jnp.int32)))
  return CGResult(x, jnp.sqrt(rs), k)


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
    w = matvec(v)
    alpha = jnp.vdot(v, w)
    w_norm = jnp.linalg.norm(w)
    w = orthogonalise(w, basis)
    beta = jnp.linalg.norm(w)
    restart = beta <= scale * w_norm + jnp.finfo(v0.dtype).tiny
    fresh = orthogonalise(jax.random.normal(jax.random.fold_in(key, j), (n,), v0.dtype), basis)
    w = jnp.where(restart, fresh, w)
    beta = jnp.where(restart, 0.0, beta)
    basis = basis.at[j + 1].set(w / jnp.linalg.norm(w))
    return basis, alphas.at[j].set(alpha), betas.at[j].set(beta)

  basis, alphas, betas = jax.lax.fori_loop(
      0, m, body, (basis, jnp.zeros((m,), v0.dtype), jnp.zeros((m,), v0.dtype)))
  return alphas, betas[: m - 1], basis[:m]


def lanczos_eigh(matvec: Callable[[jax.Array], jax.Array], dim: int, k: int, *, which: str = "largest",
                 num_iters: int | None = None, key: jax.Array | None = None,
                 dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
  """k extreme eigenpairs of a symmetric operator on R^dim by Lanczos.

  Args:
    matvec: flat v ↦ A v.
    dim: dimension n.
    k: number of eigenpairs.
    which: 'largest' or 'smallest'.
    num_iters: Krylov dimension m (k ≤ m ≤ n); defaults to min(n, max(2k + 20, 40)). m = n is exact.
    key: PRNG key for the start vector.

  Returns:
    (eigenvalues [k], eigenvectors [k, n]), eigenvalues in descending order for 'largest', ascending for
    'smallest'.
  """
  if which not in ("largest", "smallest"):
    raise ValueError(f"which must be 'largest' or 'smallest', got {which!r}")
  m = min(dim, max(2 * k + 20, 40)) if num_iters is None else num_iters
  if not k <= m <= dim:
    raise ValueError(f"need k ≤ num_iters ≤ dim, got k={k}, num_iters={m}, dim={dim}")
  key = jax.random.PRNGKey(0) if key is None else key
  k0, k1 = jax.random.split(key)
  alphas, betas, basis = lanczos_tridiag(matvec, jax.random.normal(k0, (dim,), dtype), m, k1)
  t = jnp.diag(alphas) + jnp.diag(betas, 1) + jnp.diag(betas, -1)
  evals, evecs = jnp.linalg.eigh(t)
  order = jnp.arange(m - 1, m - 1 - k, -1) if which == "largest" else jnp.arange(k)
  return evals[order], (basis.T @ evecs[:, order]).T
