import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fipjax import config as cf
from fipjax import geometry, linalg, paths
from fipjax import tree as tu
from conftest import init_mlp, mlp


def _problem(dtype=jnp.float64):
  params = init_mlp(jax.random.PRNGKey(0), (4, 8, 3), dtype)
  x_old = jax.random.normal(jax.random.PRNGKey(1), (16, 4), dtype)
  x_new = jax.random.normal(jax.random.PRNGKey(2), (16, 4), dtype) + 1.0
  y_new = jnp.arange(16) % 3

  def loss_new(p, batch):
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(mlp(p, x), y).mean()

  return params, x_old, (x_new, y_new), loss_new


def test_cg_solves_spd_system(x64):
  a = jax.random.normal(jax.random.PRNGKey(0), (12, 12))
  a = a @ a.T + 0.5 * jnp.eye(12)
  b = {"u": jax.random.normal(jax.random.PRNGKey(1), (5,)), "v": jax.random.normal(jax.random.PRNGKey(2), (7,))}
  ravel, unravel = tu.ravel_fn(b)
  res = linalg.cg(lambda t: unravel(a @ ravel(t)), b, maxiter=100, tol=1e-10)
  np.testing.assert_allclose(ravel(res.x), np.linalg.solve(a, ravel(b)), rtol=1e-8)
  assert float(res.residual_norm) <= 1e-10 * float(tu.tree_norm(b))
  # A fixed small budget stops at it; a warm start from the answer stops at once.
  assert int(linalg.cg(lambda t: unravel(a @ ravel(t)), b, maxiter=3).iterations) == 3
  assert int(linalg.cg(lambda t: unravel(a @ ravel(t)), b, res.x, maxiter=100, tol=1e-6).iterations) == 0


@pytest.mark.parametrize("warm", [False, True])
def test_cg_tracks_a_linear_image_of_its_solution_without_extra_products(x64, warm):
  """``tracked``: L x accumulated in the loop equals L applied to the returned x; from zeros no product is spent
  on the initial residual (k iterations, k products), from a warm start one."""
  l = jax.random.normal(jax.random.PRNGKey(3), (9, 6))
  a = jnp.eye(6) + 0.3 * l.T @ l
  b = jax.random.normal(jax.random.PRNGKey(4), (6,))
  calls = []

  def matvec(v):
    jax.debug.callback(lambda: calls.append(1), ordered=True)      # counts products as they run
    return a @ v, l @ v

  x0 = 0.1 * b if warm else None
  res = jax.jit(lambda: linalg.cg(matvec, b, x0, maxiter=4, tol=0.0, tracked=True))()
  jax.effects_barrier()
  assert len(calls) == 4 + warm
  chex.assert_trees_all_close(res.image, l @ res.x, rtol=1e-10)
  chex.assert_trees_all_close(res.x, linalg.cg(lambda v: a @ v, b, x0, maxiter=4, tol=0.0).x, rtol=1e-12)
  assert int(res.iterations) == 4
  assert linalg.cg(lambda v: a @ v, b, maxiter=4).image is None


def test_cg_on_damped_metric_matches_dense_solve(x64):
  params, x_old, _, _ = _problem()
  metric = geometry.pullback_metric(mlp, params, x_old, "fisher_rao").damped(1e-2)
  b = jax.tree.map(jnp.ones_like, params)
  res = linalg.cg(metric, b, maxiter=200, tol=1e-12)
  ravel = tu.ravel_fn(params)[0]
  np.testing.assert_allclose(ravel(res.x), np.linalg.solve(metric.dense(), ravel(b)), rtol=1e-6)


@pytest.mark.parametrize("mask_second_layer", [False, True])
def test_geodesic_step_lowers_new_loss_within_functional_bound(x64, mask_second_layer):
  params, x_old, new_batch, loss_new = _problem()
  mask = {"layer_0": {"bias": False, "kernel": False}, "layer_1": {"bias": True, "kernel": True}}
  max_quad = 1e-4
  step = jax.jit(lambda p: paths.geodesic_step(
      mlp, loss_new, p, x_old, new_batch, beta=1.0, damping=1e-3, max_norm=0.05, max_quad=max_quad,
      cg_iters=50, mask=mask if mask_second_layer else None))
  new_params, info = step(params)
  chex.assert_tree_all_finite(new_params)
  assert float(loss_new(new_params, new_batch)) < float(loss_new(params, new_batch))
  assert float(info.step_norm) <= 0.05 * (1 + 1e-9)
  assert float(info.quad) <= max_quad * (1 + 1e-9)
  exact = geometry.functional_distance(mlp, params, new_params, x_old, "kl")
  assert float(exact) <= 0.5 * max_quad * 1.05   # KL ≈ ½ dθᵀGdθ
  if mask_second_layer:
    chex.assert_trees_all_equal(new_params["layer_0"], params["layer_0"])


def test_geodesic_step_is_more_invariant_than_gradient_step(x64):
  params, x_old, new_batch, loss_new = _problem()
  fip, _ = paths.geodesic_step(mlp, loss_new, params, x_old, new_batch, damping=1e-4, max_norm=0.05, cg_iters=100)
  grad = jax.grad(loss_new)(params, new_batch)
  gd = tu.tree_axpy(-0.05 / tu.tree_norm(grad), grad, params)   # same Euclidean length
  d_fip = geometry.functional_distance(mlp, params, fip, x_old, "kl")
  d_gd = geometry.functional_distance(mlp, params, gd, x_old, "kl")
  assert float(d_fip) < 0.25 * float(d_gd)


def test_geodesic_direction_transform_matches_step(x64):
  params, x_old, new_batch, loss_new = _problem()
  kw = dict(damping=1e-2, max_norm=0.05, cg_iters=300, cg_tol=1e-13)   # converged, so jit/eager agree
  tx = optax.chain(paths.geodesic_direction(mlp, **kw), optax.scale(-1.0))
  state = tx.init(params)
  grads = jax.grad(loss_new)(params, new_batch)
  updates, state = jax.jit(tx.update)(grads, state, params, ref_inputs=x_old)
  expected, _ = paths.geodesic_step(mlp, loss_new, params, x_old, new_batch, **kw)
  chex.assert_trees_all_close(optax.apply_updates(params, updates), expected, rtol=1e-9)


@pytest.mark.parametrize("bounds", ["none", "norm", "quad", "both"])
@pytest.mark.parametrize("measure_quad", [False, True])
def test_solve_and_scale_matches_dense_solve(x64, bounds, measure_quad):
  params, x_old, _, _ = _problem()
  metric = geometry.pullback_metric(mlp, params, x_old, "fisher_rao")
  rhs = jax.tree.map(jnp.ones_like, params)
  ravel, unravel = tu.ravel_fn(params)
  g = np.asarray(metric.dense())
  exact = np.linalg.solve(g + 1e-2 * np.eye(g.shape[0]), ravel(rhs))
  norm, quad = np.linalg.norm(exact), exact @ g @ exact
  max_norm = 0.5 * norm if bounds in ("norm", "both") else None
  max_quad = 0.09 * quad if bounds in ("quad", "both") else None
  expected_scale = {"none": 1.0, "norm": 0.5, "quad": 0.3, "both": 0.3}[bounds]
  step, info = jax.jit(lambda: paths.solve_and_scale(
      metric, rhs, None, damping=1e-2, max_norm=max_norm, max_quad=max_quad, cg_iters=300, cg_tol=1e-13,
      measure_quad=measure_quad))()
  chex.assert_trees_all_close(ravel(step), expected_scale * exact, rtol=1e-8)
  chex.assert_trees_all_close(ravel(info.solution), exact, rtol=1e-8)
  np.testing.assert_allclose(info.scale, expected_scale, rtol=1e-8)
  np.testing.assert_allclose(info.step_norm, expected_scale * norm, rtol=1e-8)
  if measure_quad or max_quad is not None:
    np.testing.assert_allclose(info.quad, expected_scale**2 * quad, rtol=1e-8)
  else:
    assert np.isnan(info.quad)   # not measured: it would cost one more G·v


def test_geodesic_direction_matches_step_under_quad_bound(x64):
  params, x_old, new_batch, loss_new = _problem()
  kw = dict(damping=1e-2, max_norm=0.05, max_quad=1e-5, cg_iters=300, cg_tol=1e-13)
  tx = paths.geodesic_direction(mlp, **kw)
  grads = jax.grad(loss_new)(params, new_batch)
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params, ref_inputs=x_old)
  expected, info = paths.geodesic_step(mlp, loss_new, params, x_old, new_batch, **kw)
  chex.assert_trees_all_close(tu.tree_sub(params, updates), expected, rtol=1e-9)
  np.testing.assert_allclose(state.info.quad, info.quad, rtol=1e-9)
  np.testing.assert_allclose(info.quad, 1e-5, rtol=1e-9)   # the quad bound is the active one here
  np.testing.assert_allclose(state.info.scale, info.scale, rtol=1e-9)
  # Without a quad bound, geodesic_step still reports the quad; geodesic_direction skips that G·v (NaN).
  del kw["max_quad"]
  _, state = paths.geodesic_direction(mlp, **kw).update(grads, tx.init(params), params, ref_inputs=x_old)
  _, info = paths.geodesic_step(mlp, loss_new, params, x_old, new_batch, **kw)
  assert np.isnan(state.info.quad)
  chex.assert_tree_all_finite(info.quad)
  assert float(info.quad) > 0


def test_penalty_uses_stored_reference_outputs(x64):
  params, x_old, _, _ = _problem()
  ref = paths.reference_outputs(mlp, params, x_old, batch_size=5)
  chex.assert_trees_all_close(ref, mlp(params, x_old), rtol=1e-12)
  penalty = paths.fip_penalty(mlp, "bhattacharyya", beta=8.0)
  assert float(penalty(params, x_old, ref)) == pytest.approx(0.0, abs=1e-12)
  grad = jax.grad(penalty)(params, x_old, ref)
  chex.assert_trees_all_close(grad, tu.tree_zeros_like(params), atol=1e-12)
  # Second order: the Bhattacharyya penalty is β/8 · dθᵀ G_FisherRao dθ at θ_ref.
  ravel, unravel = tu.ravel_fn(params)
  hess = jax.hessian(lambda v: penalty(unravel(v), x_old, ref))(ravel(params))
  g = geometry.pullback_metric(mlp, params, x_old, "fisher_rao").dense()
  chex.assert_trees_all_close(hess, 2 * (8.0 / 8) * g, rtol=1e-7, atol=1e-10)   # ∇²(β·D) = 2·β·factor·G


def test_path_record_accumulates():
  record = paths.PathRecord()
  record.append(0, 1.0, 0.0, 0.5, 0.04)
  record.append(1, 0.8, 0.01, 0.5, 0.09)
  d = record.as_dict()
  assert d["euclidean_length"] == [0.5, 1.0]
  np.testing.assert_allclose(d["functional_length"], [0.2, 0.5])
  assert len(record) == 2


@pytest.mark.parametrize("cg_iters", [2, 200])
def test_training_steps_report_each_cg_solve(x64, cg_iters):
  """fip-geodesic's step metrics carry its solve's relative residual and iterations, equal to a dense check."""
  from fipjax import continual
  params, x_old, new_batch, loss_new = _problem()
  lr, damping = 0.1, 1e-3
  method = continual.fip_geodesic(lambda p, b, rng=None: loss_new(p, b), mlp, learning_rate=lr, damping=damping,
                                  cg_iters=cg_iters)
  final, _, history = continual.fit(method, params, iter([{"new": new_batch, "replay": {"inputs": x_old}}]), 1)
  ravel, _ = tu.ravel_fn(params)
  g_dense = geometry.pullback_metric(mlp, params, x_old, "fisher_rao").damped(damping).dense()
  grad = ravel(jax.grad(loss_new)(params, new_batch))
  x = (ravel(params) - ravel(final)) / lr
  exact = float(jnp.linalg.norm(g_dense @ x - grad) / jnp.linalg.norm(grad))
  row = history[0]
  assert row["cg_iterations"] <= cg_iters and row["cg_residual"] == pytest.approx(exact, rel=1e-4, abs=1e-9)
  assert (row["cg_residual"] > 1e-3) if cg_iters == 2 else (row["cg_residual"] <= 1e-6)
  curves = continual.solver_curves(history)
  assert curves == {"solver": {"cg_residual": [row["cg_residual"]], "cg_iterations": [row["cg_iterations"]]}}
  assert "CG relative residual" in continual.solver_summary(curves)
  assert continual.solver_curves([{"loss": 1.0}]) == {} and continual.solver_summary({}) == ""


def test_functional_precondition_solves_against_adams_metric_plus_kappa_g(x64):
  """Two AdamW steps, each solved as (κG + D) dθ = D u (u AdamW's step, D = √v̂ + ε), against a dense solve;
  κ = 0 is AdamW itself."""
  params, x_old, new_batch, loss_new = _problem()
  base = optax.adamw(1e-2, weight_decay=0.1)
  kappa = 0.5
  tx = paths.functional_precondition(base, mlp, kappa=kappa, cg_iters=300, cg_tol=1e-13)
  plain = paths.functional_precondition(base, mlp, kappa=0.0, cg_iters=3)
  ravel, unravel = tu.ravel_fn(params)
  state, plain_state, base_state, theta = tx.init(params), plain.init(params), base.init(params), params
  for _ in range(2):
    grads = jax.grad(loss_new)(theta, new_batch)
    step, state = tx.update(grads, state, theta, ref_inputs=x_old)
    plain_step, plain_state = plain.update(grads, plain_state, theta, ref_inputs=x_old)
    u, base_state = base.update(grads, base_state, theta)
    chex.assert_trees_all_close(plain_step, u, atol=1e-15)
    root = ravel(jax.tree.map(lambda v: jnp.sqrt(v / (1 - 0.999 ** base_state[0].count)) + 1e-8, base_state[0].nu))
    d = np.maximum(root, 0.1 * np.mean(root))      # adam_diagonal's floor
    assert np.any(root < 0.1 * np.mean(root))      # (and it acts here)
    g = np.asarray(geometry.pullback_metric(mlp, theta, x_old, "fisher_rao").dense())
    expected = np.linalg.solve(kappa * g + np.diag(d), d * ravel(u))
    np.testing.assert_allclose(ravel(step), expected, rtol=1e-8, atol=1e-14)
    assert float(paths.solver_metrics(state)["cg_residual"]) <= 1e-12
    theta = optax.apply_updates(theta, step)
  # The shrinking happens in G's range: the step's functional change is smaller than AdamW's, its length less so.
  g = np.asarray(geometry.pullback_metric(mlp, params, x_old, "fisher_rao").dense())
  first = lambda t: ravel(t.update(jax.grad(loss_new)(params, new_batch), t.init(params), params, ref_inputs=x_old)[0])
  s_fip, s_adam = first(tx), first(plain)
  assert s_fip @ g @ s_fip < 0.5 * (s_adam @ g @ s_adam)
  with pytest.raises(ValueError, match="ScaleByAdamState"):
    paths.functional_precondition(optax.sgd(0.1), mlp, kappa=1.0).update(
        jax.grad(loss_new)(params, new_batch), paths.functional_precondition(optax.sgd(0.1), mlp, kappa=1.0).init(
            params), params, ref_inputs=x_old)


def test_functional_projection_removes_gs_top_eigenspace_refreshed_every_n_steps(x64):
  """AdamW's step less its part in the dense G's top-k eigenspace at the last refresh (steps 0 and 2 of 3 with
  refresh_every 2; step 1 reuses step 0's subspace), with the refresh's residual and the removed share reported,
  through the training loop and the registry."""
  from fipjax import continual
  params, x_old, new_batch, loss_new = _problem()
  base, rank = optax.adamw(1e-2, weight_decay=0.1), 3
  tx = paths.functional_projection(base, mlp, rank=rank, refresh_every=2, krylov_size=40)
  ravel, _ = tu.ravel_fn(params)

  def top_projector(theta):
    _, vecs = np.linalg.eigh(np.asarray(geometry.pullback_metric(mlp, theta, x_old, "fisher_rao").dense()))
    return vecs[:, -rank:] @ vecs[:, -rank:].T

  state, base_state, theta, refreshed = tx.init(params), base.init(params), params, None
  for i in range(3):
    grads = jax.grad(loss_new)(theta, new_batch)
    step, state = jax.jit(lambda g, s, t: tx.update(g, s, t, ref_inputs=x_old))(grads, state, theta)
    u, base_state = base.update(grads, base_state, theta)
    refreshed = top_projector(theta) if i % 2 == 0 else refreshed
    np.testing.assert_allclose(ravel(step), ravel(u) - refreshed @ ravel(u), rtol=1e-7, atol=1e-12)
    metrics = paths.solver_metrics(state)
    assert float(metrics["lanczos_residual"]) <= 1e-8
    assert float(metrics["projected_share"]) == pytest.approx(
        np.linalg.norm(refreshed @ ravel(u)) / np.linalg.norm(ravel(u)), rel=1e-6)
    theta = optax.apply_updates(theta, step)
  assert not np.allclose(refreshed, top_projector(params), atol=1e-6)     # the subspace moved with θ
  hp = cf.with_values(continual.MethodConfig(), {"geodesic.form": "projection", "geodesic.rank": rank,
                                                 "geodesic.refresh_every": 2})
  ctx = continual.StageContext(lambda p, b, rng=None: loss_new(p, b),
                               {"old": continual.OldTask(mlp, mlp, None, None)}, params, None, "^$", 0)
  method = continual.REGISTRY["fip-geodesic"].build(ctx, hp, base)
  _, _, history = continual.fit(method, params, iter([{"new": new_batch, "replay": {"old": {"inputs": x_old}}}] * 2), 2)
  curves = continual.solver_curves(history)
  assert set(curves["solver"]) == {"lanczos_residual", "projected_share"}
  assert len(curves["solver"]["projected_share"]) == 2
  assert "Lanczos relative residual" in continual.solver_summary(curves)
  # Above G's rank (2 reviews, 3 classes: at most 4) Lanczos restarts in G's null space; only G's range is removed.
  few, wide = x_old[:2], paths.functional_projection(base, mlp, rank=6, refresh_every=1, krylov_size=40)
  grads = jax.grad(loss_new)(params, new_batch)
  step, _ = wide.update(grads, wide.init(params), params, ref_inputs=few)
  u = ravel(base.update(grads, base.init(params), params)[0])
  evals, vecs = np.linalg.eigh(np.asarray(geometry.pullback_metric(mlp, params, few, "fisher_rao").dense()))
  span = vecs[:, evals > 1e-10 * evals.max()]
  assert span.shape[1] == 4
  np.testing.assert_allclose(ravel(step), u - span @ (span.T @ u), rtol=1e-7, atol=1e-12)
  with pytest.raises(ValueError, match="rank"):
    paths.functional_projection(base, mlp, rank=5, refresh_every=1, krylov_size=4)


def test_functional_precondition_corrector_pulls_back_to_the_references(x64):
  """With the corrector the step solves (κG + D) dθ = D u − γκ (1/N) Σ J_nᵀ M_n (z_n − z_ref,n), the Gauss–Newton
  pull back to stored outputs (weight γ, 1 by default), checked against a dense solve and an autodiff gradient of
  the quadratic model."""
  params, x_old, new_batch, loss_new = _problem()
  z_ref = mlp(params, x_old) + 0.3 * jax.random.normal(jax.random.PRNGKey(5), (16, 3))
  theta = jax.tree.map(lambda p: p + 0.05, params)
  base, kappa = optax.adamw(1e-2, weight_decay=0.1), 0.5
  tx = paths.functional_precondition(base, mlp, kappa=kappa, corrector=True, cg_iters=300, cg_tol=1e-13)
  grads = jax.grad(loss_new)(theta, new_batch)
  step, state = tx.update(grads, tx.init(theta), theta, ref_inputs=x_old, ref_outputs=z_ref)
  u, base_state = base.update(grads, base.init(theta), theta)
  ravel, _ = tu.ravel_fn(theta)
  root = ravel(jax.tree.map(lambda v: jnp.sqrt(v / (1 - 0.999)) + 1e-8, base_state[0].nu))
  d = np.maximum(root, 0.1 * np.mean(root))
  g = np.asarray(geometry.pullback_metric(mlp, theta, x_old, "fisher_rao").dense())

  def model(p):     # ½ (1/N) Σ (z − z_ref)ᵀ M (z − z_ref), M at θ held fixed: its gradient is (1/N) Σ Jᵀ M (z − z_ref)
    z = mlp(p, x_old)
    m = jax.lax.stop_gradient(jax.vmap(lambda zi: jnp.diag(jax.nn.softmax(zi)) - jnp.outer(jax.nn.softmax(zi),
                                                                                     jax.nn.softmax(zi)))(mlp(theta, x_old)))
    return 0.5 * jnp.mean(jnp.einsum("nk,nkl,nl->n", z - z_ref, m, z - z_ref))

  pull = ravel(jax.grad(model)(theta))
  expected = np.linalg.solve(kappa * g + np.diag(d), d * ravel(u) - kappa * pull)
  np.testing.assert_allclose(ravel(step), expected, rtol=1e-8, atol=1e-14)
  weighted = paths.functional_precondition(base, mlp, kappa=kappa, corrector=True, corrector_weight=2.5,
                                           cg_iters=300, cg_tol=1e-13)
  step, _ = weighted.update(grads, weighted.init(theta), theta, ref_inputs=x_old, ref_outputs=z_ref)
  expected = np.linalg.solve(kappa * g + np.diag(d), d * ravel(u) - 2.5 * kappa * pull)   # γ = 2.5
  np.testing.assert_allclose(ravel(step), expected, rtol=1e-8, atol=1e-14)
  with pytest.raises(ValueError, match="ref_outputs"):
    tx.update(grads, tx.init(theta), theta, ref_inputs=x_old)
