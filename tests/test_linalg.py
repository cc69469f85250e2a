import json
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fipjax import geometry, linalg
from fipjax import tree as tu


def _diag_operator(w):
  return lambda v: w * v


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_lanczos_smallest_of_a_clustered_spectrum_converges(x64, dtype):
  """diag(linspace(0, 1, 100)**4): the 5 smallest crowd within 3e-6 of 0 against a spread of 1. A fixed Krylov
  space of 40 returns them wrong by orders of magnitude; the grown one is exact, with residuals to show it."""
  w = jnp.linspace(0.0, 1.0, 100, dtype=dtype) ** 4
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    res = linalg.lanczos_eigh(_diag_operator(w), 100, 5, which="smallest", dtype=dtype)
  chex.assert_shape((res.eigenvalues, res.eigenvectors, res.residual_norms), ((5,), (5, 100), (5,)))
  assert bool(jnp.all(res.converged)) and res.num_iters > 40
  eps = float(jnp.finfo(dtype).eps)
  np.testing.assert_allclose(res.eigenvalues, w[:5], atol=10 * eps)
  exact = jnp.linalg.norm(w[None] * res.eigenvectors - res.eigenvalues[:, None] * res.eigenvectors, axis=1)
  np.testing.assert_allclose(res.residual_norms, exact, rtol=1e-3, atol=10 * eps)
  # A Ritz vector's weight on eigendirections further than δ from its value is at most (residual / δ)².
  delta = 1e-2
  far = jnp.abs(w[None] - res.eigenvalues[:, None]) > delta
  weight = jnp.sum(jnp.where(far, res.eigenvectors**2, 0.0), axis=1)
  assert bool(jnp.all(weight <= (res.residual_norms / delta) ** 2 + 10 * eps)), weight
  if dtype == jnp.float64:      # float32 cannot tell 0, 1e-8 and 1.7e-7 apart: their vectors mix
    np.testing.assert_allclose(jnp.sum(res.eigenvectors[:, :5] ** 2), 5.0, rtol=1e-8)


def test_lanczos_says_when_a_pair_has_not_converged(x64):
  w = jnp.linspace(0.0, 1.0, 100) ** 4
  with pytest.warns(linalg.ConvergenceWarning, match=r"did not converge.*Krylov space of 40.*Raise max_iters"):
    res = linalg.lanczos_eigh(_diag_operator(w), 100, 5, which="smallest", max_iters=40,
                                   dtype=jnp.float64)
  assert res.num_iters == 40 and not bool(jnp.all(res.converged))
  assert float(jnp.max(res.residual_norms)) > float(res.tolerance)
  with pytest.raises(ValueError, match="did not converge"):
    linalg.lanczos_eigh(_diag_operator(w), 100, 5, which="smallest", max_iters=40, on_unconverged="raise")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    linalg.lanczos_eigh(_diag_operator(w), 100, 5, which="smallest", max_iters=40, on_unconverged="ignore")
  with pytest.raises(ValueError, match="on_unconverged"):
    linalg.lanczos_eigh(_diag_operator(w), 100, 5, on_unconverged="quiet")


def test_lanczos_under_jit_runs_one_pass_and_reports(x64):
  w = jnp.linspace(0.0, 1.0, 100) ** 4
  run = jax.jit(lambda w: linalg.lanczos_eigh(_diag_operator(w), 100, 5, which="smallest", dtype=w.dtype))
  res = run(w)
  assert int(res.num_iters) == 40 and not bool(jnp.all(res.converged))   # too small a space, and it says so


def test_lanczos_on_a_rank_deficient_operator(x64):
  """G = B Bᵀ of rank 5 on R^60: the Krylov space closes after 6 steps; restarts find the null space."""
  b = jax.random.normal(jax.random.PRNGKey(0), (60, 5))
  a = b @ b.T
  dense = np.linalg.eigvalsh(np.asarray(a))
  small = linalg.lanczos_eigh(lambda v: a @ v, 60, 8, which="smallest", dtype=a.dtype)
  large = linalg.lanczos_eigh(lambda v: a @ v, 60, 5, which="largest", dtype=a.dtype)
  assert bool(jnp.all(small.converged)) and bool(jnp.all(large.converged))
  np.testing.assert_allclose(small.eigenvalues, 0.0, atol=1e-10 * dense[-1])
  np.testing.assert_allclose(small.eigenvectors @ small.eigenvectors.T, np.eye(8), atol=1e-10)
  np.testing.assert_allclose(jnp.linalg.norm(small.eigenvectors @ a, axis=1), 0.0, atol=1e-10 * dense[-1])
  np.testing.assert_allclose(large.eigenvalues, dense[::-1][:5], rtol=1e-10)


def test_lanczos_on_a_minilm_metric_matches_a_dense_eigendecomposition(x64, small_bert, data_dir):
  """The Fisher–Rao G of a MiniLM Yelp classifier (the packaged checkpoint cut to one layer, float64) on 6 real
  reviews, restricted to the pooler's bias and the 5-way head's bias (389 dimensions) so that G fits dense."""
  from fipjax.models import bert, hub
  graphdef, params, _, _ = hub.load_bert(small_bert, {"yelp": 5}, dtype=jnp.float64)
  params = jax.tree.map(lambda x: x + 0.02 * jax.random.normal(jax.random.PRNGKey(1), x.shape, x.dtype)
                        if x.ndim == 1 and x.shape[0] == 5 else x, params)     # an untrained head's logits tie
  texts = [json.loads(line)["text"] for line in (data_dir / "yelp" / "train.jsonl").open().readlines()[:6]]
  tokens = hub.load_tokenizer(small_bert)(texts, max_length=24, truncation=True, padding="max_length",
                                          return_tensors="np")
  batch = {"input_ids": jnp.asarray(tokens["input_ids"]), "attention_mask": jnp.asarray(tokens["attention_mask"])}
  apply = bert.make_apply(graphdef)
  mask = tu.regex_mask(params, r"(pooler.*bias|yelp.*bias)")
  metric = geometry.pullback_metric(lambda p, x: apply(p, x)["yelp"], params, batch, "fisher_rao").restrict(mask)
  assert metric.dim == 384 + 5
  mv = metric.flat_matvec()
  dense = np.asarray(jax.lax.map(mv, jnp.eye(metric.dim)))
  np.testing.assert_allclose(dense, dense.T, atol=1e-12)
  exact = np.linalg.eigvalsh(dense)
  top = metric.eigh(4, key=jax.random.PRNGKey(0))
  bottom = metric.eigh(4, which="smallest", key=jax.random.PRNGKey(0))
  assert bool(jnp.all(top.converged)) and bool(jnp.all(bottom.converged))
  np.testing.assert_allclose(top.eigenvalues, exact[::-1][:4], rtol=1e-8)
  np.testing.assert_allclose(bottom.eigenvalues, exact[:4], atol=1e-10 * exact[-1])
  vecs = jax.vmap(tu.ravel_fn(metric.like)[0])(top.eigenvectors)
  np.testing.assert_allclose(vecs @ dense @ vecs.T, np.diag(top.eigenvalues), atol=1e-10 * exact[-1])
