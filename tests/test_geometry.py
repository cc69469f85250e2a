import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fipjax import geometry
from fipjax import tree as tu
from conftest import attention_block, init_attention, init_mlp, mlp


def _mlp_problem(dtype=jnp.float64):
  key = jax.random.PRNGKey(0)
  params = init_mlp(key, (3, 5, 4), dtype)
  x = jax.random.normal(jax.random.PRNGKey(1), (7, 3), dtype)
  return mlp, params, x


def _attention_problem(dtype=jnp.float64):
  params = init_attention(jax.random.PRNGKey(2), dtype=dtype)
  x = jax.random.normal(jax.random.PRNGKey(3), (5, 3, 4), dtype)
  return attention_block, params, x


PROBLEMS = {"mlp": _mlp_problem, "attention": _attention_problem}
USER_METRIC = geometry.matrix_metric(lambda z: jnp.diag(1.0 + z**2) + 0.1)  # an arbitrary user metric, SPD


def _random_tree(key, like):
  leaves, treedef = jax.tree.flatten(like)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
@pytest.mark.parametrize("output_metric", ["euclidean", "fisher_rao", USER_METRIC])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_gv_matches_dense_jacobian(x64, problem, output_metric, chunk_size):
  f, params, x = PROBLEMS[problem]()
  metric = geometry.pullback_metric(f, params, x, output_metric, chunk_size=chunk_size)
  reference = geometry.jacobian_metric_dense(f, params, x, output_metric)
  ravel, unravel = tu.ravel_fn(params)
  v = _random_tree(jax.random.PRNGKey(4), params)
  chex.assert_trees_all_close(ravel(metric(v)), reference @ ravel(v), rtol=1e-10, atol=1e-12)
  chex.assert_trees_all_close(metric.dense(), reference, rtol=1e-10, atol=1e-12)


def _second_head(params, x):
  """x [N, 3] -> [N, 2, 5]: a second output leaf with two trailing axes."""
  h = jnp.tanh(x @ params["layer_0"]["kernel"] + params["layer_0"]["bias"])
  return jnp.stack([h, h**2], axis=1)


@pytest.mark.parametrize("output_metric", ["euclidean", "fisher_rao", USER_METRIC])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_pytree_outputs_act_leafwise(x64, output_metric, chunk_size):
  f, params, x = _mlp_problem()
  w = jnp.linspace(0.5, 2.0, x.shape[0])
  v = _random_tree(jax.random.PRNGKey(4), params)
  build = lambda g: geometry.pullback_metric(g, params, x, output_metric, weights=w, chunk_size=chunk_size)
  single, second = build(f), build(_second_head)
  as_dict = build(lambda p, x: {"a": f(p, x)})
  as_tuple = build(lambda p, x: (f(p, x), _second_head(p, x)))
  chex.assert_trees_all_close(as_dict(v), single(v), rtol=1e-12, atol=1e-14)
  chex.assert_trees_all_close(as_tuple(v), tu.tree_add(single(v), second(v)), rtol=1e-12, atol=1e-14)
  dense = lambda g: geometry.jacobian_metric_dense(g, params, x, output_metric)
  dense_single, dense_second = dense(f), dense(_second_head)
  chex.assert_trees_all_close(dense(lambda p, x: {"a": f(p, x)}), dense_single, rtol=1e-12)
  chex.assert_trees_all_close(dense(lambda p, x: (f(p, x), _second_head(p, x))), dense_single + dense_second,
                              rtol=1e-12)
  unweighted = geometry.pullback_metric(lambda p, x: (f(p, x), _second_head(p, x)), params, x, output_metric)
  chex.assert_trees_all_close(unweighted.dense(), dense_single + dense_second, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("output_metric", ["euclidean", "fisher_rao"])
def test_symmetric_and_psd(x64, output_metric):
  f, params, x = _attention_problem()
  metric = geometry.pullback_metric(f, params, x, output_metric)
  u, v = _random_tree(jax.random.PRNGKey(5), params), _random_tree(jax.random.PRNGKey(6), params)
  np.testing.assert_allclose(metric.inner(u, v), metric.inner(v, u), rtol=1e-12)
  for i in range(5):
    assert metric.quad(_random_tree(jax.random.PRNGKey(10 + i), params)) >= 0
  assert np.linalg.eigvalsh(metric.dense()).min() > -1e-12


def test_weights_match_repeated_rows(x64):
  f, params, x = _mlp_problem()
  weighted = geometry.pullback_metric(f, params, x[:3], weights=jnp.array([2.0, 1.0, 1.0]))
  repeated = geometry.pullback_metric(f, params, jnp.concatenate([x[:1], x[:3]]))
  chex.assert_trees_all_close(weighted.dense(), repeated.dense(), rtol=1e-12)


def test_composition_matches_dense(x64):
  f, params, x = _mlp_problem()
  g_a = geometry.pullback_metric(f, params, x[:4], "euclidean")
  g_b = geometry.pullback_metric(f, params, x[4:], "fisher_rao")
  a, b = g_a.dense(), g_b.dense()
  eye = np.eye(a.shape[0])
  chex.assert_trees_all_close((g_a + g_b).dense(), a + b, rtol=1e-12)
  chex.assert_trees_all_close((2.5 * g_a).dense(), 2.5 * a, rtol=1e-12)
  chex.assert_trees_all_close((g_a * 2.5).dense(), 2.5 * a, rtol=1e-12)
  chex.assert_trees_all_close(g_b.damped(0.3).dense(), b + 0.3 * eye, rtol=1e-12)
  # Restriction to the second layer: the corresponding principal sub-matrix (leaf order of the subset).
  mask = {"layer_0": {"bias": False, "kernel": False}, "layer_1": {"bias": True, "kernel": True}}
  flags = tu.ravel_fn(params)[0](jax.tree.map(lambda m, p: jnp.full(p.shape, m), mask, params)).astype(bool)
  idx = np.flatnonzero(np.asarray(flags))
  restricted = (g_a + g_b).restrict(mask)
  assert restricted.dim == idx.size
  chex.assert_trees_all_close(restricted.dense(), (a + b)[np.ix_(idx, idx)], rtol=1e-12)


def test_sum_of_metrics(x64):
  f, params, x = _mlp_problem()
  g_a = geometry.pullback_metric(f, params, x[:4], "euclidean")
  g_b = geometry.pullback_metric(f, params, x[4:], "fisher_rao")
  chex.assert_trees_all_close(sum([g_a, g_b]).dense(), (g_a + g_b).dense(), rtol=1e-12)
  assert sum([g_a]) is g_a
  with pytest.raises(TypeError):
    1 + g_a


def test_invalid_weights_raise_unless_traced():
  f, params, x = _mlp_problem(jnp.float32)
  n = x.shape[0]
  with pytest.raises(ValueError, match="sum to zero"):
    geometry.pullback_metric(f, params, x, weights=jnp.zeros(n))
  with pytest.raises(ValueError, match="negative"):
    geometry.pullback_metric(f, params, x, weights=jnp.ones(n).at[0].set(-1.0))
  with pytest.raises(ValueError, match="one weight per"):
    geometry.pullback_metric(f, params, x, weights=jnp.ones(n + 1))
  # Traced weights cannot be inspected: no check, no error at trace time.
  v = jax.tree.map(jnp.ones_like, params)
  gv = jax.jit(lambda w: geometry.pullback_metric(f, params, x, weights=w)(v))(jnp.ones(n))
  chex.assert_tree_all_finite(gv)


def test_composition_errors():
  f, params, x = _mlp_problem(jnp.float32)
  g = geometry.pullback_metric(f, params, x)
  other = geometry.pullback_metric(lambda p, x: x @ p["w"], {"w": jnp.ones((3, 2))}, x)
  with pytest.raises(ValueError, match="structures differ"):
    g + other
  with pytest.raises(ValueError, match="empty mask"):
    g.restrict(jax.tree.map(lambda _: False, params))
  with pytest.raises(ValueError, match="unknown output metric"):
    geometry.pullback_metric(f, params, x, "cosine")


@pytest.mark.parametrize("output_metric", ["euclidean", "fisher_rao"])
def test_pullback_factor_squares_to_the_metric(x64, output_metric):
  f, params, x = _attention_problem()
  factor = geometry.pullback_factor(f, params, x, output_metric)
  g = np.asarray(geometry.pullback_metric(f, params, x, output_metric).dense())
  ravel, unravel = tu.ravel_fn(params)
  jhat = jax.vmap(lambda e: jnp.ravel(factor.apply(unravel(e))))(jnp.eye(g.shape[0])).T    # [N·K, P]
  np.testing.assert_allclose(jhat.T @ jhat, g, atol=1e-12)
  w = jax.random.normal(jax.random.PRNGKey(4), factor.outputs.shape)
  np.testing.assert_allclose(ravel(factor.transpose(w)), jhat.T @ jnp.ravel(w), atol=1e-12)
  with pytest.raises(ValueError, match="no square-root factor"):
    geometry.pullback_factor(f, params, x, USER_METRIC)


@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_lanczos_matches_eigh(x64, which):
  f, params, x = _attention_problem()
  metric = geometry.pullback_metric(f, params, x, "fisher_rao").damped(1e-3)
  dense = np.asarray(metric.dense())
  exact = np.linalg.eigvalsh(dense)
  k = 4
  res = metric.eigh(k, which=which, num_iters=metric.dim, key=jax.random.PRNGKey(0))
  evals, evecs = res.eigenvalues, res.eigenvectors
  assert bool(np.all(res.converged)) and res.num_iters == metric.dim
  expected = exact[::-1][:k] if which == "largest" else exact[:k]
  np.testing.assert_allclose(evals, expected, rtol=1e-6, atol=1e-9)
  ravel = tu.ravel_fn(params)[0]
  vecs = jax.vmap(ravel)(evecs)
  chex.assert_shape(vecs, (k, metric.dim))
  np.testing.assert_allclose(vecs @ dense @ vecs.T, np.diag(evals), atol=1e-7)


def test_lanczos_top_eigenvalues_converge_with_small_krylov_space(x64):
  f, params, x = _attention_problem()
  metric = geometry.pullback_metric(f, params, x, "euclidean")
  exact = np.linalg.eigvalsh(np.asarray(metric.dense()))[::-1]
  res = metric.eigh(2, num_iters=30, max_iters=30, key=jax.random.PRNGKey(1))
  evals = res.eigenvalues
  assert res.num_iters == 30 and bool(np.all(res.converged))
  np.testing.assert_allclose(evals, exact[:2], rtol=1e-8)


def test_hutchinson_trace(x64):
  f, params, x = _mlp_problem()
  metric = geometry.pullback_metric(f, params, x, "fisher_rao")
  exact = float(jnp.trace(metric.dense()))
  estimate = float(metric.trace(jax.random.PRNGKey(0), num_samples=4000))
  assert abs(estimate - exact) < 0.05 * exact


@pytest.mark.parametrize("distance", sorted(geometry.DISTANCES))
def test_quadratic_form_is_second_order(x64, distance):
  f, params, x = _attention_problem()
  direction = _random_tree(jax.random.PRNGKey(7), params)
  errors = []
  for eps in (1e-2, 5e-3, 2.5e-3):
    step = tu.tree_scale(eps, direction)
    exact = geometry.functional_distance(f, params, tu.tree_add(params, step), x, distance)
    approx = geometry.quadratic_distance(f, params, step, x, distance)
    errors.append(abs(float(exact - approx)))
  ratios = np.array(errors[:-1]) / np.array(errors[1:])
  # Error = O(ε³): halving ε divides it by ≥ 8 (≈ 8; a symmetric distance such as Bhattacharyya can cancel the
  # cubic term and do better). A first-order mistake in the form would give ratios ≈ 4.
  assert np.all(ratios > 6.5), ratios


def test_distances_vanish_at_reference_and_are_positive():
  z = jax.random.normal(jax.random.PRNGKey(0), (6, 5))
  z2 = z + jax.random.normal(jax.random.PRNGKey(1), (6, 5))
  for d in geometry.DISTANCES.values():
    chex.assert_trees_all_close(d.fn(z, z), jnp.zeros(6), atol=1e-6)
    assert bool(jnp.all(d.fn(z2, z) > 0))
  chex.assert_shape(geometry.bhattacharyya(z, z2), (6,))


def test_path_length(x64):
  f, params, x = _mlp_problem()
  direction = _random_tree(jax.random.PRNGKey(8), params)
  path = [tu.tree_add(params, tu.tree_scale(0.01 * t, direction)) for t in range(4)]
  functional, euclid = geometry.path_length(f, path, x, "squared_euclidean")
  np.testing.assert_allclose(euclid, 0.03 * tu.tree_norm(direction), rtol=1e-12)
  expected = sum(float(jnp.sqrt(geometry.functional_distance(f, a, b, x))) for a, b in zip(path[:-1], path[1:]))
  np.testing.assert_allclose(functional, expected, rtol=1e-10)


def test_float32_and_jit_agree_with_eager():
  f, params, x = _attention_problem(jnp.float32)
  v = _random_tree(jax.random.PRNGKey(9), params)

  def gv(params, x, v):
    return geometry.pullback_metric(f, params, x, "fisher_rao", chunk_size=2).damped(0.1)(v)

  eager = gv(params, x, v)
  jitted = jax.jit(gv)(params, x, v)
  chex.assert_tree_all_finite(jitted)
  chex.assert_trees_all_close(eager, jitted, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_equal_dtypes(jitted, params)
  with jax.enable_x64(True):
    params64 = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    v64 = jax.tree.map(lambda a: a.astype(jnp.float64), v)
    ref = gv(params64, x.astype(jnp.float64), v64)
  chex.assert_trees_all_close(jitted, jax.tree.map(lambda a: a.astype(jnp.float32), ref), rtol=1e-4, atol=1e-5)
