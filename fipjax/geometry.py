"""Pull-back metrics on weight space, functional distances, and path lengths.

A network is any pure ``f(params, inputs) -> outputs`` with outputs ``[N, ...]`` (one row per input), or a pytree
of such arrays (several heads): output metrics then act on each leaf and the leaves' metrics add. An output
metric ``M`` acts on output tangents; pulled back through ``f`` on reference inputs ``x_1..x_N`` it gives the
weight-space metric ``G(θ) = Σ_n w_n J_nᵀ M_n J_n / Σ_n w_n`` with ``J_n = ∂f(θ, x_n)/∂θ``. Products with ``G`` use
``jax.linearize`` and ``jax.linear_transpose``: J is never formed, except by :meth:`Metric.dense` for small models.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fipjax import linalg
from fipjax import tree as tu

PyTree = Any
Apply = Callable[[PyTree, PyTree], PyTree]
"""``f(params, inputs) -> outputs``: an array ``[N, K...]`` or a pytree of them, all with leading axis N."""
OutputMetric = Callable[[jax.Array, jax.Array], jax.Array]
"""``(outputs z [B, K...], tangent u [B, K...]) -> M(z) u [B, K...]``: a metric on output space, per row.

For pytree outputs it is applied to each leaf separately (see :func:`leafwise`)."""


# ---------------------------------------------------------------------------------------------------------------
# Output-space metrics.


def euclidean(z: jax.Array, u: jax.Array) -> jax.Array:
  """M = I: the squared-Euclidean distance between outputs."""
  del z
  return u


def fisher_rao(z: jax.Array, u: jax.Array) -> jax.Array:
  """Fisher–Rao metric of ``softmax(z)`` in logit coordinates: ``M = diag(p) − p pᵀ`` over the last axis.

  It is the Hessian of cross-entropy in the logits, so the pull-back is the Gauss–Newton matrix (= the Fisher).
  """
  p = jax.nn.softmax(z.astype(jnp.promote_types(z.dtype, jnp.float32)), axis=-1).astype(u.dtype)
  pu = p * u
  return pu - p * jnp.sum(pu, axis=-1, keepdims=True)


def matrix_metric(metric_matrix: Callable[[jax.Array], jax.Array]) -> OutputMetric:
  """An output metric from ``z [K] -> M(z) [K, K]`` (a user's own metric); rows of z are independent."""

  def apply(z, u):
    flat_z, flat_u = z.reshape(-1, z.shape[-1]), u.reshape(-1, u.shape[-1])
    mu = jax.vmap(lambda zi, ui: metric_matrix(zi) @ ui)(flat_z, flat_u)
    return mu.reshape(u.shape)

  return apply


OUTPUT_METRICS: dict[str, OutputMetric] = {"euclidean": euclidean, "fisher_rao": fisher_rao}


def _fisher_rao_factor(z: jax.Array, u: jax.Array, transpose: bool) -> jax.Array:
  """B u (or Bᵀ u) with ``BᵀB = diag(p) − p pᵀ``: ``B = diag(√p)(I − 1pᵀ)`` over the last axis."""
  p = jax.nn.softmax(z.astype(jnp.promote_types(z.dtype, jnp.float32)), axis=-1).astype(u.dtype)
  if transpose:
    su = jnp.sqrt(p) * u
    return su - p * jnp.sum(su, axis=-1, keepdims=True)
  return jnp.sqrt(p) * (u - jnp.sum(p * u, axis=-1, keepdims=True))


OUTPUT_FACTORS = {"euclidean": lambda z, u, transpose: u, "fisher_rao": _fisher_rao_factor}
"""``name -> factor(z, u, transpose)``: B u or Bᵀ u with ``M(z) = BᵀB`` (for :func:`pullback_factor`)."""


def leafwise(metric: OutputMetric) -> Callable[[PyTree, PyTree], PyTree]:
  """The output metric on a pytree of outputs: block-diagonal, ``metric`` on each leaf ``[B, K...]``."""
  return lambda z, u: jax.tree.map(metric, z, u)


def get_output_metric(metric: str | OutputMetric) -> OutputMetric:
  if callable(metric):
    return metric
  if metric not in OUTPUT_METRICS:
    raise ValueError(f"unknown output metric {metric!r}; choose one of {sorted(OUTPUT_METRICS)} or pass a "
                     "function (outputs, tangent) -> metric·tangent")
  return OUTPUT_METRICS[metric]


# ---------------------------------------------------------------------------------------------------------------
# The metric value: a matrix-free symmetric PSD operator on a parameter pytree space.


@dataclasses.dataclass(frozen=True)
class Metric:
  """A symmetric positive semi-definite operator on pytrees shaped like ``like``.

  Metrics compose: ``g1 + g2`` (several old tasks), ``c * g`` (scaling), ``g.damped(λ)`` (``+ λI``),
  ``g.restrict(mask)`` (a parameter subset; the result acts on the selected leaves only). Every method is pure
  and jit-able; build metrics inside the jitted function that uses them.

  Attributes:
    matvec: v ↦ G v, pytree to pytree.
    like: a pytree of arrays (or ``jax.ShapeDtypeStruct``) that fixes the space's structure, shapes and dtypes.
  """

  matvec: Callable[[PyTree], PyTree]
  like: PyTree

  def __call__(self, v: PyTree) -> PyTree:
    return self.matvec(v)

  def inner(self, u: PyTree, v: PyTree) -> jax.Array:
    """⟨u, G v⟩."""
    return tu.tree_vdot(u, self.matvec(v))

  def quad(self, v: PyTree) -> jax.Array:
    """The quadratic form ``vᵀ G v``: to second order, the functional change caused by a step v."""
    return self.inner(v, v)

  def __add__(self, other: "Metric") -> "Metric":
    tu.check_same_structure(self.like, other.like, "adding metrics")
    return Metric(lambda v: tu.tree_add(self.matvec(v), other.matvec(v)), self.like)

  def __radd__(self, other) -> "Metric":
    # Only ``0 + g``: the start value of Python's ``sum``. Any other number has no meaning as a metric.
    if isinstance(other, int) and not isinstance(other, bool) and other == 0:
      return self
    return NotImplemented

  def __mul__(self, c) -> "Metric":
    return Metric(lambda v: tu.tree_scale(c, self.matvec(v)), self.like)

  __rmul__ = __mul__

  def damped(self, damping) -> "Metric":
    """G + λI."""
    return Metric(lambda v: tu.tree_axpy(damping, v, self.matvec(v)), self.like)

  def restrict(self, mask: PyTree) -> "Metric":
    """The metric on the parameters where the boolean pytree ``mask`` is True (others frozen at zero change).

    Vectors of the restricted metric are ``tree.select(v, mask)``: masked-out leaves are ``optax.MaskedNode``.
    """
    tu.check_same_structure(self.like, mask, "restricting a metric (mask vs parameters)")
    if not any(bool(m) for m in jax.tree.leaves(mask)):
      raise ValueError("restricting a metric to an empty mask: no parameter is selected")
    like = self.like
    return Metric(lambda s: tu.select(self.matvec(tu.embed(s, mask, like)), mask), tu.select(like, mask))

  @property
  def dim(self) -> int:
    return tu.tree_size(self.like)

  @property
  def dtype(self):
    return jnp.result_type(*jax.tree.leaves(self.like))

  def flat_matvec(self) -> Callable[[jax.Array], jax.Array]:
    """The same operator on flat vectors of length :attr:`dim` (leaf order of ``like``)."""
    like = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), self.like)
    ravel, unravel = tu.ravel_fn(like)
    return lambda v: ravel(self.matvec(unravel(v)))

  def dense(self) -> jax.Array:
    """The dense ``[dim, dim]`` matrix (small models and tests only)."""
    return jax.vmap(self.flat_matvec())(jnp.eye(self.dim, dtype=self.dtype)).T

  def trace(self, key: jax.Array, num_samples: int = 64) -> jax.Array:
    """Hutchinson estimate ``E_z[zᵀ G z]`` with Rademacher z; samples run sequentially to bound memory."""
    mv = self.flat_matvec()
    signs = jax.random.rademacher(key, (num_samples, self.dim), dtype=self.dtype)
    return jnp.mean(jax.lax.map(lambda z: jnp.vdot(z, mv(z)), signs))

  def eigh(self, k: int, *, which: str = "largest", num_iters: int | None = None, max_iters: int | None = None,
           tol: float | None = None, key: jax.Array | None = None,
           on_unconverged: str = "warn") -> linalg.EighResult:
    """k extreme eigenpairs by matrix-free Lanczos with full re-orthogonalisation, the Krylov space grown until
    every pair's residual is within ``tol · ‖G‖`` (see :func:`fipjax.linalg.lanczos_eigh`; a
    :class:`~fipjax.linalg.ConvergenceWarning` when ``max_iters`` is not enough).

    The smallest eigenvalues' eigenvectors span the functionally invariant directions.

    Returns:
      :class:`~fipjax.linalg.EighResult`: eigenvalues ``[k]``, eigenvectors as a pytree like ``like`` whose
      leaves have a leading axis k, residual norms ``[k]``, the tolerance and the Krylov size used.
    """
    result = linalg.lanczos_eigh(self.flat_matvec(), self.dim, k, which=which, num_iters=num_iters,
                                 max_iters=max_iters, tol=tol, key=key, dtype=self.dtype,
                                 on_unconverged=on_unconverged)
    _, unravel = tu.ravel_fn(jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), self.like))
    return result._replace(eigenvectors=jax.vmap(unravel)(result.eigenvectors))


class Factor(NamedTuple):
  """``Ĵ`` with ``G = ĴᵀĴ``: ``apply`` maps parameter pytrees to output space (``Ĵ v``), ``transpose`` back
  (``Ĵᵀ w``); ``residual(z_ref)`` is ``N^-½ B (f(θ, x) − z_ref)`` (``‖·‖²`` the metric's squared distance to
  reference outputs, to second order); ``outputs`` is a zero pytree of the output space's shape."""
  apply: Callable[[PyTree], PyTree]
  transpose: Callable[[PyTree], PyTree]
  residual: Callable[[PyTree], PyTree]
  outputs: PyTree


def pullback_factor(f: Apply, params: PyTree, inputs: PyTree, output_metric: str = "fisher_rao") -> Factor:
  """The square-root factor ``Ĵ = N^-½ B J`` of :func:`pullback_metric`'s uniform-weight G (``M = BᵀB``):
  products in the N·K-dimensional output space, for solves whose parameter-space form is ill-conditioned.

  Args:
    f, params, inputs: as :func:`pullback_metric`.
    output_metric: 'fisher_rao' or 'euclidean' (the metrics with a known factor).
  """
  if output_metric not in OUTPUT_FACTORS:
    raise ValueError(f"no square-root factor is known for the output metric {output_metric!r}; use one of "
                     f"{sorted(OUTPUT_FACTORS)}")
  b = OUTPUT_FACTORS[output_metric]
  n = num_rows(inputs)
  z, lin = jax.linearize(lambda p: f(p, inputs), params)
  transpose = jax.linear_transpose(lin, params)
  scale = 1.0 / np.sqrt(n)
  apply = lambda v: jax.tree.map(lambda zi, ui: scale * b(zi, ui, False), z, lin(v))
  back = lambda w: tu.tree_scale(scale, transpose(jax.tree.map(lambda zi, wi: b(zi, wi, True), z, w))[0])
  residual = lambda z_ref: jax.tree.map(lambda zi, ri: scale * b(zi, (zi - ri).astype(zi.dtype), False), z, z_ref)
  return Factor(apply, back, residual, jax.tree.map(jnp.zeros_like, z))


def num_rows(inputs: PyTree) -> int:
  """The shared leading (batch) size of a pytree of inputs; an error if the leaves disagree."""
  sizes = {x.shape[0] for x in jax.tree.leaves(inputs)}
  if len(sizes) != 1:
    raise ValueError(f"reference inputs must share one leading (batch) axis; got leading sizes {sorted(sizes)}")
  return sizes.pop()


def _weighted(u: PyTree, w: jax.Array) -> PyTree:
  """Row n of every leaf ``[B, K...]`` of ``u`` times ``w [B]``."""

  def leaf(x):
    if x.ndim == 0 or x.shape[0] != w.shape[0]:
      raise ValueError(f"every output leaf needs the leading (batch) axis of the inputs, size {w.shape[0]}; "
                       f"got an output of shape {x.shape}")
    return x * w.reshape(w.shape + (1,) * (x.ndim - 1)).astype(x.dtype)

  return jax.tree.map(leaf, u)


def _check_weights(w, n: int) -> None:
  """Shape always; values only when concrete (traced weights cannot be inspected, and then go unchecked)."""
  if jnp.shape(w) != (n,):
    raise ValueError(f"weights must have shape [N] = ({n},), one weight per reference input; got {jnp.shape(w)}")
  if isinstance(w, jax.core.Tracer):
    return
  w = np.asarray(w)
  if np.any(w < 0):
    raise ValueError(f"weights must be non-negative; got {int(np.sum(w < 0))} negative of {n}")
  if not np.sum(w) > 0:    # also catches NaN
    raise ValueError(f"weights sum to zero (or are not finite): sum = {np.sum(w)}; the metric would be NaN")


def pullback_metric(f: Apply, params: PyTree, inputs: PyTree, output_metric: str | OutputMetric = "euclidean",
                    *, weights: jax.Array | None = None, chunk_size: int | None = None) -> Metric:
  """``G(θ) = Σ_n w_n J_nᵀ M(f(θ, x_n)) J_n / Σ_n w_n``, matrix-free.

  Args:
    f: ``f(params, inputs) -> outputs [N, ...]`` (or a pytree of such arrays), pure.
    params: θ, the point where the metric is taken.
    inputs: reference inputs, a pytree with leading axis N.
    output_metric: 'euclidean', 'fisher_rao' or a function ``(z, u) -> M(z) u``; applied to each output leaf.
    weights: optional ``[N]`` non-negative weights with a positive sum (default: uniform). Concrete weights are
      checked (ValueError); traced ones (under jit) are not.
    chunk_size: None linearises all N inputs once (fast repeated products, memory ∝ N). An int processes
      micro-batches of that size in a ``lax.scan`` inside every product (memory ∝ chunk_size, one primal pass per
      product); N is padded with zero-weight rows to a multiple.
  """
  m = leafwise(get_output_metric(output_metric))
  n = num_rows(inputs)
  dtype = jnp.result_type(*jax.tree.leaves(params))
  if weights is not None:
    _check_weights(weights, n)
  w = jnp.ones((n,), dtype) if weights is None else jnp.asarray(weights, dtype)
  total = jnp.sum(w)

  def chunk_product(x, wx, v):
    z, lin = jax.linearize(lambda p: f(p, x), params)
    (gv,) = jax.linear_transpose(lin, params)(_weighted(m(z, lin(v)), wx))
    return gv

  # Named scopes let a profile tell the one-off primal pass from the per-product JVP + transpose.
  if chunk_size is None or chunk_size >= n:
    with jax.named_scope("metric_linearize"):
      z, lin = jax.linearize(lambda p: f(p, inputs), params)
      transpose = jax.linear_transpose(lin, params)

    @jax.named_scope("metric_product")
    def matvec(v):
      (gv,) = transpose(_weighted(m(z, lin(v)), w))
      return tu.tree_scale(1.0 / total, gv)

    return Metric(matvec, params)

  n_chunks = -(-n // chunk_size)
  pad = n_chunks * chunk_size - n
  pad_rows = lambda x: jnp.concatenate([x, jnp.repeat(x[:1], pad, axis=0)]) if pad else x
  chunks = jax.tree.map(lambda x: pad_rows(x).reshape((n_chunks, chunk_size) + x.shape[1:]), inputs)
  w_chunks = jnp.concatenate([w, jnp.zeros((pad,), w.dtype)]).reshape(n_chunks, chunk_size)

  @jax.named_scope("metric_product")
  def matvec(v):
    def step(acc, xw):
      return tu.tree_add(acc, chunk_product(xw[0], xw[1], v)), None

    acc, _ = jax.lax.scan(step, tu.tree_zeros_like(params), (chunks, w_chunks))
    return tu.tree_scale(1.0 / total, acc)

  return Metric(matvec, params)


def jacobian_metric_dense(f: Apply, params: PyTree, inputs: PyTree,
                          output_metric: str | OutputMetric = "euclidean") -> jax.Array:
  """Reference ``(1/N) Σ Jᵀ M J`` from a materialised ``jax.jacfwd`` Jacobian — for tests on small models only.

  Pytree outputs: the sum over leaves of each leaf's ``(1/N) Σ Jᵀ M J``. Returns ``[P, P]``.
  """
  m = get_output_metric(output_metric)
  ravel, unravel = tu.ravel_fn(params)
  flat = ravel(params)
  n = num_rows(inputs)

  def leaf(z, jac):                                              # z [N, K...], jac [N, K..., P]
    jac = jac.reshape(n, -1, flat.shape[0])                      # [N, K, P]
    mj = jax.vmap(lambda col: m(z, col.reshape(z.shape)).reshape(n, -1), in_axes=2, out_axes=2)(jac)
    return jnp.einsum("nkp,nkq->pq", jac, mj) / n

  zs = f(params, inputs)
  jacs = jax.jacfwd(lambda p: f(unravel(p), inputs))(flat)
  return sum(jax.tree.leaves(jax.tree.map(leaf, zs, jacs)))


# ---------------------------------------------------------------------------------------------------------------
# Distances between outputs, their second-order forms, and path lengths.


def squared_euclidean(z: jax.Array, z_ref: jax.Array) -> jax.Array:
  """‖z − z_ref‖² per row, ``[B, K] -> [B]``."""
  d = (z - z_ref).reshape(z.shape[0], -1)
  return jnp.sum(d * d, axis=-1)


def kl_divergence(z: jax.Array, z_ref: jax.Array) -> jax.Array:
  """KL(softmax(z_ref) ‖ softmax(z)) per row, ``[B, K] -> [B]``."""
  log_p_ref = jax.nn.log_softmax(z_ref, axis=-1)
  return jnp.sum(jnp.exp(log_p_ref) * (log_p_ref - jax.nn.log_softmax(z, axis=-1)), axis=-1)


def bhattacharyya(z: jax.Array, z_ref: jax.Array) -> jax.Array:
  """Bhattacharyya distance ``−log Σ_k √(p_k q_k)`` between ``softmax(z)`` and ``softmax(z_ref)``, per row.

  Computed as ``−logsumexp((log p + log q)/2)``, stable for confident outputs.
  """
  return -jax.nn.logsumexp(0.5 * (jax.nn.log_softmax(z, axis=-1) + jax.nn.log_softmax(z_ref, axis=-1)), axis=-1)


@dataclasses.dataclass(frozen=True)
class Distance:
  """An output distance ``D(z, z_ref) [B]`` and its second-order form ``factor · dzᵀ M dz``."""
  fn: Callable[[jax.Array, jax.Array], jax.Array]
  output_metric: OutputMetric
  factor: float


DISTANCES: dict[str, Distance] = {
    "squared_euclidean": Distance(squared_euclidean, euclidean, 1.0),
    "kl": Distance(kl_divergence, fisher_rao, 0.5),
    "bhattacharyya": Distance(bhattacharyya, fisher_rao, 0.125),
}


def get_distance(distance: str | Distance) -> Distance:
  if isinstance(distance, Distance):
    return distance
  if distance not in DISTANCES:
    raise ValueError(f"unknown distance {distance!r}; choose one of {sorted(DISTANCES)}")
  return DISTANCES[distance]


def functional_distance(f: Apply, params: PyTree, new_params: PyTree, inputs: PyTree,
                        distance: str | Distance = "squared_euclidean") -> jax.Array:
  """Exact mean output distance ``(1/N) Σ_n D(f(θ', x_n), f(θ, x_n))``."""
  d = get_distance(distance)
  return jnp.mean(d.fn(f(new_params, inputs), f(params, inputs)))


def quadratic_distance(f: Apply, params: PyTree, step: PyTree, inputs: PyTree,
                       distance: str | Distance = "squared_euclidean", **metric_kwargs) -> jax.Array:
  """The second-order form of :func:`functional_distance` for ``θ' = θ + step``: ``factor · stepᵀ G step``."""
  d = get_distance(distance)
  return d.factor * pullback_metric(f, params, inputs, d.output_metric, **metric_kwargs).quad(step)


def stack_path(path: PyTree | Sequence[PyTree]) -> PyTree:
  """A path as one pytree with a leading step axis ``T`` (a list of pytrees is stacked)."""
  if isinstance(path, (list, tuple)):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *path)
  return path


def path_length(f: Apply, path: PyTree | Sequence[PyTree], inputs: PyTree,
                distance: str | Distance = "squared_euclidean") -> tuple[jax.Array, jax.Array]:
  """(functional, Euclidean) length of a discrete path θ_0..θ_T.

  Functional length ``Σ_t √D(θ_t, θ_{t+1})`` on ``inputs``; Euclidean length ``Σ_t ‖θ_{t+1} − θ_t‖``.
  """
  d = get_distance(distance)
  stacked = stack_path(path)
  outputs = jax.lax.map(lambda p: f(p, inputs), stacked)         # [T+1, N, K]
  functional = jnp.sum(jnp.sqrt(jax.vmap(lambda a, b: jnp.mean(d.fn(b, a)))(outputs[:-1], outputs[1:])))
  steps = jax.tree.map(lambda x: x[1:] - x[:-1], stacked)
  euclid = jnp.sum(jax.vmap(tu.tree_norm)(steps))
  return functional, euclid
