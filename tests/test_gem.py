"""GEM and A-GEM against their definitions and a brute-force quadratic programme."""

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import minimize

from fipjax import gem


def brute_force(g, memory):
  """The primal ``min ½‖z − g‖²  s.t.  M z ≥ 0`` by SLSQP."""
  res = minimize(lambda z: 0.5 * np.sum((z - g) ** 2), g, jac=lambda z: z - g, method="SLSQP",
                 constraints=[{"type": "ineq", "fun": lambda z: memory @ z, "jac": lambda z: memory}],
                 options={"ftol": 1e-15, "maxiter": 2000})
  return res.x


def _problem(seed, k, n=7):
  rng = np.random.default_rng(seed)
  memory = rng.normal(size=(k, n))
  g = -memory.mean(0) * rng.uniform(0.5, 2) + 0.3 * rng.normal(size=n)   # usually violates some constraints
  return g, memory


@pytest.mark.parametrize("seed", range(12))
def test_gem_projection_satisfies_every_constraint_and_matches_brute_force(x64, seed):
  k = 1 + seed % 4
  g, memory = _problem(seed, k)
  out, violated = gem.project({"p": jnp.asarray(g)}, [{"p": jnp.asarray(m)} for m in memory])
  out = np.asarray(out["p"])
  assert bool(violated) == bool((memory @ g < 0).any())
  assert (memory @ out >= -1e-9).all()
  np.testing.assert_allclose(out, brute_force(g, memory) if violated else g, atol=1e-6)


def test_gem_with_one_task_is_the_closed_form_and_a_gem(x64):
  for seed in range(5):
    g, memory = _problem(seed, 1)
    ref = memory[0]
    closed = g - min(0.0, g @ ref) / (ref @ ref) * ref
    out, _ = gem.project({"p": jnp.asarray(g)}, [{"p": jnp.asarray(ref)}])
    one, _ = gem.project_one({"p": jnp.asarray(g)}, {"p": jnp.asarray(ref)})
    np.testing.assert_allclose(out["p"], closed, atol=1e-12)
    np.testing.assert_allclose(one["p"], closed, atol=1e-12)


def test_dual_with_a_margin_is_the_bounded_minimiser(x64):
  for seed in range(6):
    rng = np.random.default_rng(seed)
    m = rng.normal(size=(3, 5))
    a, b = m @ m.T, rng.normal(size=3)
    v = np.asarray(gem.solve_dual(jnp.asarray(a), jnp.asarray(b), 0.5))
    ref = minimize(lambda v: 0.5 * v @ a @ v + b @ v, np.ones(3), jac=lambda v: a @ v + b, method="L-BFGS-B",
                   bounds=[(0.5, None)] * 3, options={"ftol": 1e-15, "gtol": 1e-12}).x
    np.testing.assert_allclose(v, ref, atol=1e-6)
    assert (v >= 0.5 - 1e-12).all()


def test_dual_of_a_rank_deficient_memory(x64):
  g = np.array([1.0, -2.0, 0.5])
  memory = np.array([[0.0, 1.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.0]])    # repeated and zero gradients
  out, _ = gem.project({"p": jnp.asarray(g)}, [{"p": jnp.asarray(m)} for m in memory])
  np.testing.assert_allclose(out["p"], [1.0, 0.0, 0.5], atol=1e-9)


def test_a_gem_formula_no_op_and_zero_memory_gradient():
  g, ref = {"p": jnp.array([1.0, -1.0])}, {"p": jnp.array([0.0, 2.0])}
  out, active = gem.project_one(g, ref)
  chex.assert_trees_all_close(out["p"], jnp.array([1.0, 0.0]))       # g − (gᵀr / rᵀr) r
  assert bool(active)
  same, active = gem.project_one(g, {"p": jnp.array([1.0, 0.5])})    # gᵀr ≥ 0: unchanged
  chex.assert_trees_all_equal(same, g)
  assert not bool(active)
  zero, active = gem.project_one(g, {"p": jnp.zeros(2)})
  chex.assert_trees_all_equal(zero, g)
  assert not bool(active) and np.isfinite(zero["p"]).all()


def test_too_many_tasks_is_refused():
  with pytest.raises(ValueError, match="2\\^K"):
    gem.solve_dual(jnp.eye(gem.MAX_TASKS + 1), jnp.zeros(gem.MAX_TASKS + 1))


def test_projecting_adams_step_keeps_the_constraints_projecting_its_gradient_does_not():
  import optax
  violated_by_gradient_space = 0
  for seed in range(10):
    rng = np.random.default_rng(seed)
    memory = rng.normal(size=(2, 6))
    losses = {f"t{k}": (lambda a: lambda p, batch, rng: jnp.vdot(jnp.asarray(a), p["w"]))(memory[k]) for k in range(2)}
    params = {"w": jnp.asarray(rng.normal(size=6))}
    extra = {"replay": {"t0": None, "t1": None}, "rng": None}
    history = [jnp.asarray(rng.normal(size=6) * rng.uniform(0.1, 10, 6)) for _ in range(3)]
    g = {"w": jnp.asarray(-memory.sum(0) + 0.1 * rng.normal(size=6))}
    for chain, space in ((optax.chain(optax.adam(0.1), gem.on_steps(gem.gem(losses))), "step"),
                         (optax.chain(gem.gem(losses), optax.adam(0.1)), "gradient")):
      state = chain.init(params)
      for h in history:                         # a preconditioner shaped by earlier gradients
        _, state = chain.update({"w": h}, state, params, **extra)
      u, _ = chain.update(g, state, params, **extra)
      dots = memory @ np.asarray(u["w"])
      if space == "step":
        assert (dots <= 1e-7).all(), dots       # no old loss rises to first order
      else:
        violated_by_gradient_space += bool((dots > 1e-7).any())
  assert violated_by_gradient_space > 0


def test_relative_memory_keeps_the_constraints_and_scales_the_margin_to_the_step(x64):
  memory = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
  losses = {f"t{k}": (lambda a: lambda p, batch, rng: jnp.vdot(jnp.asarray(a), p))(memory[k]) for k in range(2)}
  extra = {"replay": {"t0": None, "t1": None}, "rng": None}
  step = jnp.array([-1e-4, 1e-4, 3e-4])                   # a short step; violates task 0
  for margin in (0.0, 0.5):
    t = gem.gem(losses, margin=margin, relative=True)
    out, _ = t.update(step, t.init(step), jnp.zeros(3), **extra)
    assert (memory @ np.asarray(out) >= -1e-12).all()
    assert np.linalg.norm(out) < 10 * np.linalg.norm(step)   # the margin's push is on the step's scale
  absolute = gem.gem(losses, margin=0.5)
  out, _ = absolute.update(step, absolute.init(step), jnp.zeros(3), **extra)
  assert np.linalg.norm(out) > 1000 * np.linalg.norm(step)   # what a raw gradient-scale margin does to a step


@pytest.mark.parametrize("scale", [1.0, 30.0, 1000.0])
def test_projection_is_right_at_any_gradient_scale_in_float32(scale):
  for seed in range(2, 10):           # 1-4 old tasks; seed 2 was wrong with a tolerance in the units of A
    g, memory = _problem(seed, 1 + seed % 4)
    g, memory = scale * g, scale * memory
    out, violated = gem.project({"p": jnp.asarray(g, jnp.float32)}, [{"p": jnp.asarray(m, jnp.float32)} for m in memory])
    out = np.asarray(out["p"], np.float64)
    assert (memory @ out >= -1e-4 * scale**2).all(), seed
    ref = brute_force(g, memory) if violated else g
    np.testing.assert_allclose(out, ref, atol=1e-4 * scale, rtol=1e-4)
