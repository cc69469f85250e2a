"""Synaptic Intelligence against its definitions (Zenke, Poole & Ganguli, 2017)."""

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

from fipjax import continual, si


def test_path_integral_of_sgd_on_a_quadratic_equals_its_closed_form(x64):
  # L(θ) = ½ Σ a_i (θ_i − c_i)²; SGD: θ_t − c = r^t (θ_0 − c), r = 1 − ηa, so
  # ω = −Σ_t g_t·Δθ_t = η Σ_t g_t² = η a² d0² (1 − r^{2T}) / (1 − r²).
  a, c = jnp.array([0.5, 2.0, 4.0]), jnp.array([1.0, -1.0, 0.5])
  theta0, lr, steps = jnp.array([3.0, 2.0, -1.0]), 0.1, 25
  opt = si.path_integral(optax.sgd(lr))
  theta, state = theta0, opt.init(theta0)
  for _ in range(steps):
    g = jax.grad(lambda t: 0.5 * jnp.sum(a * (t - c) ** 2))(theta)
    u, state = opt.update(g, state, theta)
    theta = optax.apply_updates(theta, u)
  r = 1 - lr * a
  expected = lr * a**2 * (theta0 - c) ** 2 * (1 - r ** (2 * steps)) / (1 - r**2)
  chex.assert_trees_all_close(si.recorded(state), expected, rtol=1e-12)
  # With a small step the path integral tends to the loss each parameter's move removed.
  chex.assert_trees_all_close(si.recorded(state).sum(), 0.5 * jnp.sum(a * ((theta0 - c) ** 2 - (theta - c) ** 2)),
                              rtol=0.3)


def test_path_integral_leaves_the_updates_unchanged_and_uses_the_applied_step():
  params = {"w": jnp.arange(4.0), "b": jnp.ones(2)}
  inner = optax.adamw(0.1, weight_decay=0.5)
  rec, plain = si.path_integral(inner), inner
  s_rec, s_plain, omega = rec.init(params), plain.init(params), jax.tree.map(jnp.zeros_like, params)
  for k in range(3):
    g = jax.tree.map(lambda p: jnp.sin(p + k), params)
    u_rec, s_rec = rec.update(g, s_rec, params)
    u_plain, s_plain = plain.update(g, s_plain, params)
    chex.assert_trees_all_equal(u_rec, u_plain)
    omega = jax.tree.map(lambda w, gi, ui: w - gi * ui, omega, g, u_plain)    # AdamW's actual step, decay included
    params = optax.apply_updates(params, u_rec)
  chex.assert_trees_all_close(si.recorded(s_rec), omega, rtol=1e-6)
  assert si.recorded(s_plain) is None


def test_importance_penalty_and_its_gradient():
  omega, change = {"w": jnp.array([1.0, -2.0, 0.0])}, {"w": jnp.array([0.5, 1.0, 0.0])}
  imp = si.importance(omega, change, xi=0.1)
  chex.assert_trees_all_close(imp["w"], jnp.array([1.0 / 0.35, -2.0 / 1.1, 0.0]))
  anchor, params = {"w": jnp.zeros(3)}, {"w": jnp.array([1.0, 2.0, 3.0])}
  assert si.penalty(params, imp, anchor, strength=2.0) == pytest.approx(2.0 * (1 / 0.35 - 8 / 1.1))
  add = si.add_penalty_gradient(imp, anchor, strength=2.0)
  grads, _ = add.update({"w": jnp.ones(3)}, add.init(params), params)
  expected = jax.grad(lambda p: si.penalty(p, imp, anchor, strength=2.0))(params)
  chex.assert_trees_all_close(grads["w"], 1.0 + expected["w"])


def test_si_method_records_the_task_gradient_not_the_penalty_and_resumes(x64):
  x = jax.random.normal(jax.random.PRNGKey(0), (16, 3))
  y = (x[:, 0] > 0).astype(jnp.int32)
  params = {"w": 0.1 * jax.random.normal(jax.random.PRNGKey(1), (3, 2)), "b": jnp.zeros(2)}
  f = lambda p, x: x @ p["w"] + p["b"]
  loss = lambda p, b, rng=None: optax.softmax_cross_entropy_with_integer_labels(f(p, b[0]), b[1]).mean()
  imp = jax.tree.map(lambda p: jnp.full_like(p, 3.0), params)
  anchor = jax.tree.map(lambda p: p + 0.5, params)
  method = continual.si(loss, optax.sgd(0.1), anchor, imp, strength=0.2)
  batches = [{"new": (x, y)}] * 6
  final, state, history = continual.fit(method, params, iter(batches), 6)
  theta, omega = params, jax.tree.map(jnp.zeros_like, params)
  for _ in range(6):
    g = jax.grad(loss)(theta, (x, y))
    step = jax.tree.map(lambda gi, p, a: -0.1 * (gi + 2 * 0.2 * 3.0 * (p - a)), g, theta, anchor)
    omega = jax.tree.map(lambda w, gi, s: w - gi * s, omega, g, step)
    theta = jax.tree.map(jnp.add, theta, step)
  chex.assert_trees_all_close(final, theta, rtol=1e-12)
  chex.assert_trees_all_close(si.recorded(state.opt_state), omega, rtol=1e-10)
  assert history[0]["si_penalty"] == pytest.approx(0.2 * 3.0 * 0.25 * 8)
