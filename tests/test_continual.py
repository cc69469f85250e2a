import dataclasses
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fipjax import config as cf
from fipjax import continual
from fipjax import tree as tu
from conftest import init_mlp, mlp


def test_cl_metrics_definitions():
  r = np.array([[0.9, 0.1, 0.2], [0.7, 0.8, 0.1], [0.6, 0.5, 0.9]])
  assert continual.average_accuracy(r) == pytest.approx((0.6 + 0.5 + 0.9) / 3)
  assert continual.backward_transfer(r) == pytest.approx(((0.6 - 0.9) + (0.5 - 0.8)) / 2)   # ÷ (T−1)
  assert continual.forgetting(r) == pytest.approx(((0.9 - 0.6) + (0.8 - 0.5)) / 2)
  two = np.array([[0.9, 0.2], [0.95, 0.9]])
  assert continual.forgetting(two) == pytest.approx(-0.05)
  assert continual.backward_transfer(two) == pytest.approx(0.05)


@pytest.mark.parametrize("empirical", [False, True])
def test_diagonal_fisher_matches_explicit_per_example_loop(x64, empirical):
  params = init_mlp(jax.random.PRNGKey(0), (3, 4, 3))
  x = jax.random.normal(jax.random.PRNGKey(1), (5, 3))
  y = jnp.array([0, 1, 2, 1, 0])
  fisher = continual.diagonal_fisher(mlp, params, x, y if empirical else None, batch_size=2)
  expected = tu.tree_zeros_like(params)
  for n in range(5):
    logp = lambda p, k: jax.nn.log_softmax(mlp(p, x[n:n + 1])[0])[k]
    probs = jnp.exp(jax.nn.log_softmax(mlp(params, x[n:n + 1])[0]))
    classes = [(int(y[n]), 1.0)] if empirical else [(k, probs[k]) for k in range(3)]
    for k, w in classes:
      g = jax.grad(logp)(params, k)
      expected = tu.tree_add(expected, jax.tree.map(lambda a: w * a**2 / 5, g))
  chex.assert_trees_all_close(fisher, expected, rtol=1e-10)


def test_fit_trains_only_the_mask_and_is_deterministic():
  params = init_mlp(jax.random.PRNGKey(0), (3, 8, 2), jnp.float32)
  x = jax.random.normal(jax.random.PRNGKey(1), (16, 3))
  y = (x[:, 0] > 0).astype(jnp.int32)
  loss = lambda p, b, rng=None: optax.softmax_cross_entropy_with_integer_labels(mlp(p, b[0]), b[1]).mean()
  mask_fn = lambda p: {"layer_0": {"bias": False, "kernel": False}, "layer_1": {"bias": True, "kernel": True}}
  method = continual.naive(loss, optax.adamw(0.05, weight_decay=0.1), trainable=mask_fn)
  batches = [{"new": (x, y)}] * 20
  final, state, history = continual.fit(method, params, iter(batches), 20)
  assert history[-1]["loss"] < history[0]["loss"]
  chex.assert_trees_all_equal(final["layer_0"], params["layer_0"])     # frozen: bitwise, weight decay too
  again, _, _ = continual.fit(method, params, iter(batches), 20)
  chex.assert_trees_all_equal(final, again)
  # Resume from a mid-run state gives the uninterrupted result.
  seen = []
  continual.fit(method, params, iter(batches), 8, callback=lambda s, row: seen.append(s))
  resumed, _, _ = continual.fit(method, params, iter(batches[8:]), 20, state=seen[-1])
  chex.assert_trees_all_close(resumed, final, rtol=1e-6, atol=1e-7)


def test_fit_hands_over_its_compiled_step_without_compiling_again():
  """on_compiled gets the step fit runs (its memory analysis: the alignment runner's peak step memory), from JAX's
  cache: a fit with it compiles as many programs as one without."""
  params = init_mlp(jax.random.PRNGKey(0), (3, 8, 2), jnp.float32)
  x = jax.random.normal(jax.random.PRNGKey(1), (16, 3))
  y = (x[:, 0] > 0).astype(jnp.int32)
  loss = lambda p, b, rng=None: optax.softmax_cross_entropy_with_integer_labels(mlp(p, b[0]), b[1]).mean()
  method = continual.naive(loss, optax.adamw(0.05))
  compiles, peaks = [], []
  listen = lambda event, seconds, **_: compiles.append(event) if event.endswith("backend_compile_duration") else None

  def count(**kw):
    jax.clear_caches()
    before = len(compiles)
    continual.fit(method, params, iter([{"new": (x, y)}] * 3), 3, **kw)
    return len(compiles) - before

  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    plain, handed = count(), count(on_compiled=lambda c: peaks.append(continual.peak_bytes(c)))
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  assert plain > 0 and handed == plain
  assert len(peaks) == 1 and peaks[0] > 0


def test_methods_losses():
  params = init_mlp(jax.random.PRNGKey(0), (3, 8, 2), jnp.float32)
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 3))
  y = jnp.array([0, 1, 0, 1])
  loss = lambda p, b, rng=None: optax.softmax_cross_entropy_with_integer_labels(mlp(p, b[0]), b[1]).mean()
  batch = {"new": (x, y), "replay": {"inputs": x, "labels": y, "ref_outputs": mlp(params, x)}}
  fip = continual.fip(loss, mlp, optax.sgd(0.1), beta=3.0)
  value, metrics = fip.replay_loss(params, batch)
  assert float(metrics["fip_penalty"]) == pytest.approx(0.0, abs=1e-6) and fip.needs_replay
  rep = continual.replay(loss, lambda p, b, rng=None: loss(p, (b["inputs"], b["labels"])), optax.sgd(0.1))
  new, _ = rep.loss(params, batch)
  old, metrics = rep.replay_loss(params, batch)
  assert float(old) == pytest.approx(float(new)) == pytest.approx(float(metrics["replay_loss"]))
  shifted = jax.tree.map(lambda a: a + 0.1, params)
  fisher = jax.tree.map(jnp.ones_like, params)
  ewc = continual.ewc(loss, optax.sgd(0.1), params, fisher, strength=2.0)
  value, metrics = ewc.loss(shifted, batch)
  assert float(metrics["ewc_penalty"]) == pytest.approx(0.5 * 2.0 * 0.01 * tu.tree_size(params), rel=1e-4)


def test_two_pass_gradient_equals_one_pass_on_the_summed_loss():
  params = init_mlp(jax.random.PRNGKey(0), (3, 8, 2), jnp.float32)
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 3))
  y = jnp.array([0, 1, 0, 1])
  loss = lambda p, b, rng=None: optax.softmax_cross_entropy_with_integer_labels(mlp(p, b[0]), b[1]).mean()
  ref = mlp(params, x) + 1.0
  batch = {"new": (x, y), "replay": {"inputs": -x, "labels": y, "ref_outputs": ref}}
  method = continual.fip(loss, mlp, optax.sgd(0.1), beta=3.0)
  final, _, history = continual.fit(method, params, iter([batch]), 1)
  penalty = lambda p: 3.0 * jnp.mean(continual.geometry.bhattacharyya(mlp(p, -x), ref))
  total = lambda p: loss(p, (x, y)) + penalty(p)
  expected = jax.tree.map(lambda p, g: p - 0.1 * g, params, jax.grad(total)(params))
  chex.assert_trees_all_close(final, expected, rtol=1e-6, atol=1e-7)
  assert history[0]["loss"] == pytest.approx(float(total(params)), rel=1e-6)


def _mlp_problem():
  params = init_mlp(jax.random.PRNGKey(0), (3, 8, 2), jnp.float32)
  x = jax.random.normal(jax.random.PRNGKey(1), (16, 3))
  y = (x[:, 0] > 0).astype(jnp.int32)
  loss = lambda p, b, rng=None: optax.softmax_cross_entropy_with_integer_labels(mlp(p, b[0]), b[1]).mean()
  return params, [{"new": (x, y)}] * 20, loss


def test_callback_states_stay_valid_and_resume_twice():
  params, batches, loss = _mlp_problem()
  method = continual.naive(loss, optax.adam(0.05))
  final, _, _ = continual.fit(method, params, iter(batches), 20)
  seen = []
  continual.fit(method, params, iter(batches), 8, callback=lambda s, row: seen.append(s))
  # Every kept state is readable after later steps reused the device buffers (donation).
  assert [s.step for s in seen] == list(range(1, 9))
  chex.assert_trees_all_equal_shapes(seen[2].train_params, params)
  for _ in range(2):                                  # one state, resumed twice
    resumed, _, _ = continual.fit(method, params, iter(batches[8:]), 20, state=seen[-1])
    chex.assert_trees_all_close(resumed, final, rtol=1e-6, atol=1e-7)


def test_fit_donates_its_fresh_optimiser_state_but_never_the_callers_arrays(monkeypatch):
  """A fresh optimiser state is fit's own and is donated without a copy (AdamW's moments are two parameter copies);
  an optimiser state that holds the caller's arrays themselves (here: the initial parameters) or one array twice is
  copied first, so the caller's parameters stay valid and nothing is donated twice."""
  params, batches, loss = _mlp_problem()
  holds = optax.GradientTransformation(lambda p: (p, p), lambda u, s, p=None: (u, s))    # the params, twice
  kept = jnp.ones(3)                                       # an array a closure holds, returned by init as state
  closure = optax.GradientTransformation(lambda p: kept, lambda u, s, p=None: (u, s))
  adam = continual.naive(loss, optax.adam(0.05))
  for method in (adam, *(continual.naive(loss, optax.chain(t, optax.adam(0.05))) for t in (holds, closure))):
    calls, real_init = [], continual.init_train_state
    monkeypatch.setattr(continual, "init_train_state", lambda *a: calls.append(real_init(*a)) or calls[-1])
    final, _, _ = continual.fit(method, params, iter(batches), 3)
    monkeypatch.undo()
    fresh = [x for x in jax.tree.leaves(calls[0][0].opt_state) if x.ndim == 2]
    assert not any(x.is_deleted() for x in jax.tree.leaves(params))          # the caller's: never donated
    assert not kept.is_deleted()                                             # nor an array held elsewhere
    if method is adam:
      assert all(x.is_deleted() for x in fresh)      # the moments built inside fit: donated, not copied
    again, _, _ = continual.fit(method, params, iter(batches), 3)
    chex.assert_trees_all_equal(final, again)


def test_metrics_read_every_k_steps_give_the_same_run_and_states_where_asked():
  params, batches, loss = _mlp_problem()
  method = continual.naive(loss, optax.adam(0.05))
  final, _, history = continual.fit(method, params, iter(batches), 20)
  seen = []
  lagged, _, lagged_history = continual.fit(method, params, iter(batches), 20, sync_every=7,
                                            keep_state=lambda step: step in (5, 12),
                                            callback=lambda s, row: seen.append((row["step"], s)))
  chex.assert_trees_all_equal(lagged, final)
  assert lagged_history == history and [step for step, _ in seen] == list(range(1, 21))
  kept = {step: s for step, s in seen if s is not None}
  assert set(kept) == {5, 12}
  # The state handed over at step 12 is step 12's, readable after the later steps reused the buffers.
  resumed, _, _ = continual.fit(method, params, iter(batches[12:]), 20, state=kept[12].materialize())
  chex.assert_trees_all_close(resumed, final, rtol=1e-6, atol=1e-7)


def test_non_finite_loss_found_late_names_its_step_before_any_state_is_handed_over():
  params, batches, loss = _mlp_problem()
  method = continual.naive(loss, optax.sgd(1e38))
  with pytest.raises(continual.NonFiniteLoss) as every_step:
    continual.fit(method, params, iter(batches), 20)
  states = []
  with pytest.raises(continual.NonFiniteLoss) as lagged:
    continual.fit(method, params, iter(batches), 20, sync_every=20, keep_state=lambda step: step == 10,
                  callback=lambda s, row: states.append(s))
  assert lagged.value.step == every_step.value.step
  assert all(s is None for s in states)


def test_non_finite_loss_stops_the_run():
  params, batches, loss = _mlp_problem()
  with pytest.raises(continual.NonFiniteLoss) as e:
    continual.fit(continual.naive(loss, optax.sgd(1e38)), params, iter(batches), 20)
  assert e.value.step > 1 and not np.isfinite(e.value.loss)


def test_several_old_tasks_average_their_terms():
  params, batches, loss = _mlp_problem()
  x, y = batches[0]["new"]
  f2 = lambda p, z: 2.0 * mlp(p, z)
  replay = {"a": {"inputs": x, "labels": y, "ref_outputs": mlp(params, x) + 1.0},
            "b": {"inputs": -x, "labels": y, "ref_outputs": f2(params, -x)}}
  batch = {"new": (x, y), "replay": replay}
  both = continual.fip(loss, {"a": mlp, "b": f2}, optax.sgd(0.1), beta=3.0)
  one = lambda f, name: float(continual.fip(loss, f, optax.sgd(0.1), beta=3.0).replay_loss(params,
                                                                                           {"replay": replay[name]})[0])
  assert float(both.replay_loss(params, batch)[0]) == pytest.approx((one(mlp, "a") + one(f2, "b")) / 2, rel=1e-6)
  old_loss = lambda p, b, rng=None: loss(p, (b["inputs"], b["labels"]))
  rep = continual.replay(loss, {"a": old_loss, "b": old_loss}, optax.sgd(0.1))
  expected = (old_loss(params, replay["a"]) + old_loss(params, replay["b"])) / 2
  assert float(rep.replay_loss(params, batch)[0]) == pytest.approx(float(expected), rel=1e-6)


def test_registry_builds_every_method_and_lora_wraps_any():
  params, batches, loss = _mlp_problem()
  x, y = batches[0]["new"]
  ones = jax.tree.map(jnp.ones_like, params)
  readout = lambda p, h: h @ p["layer_1"]["kernel"] + p["layer_1"]["bias"]
  old = continual.OldTask(mlp, mlp, lambda p, b, rng=None: loss(p, (b["inputs"], b["labels"])), lambda n: x[:n],
                          readout, {"si_omega": ones, "si_change": ones})
  ctx = continual.StageContext(loss, {"a": old}, params, None, r"^layer_1/", seed=0, below="^layer_0/")
  h = jnp.tanh(x @ params["layer_0"]["kernel"] + params["layer_0"]["bias"])
  replay = {"a": {"inputs": x, "labels": y, "ref_outputs": mlp(params, x), "features": h}}
  hp = cf.with_values(continual.MethodConfig(), {"lora.targets": "kernel$", "lora.rank": 2, "ewc.samples": 4})
  for name in continual.method_names() + ("lora-ewc", "lora-replay", "lora-gem", "lora-agem"):
    method = continual.build(name, ctx, hp, continual.OptimConfig(lr=0.01))
    final, _, history = continual.fit(method, params, iter([{"new": (x, y), "replay": replay}] * 3), 3)
    assert method.name == name and np.isfinite(history[-1]["loss"]), name
    if name.startswith("lora"):                       # only adapters on the kernels and the named head move
      chex.assert_trees_all_equal(final["layer_0"]["bias"], params["layer_0"]["bias"])
      assert not np.array_equal(final["layer_0"]["kernel"], params["layer_0"]["kernel"]), name
  for form in ("adam", "gradient"):                     # both geodesic forms, full and in LoRA
    for name in ("fip-geodesic", "lora-fip-geodesic"):
      method = continual.build(name, ctx, cf.with_values(hp, {"geodesic.form": form, "geodesic.kappa": 10.0,
                                                               "lora.geodesic.kappa": 10.0}),
                               continual.OptimConfig(lr=0.01))
      final, _, history = continual.fit(method, params, iter([{"new": (x, y), "replay": replay}] * 3), 3)
      assert np.isfinite(history[-1]["loss"]) and history[-1]["cg_iterations"] >= 1, (form, name)
      assert not np.array_equal(final["layer_0"]["kernel"], params["layer_0"]["kernel"]), (form, name)
  # In LoRA the adam form takes its own κ: at κ = 0 it is LoRA's AdamW step, whatever the full model's κ.
  runs = {name: continual.fit(continual.build(name, ctx, cf.with_values(hp, {"geodesic.kappa": 10.0,
                                                                             "lora.geodesic.kappa": 0.0}),
                                              continual.OptimConfig(lr=0.01)),
                              params, iter([{"new": (x, y), "replay": replay}] * 3), 3)[0]
          for name in ("lora", "lora-fip-geodesic")}
  chex.assert_trees_all_equal(runs["lora"], runs["lora-fip-geodesic"])
  with pytest.raises(ValueError, match="unknown method 'sgd'"):
    continual.parse_name("sgd")
  assert continual.parse_name("lora")[:2] == ("naive", True) and continual.parse_name("lora-ewc")[:2] == ("ewc", True)
  assert str(continual.parse_name("lora-fip")) == "lora-fip"


@pytest.mark.parametrize("name", list(continual.REGISTRY))
def test_every_method_leaves_frozen_parameters_bitwise_unchanged(name):
  params = init_mlp(jax.random.PRNGKey(0), (3, 8, 2), jnp.float32)
  x = jax.random.normal(jax.random.PRNGKey(1), (16, 3))
  y = (x[:, 0] > 0).astype(jnp.int32)
  features = lambda p, x: jnp.tanh(x @ p["layer_0"]["kernel"] + p["layer_0"]["bias"])
  readout = lambda p, h: h @ p["layer_1"]["kernel"] + p["layer_1"]["bias"]
  loss = lambda p, b, rng=None: optax.softmax_cross_entropy_with_integer_labels(mlp(p, b["inputs"]), b["labels"]).mean()
  ones = jax.tree.map(jnp.ones_like, params)
  old = continual.OldTask(mlp, mlp, loss, lambda n: x[:n], readout, {"si_omega": ones, "si_change": ones})
  frozen = lambda p: {"layer_0": {"bias": False, "kernel": True}, "layer_1": {"bias": True, "kernel": False}}
  ctx = continual.StageContext(loss, {"a": old}, params, frozen, head="^layer_1/", seed=0, below="^layer_0/")
  hp = cf.with_values(continual.MethodConfig(), {"ewc.samples": 4, "geodesic.lr": 0.1, "bir.freeze_below": False})
  method = continual.build(name, ctx, hp, continual.OptimConfig(lr=0.05, weight_decay=0.1))
  replay = {"a": {"inputs": -x, "labels": y, "ref_outputs": mlp(params, -x) + 1.0, "features": features(params, x)}}
  batches = [{"new": {"inputs": x, "labels": 1 - y}, "replay": replay}] * 3
  final, _, _ = continual.fit(method, params, iter(batches), 3)
  chex.assert_trees_all_equal(final["layer_0"]["bias"], params["layer_0"]["bias"])
  chex.assert_trees_all_equal(final["layer_1"]["kernel"], params["layer_1"]["kernel"])
  assert not np.allclose(final["layer_1"]["bias"], params["layer_1"]["bias"]), name


def test_bir_freezes_the_layers_below_its_replayed_representation():
  params = init_mlp(jax.random.PRNGKey(0), (3, 8, 2), jnp.float32)
  x = jax.random.normal(jax.random.PRNGKey(1), (16, 3))
  loss = lambda p, b, rng=None: optax.softmax_cross_entropy_with_integer_labels(mlp(p, b["inputs"]), b["labels"]).mean()
  readout = lambda p, h: h @ p["layer_1"]["kernel"] + p["layer_1"]["bias"]
  old = continual.OldTask(mlp, mlp, loss, lambda n: x[:n], readout)
  ctx = continual.StageContext(loss, {"a": old}, params, None, head="^layer_1/", seed=0, below="^layer_0/")
  method = continual.build("bir", ctx, continual.MethodConfig(), continual.OptimConfig(lr=0.05))
  h = jax.random.normal(jax.random.PRNGKey(2), (8, 8))
  batch = {"new": {"inputs": x, "labels": (x[:, 0] > 0).astype(jnp.int32)},
           "replay": {"a": {"features": h, "ref_outputs": readout(params, h)}}}
  final, _, history = continual.fit(method, params, iter([batch] * 3), 3)
  chex.assert_trees_all_equal(final["layer_0"], params["layer_0"])
  assert not np.allclose(final["layer_1"]["kernel"], params["layer_1"]["kernel"])
  assert history[0]["replay_distill"] == pytest.approx(0.0, abs=1e-6)   # the targets are the network's own outputs
  with pytest.raises(ValueError, match="split"):
    continual.build("bir", dataclasses.replace(ctx, below=None), continual.MethodConfig(), continual.OptimConfig())
  with pytest.raises(ValueError, match="no LoRA form"):
    continual.parse_name("lora-si")


def test_method_argument_takes_all_or_a_comma_separated_list():
  every = continual.method_names()
  assert continual.method_list(continual.method_argument("all"), every) == list(every)
  assert continual.method_list(continual.method_argument("fip,lora-ewc,fip"), every) == ["fip", "lora-ewc"]
  for bad in ("fip,nope", "lora-si", ""):
    with pytest.raises(continual.cf.argparse.ArgumentTypeError):
      continual.method_argument(bad)


def test_peak_bytes_counts_temporaries():
  # x @ xᵀ [1000, 1000] is a temporary of 4 MB between 40 KB of arguments and a scalar output; XLA's CPU peak omits it.
  x = jnp.ones((1000, 10), jnp.float32)
  compiled = jax.jit(lambda x: jnp.sum(jnp.sin(x @ x.T))).lower(x).compile()
  stats = compiled.memory_analysis()
  assert stats.temp_size_in_bytes >= 4 * 1000 * 1000
  assert continual.peak_bytes(compiled) >= stats.argument_size_in_bytes + stats.temp_size_in_bytes


def test_replay_pass_reuses_the_first_passes_memory():
  # Activations (4096 × 256 per layer and pass) outweigh the parameters (5 × 256 × 256): a replay pass scheduled
  # alongside the first one nearly doubles the step's peak (1.95× here); one ordered after it adds a gradient (1.05×).
  params = init_mlp(jax.random.PRNGKey(0), (8,) + (256,) * 6 + (4,), jnp.float32)
  x, y = jnp.ones((4096, 8), jnp.float32), jnp.zeros(4096, jnp.int32)
  loss = lambda p, b, rng=None: optax.softmax_cross_entropy_with_integer_labels(mlp(p, b[0]), b[1]).mean()
  batch = {"new": (x, y), "replay": {"inputs": x, "labels": y, "ref_outputs": jnp.zeros((4096, 4))}}
  naive = continual.step_peak_bytes(continual.naive(loss, optax.sgd(0.1)), params, batch)
  fip = continual.step_peak_bytes(continual.fip(loss, mlp, optax.sgd(0.1), beta=1.0), params, batch)
  assert fip <= 1.15 * naive, (fip, naive)


def test_tree_after_keeps_values_and_dtypes():
  tree = {"i": jnp.arange(3), "f": jnp.linspace(0.0, 1.0, 4), "b": jnp.array([True, False]),
          "key": jax.random.key(3), "raw": jax.random.PRNGKey(4)}
  dependency = {"g": jnp.full((2, 2), 5.0), "empty": jnp.zeros((0,))}
  out = jax.jit(tu.tree_after)(tree, dependency)
  unkeyed = lambda t: {k: v for k, v in t.items() if k != "key"}     # typed keys compare through their data
  chex.assert_trees_all_equal(unkeyed(out), unkeyed(tree))
  chex.assert_trees_all_equal_dtypes(unkeyed(out), unkeyed(tree))
  chex.assert_trees_all_equal(jax.random.key_data(out["key"]), jax.random.key_data(tree["key"]))


@pytest.mark.parametrize("in_lora", [False, True])
def test_the_training_step_is_compiled_once_on_a_mesh(monkeypatch, in_lora):
  """The loop's first call has the signature of the later ones: the optimiser's fresh leaves (Adam's count) and
  new LoRA adapters are placed as the step's outputs are, so the step is traced and compiled once, not once more
  at the second step."""
  from fipjax import lora, parallel
  made, make = [], continual.make_train_step
  monkeypatch.setattr(continual, "make_train_step", lambda *a, **kw: made.append(make(*a, **kw)) or made[-1])
  mesh = parallel.data_mesh()
  params = parallel.replicate(init_mlp(jax.random.PRNGKey(0), (4, 8, 3)), mesh)
  x = jax.random.normal(jax.random.PRNGKey(1), (8, 4))
  batch = parallel.shard_batch({"new": (x, jnp.arange(8) % 3)}, mesh)
  loss = lambda p, b, rng=None: optax.softmax_cross_entropy_with_integer_labels(mlp(p, b[0]), b[1]).mean()
  method = continual.naive(loss, optax.adamw(1e-2))
  if in_lora:
    method = continual.with_lora(method, lora.LoraConfig(targets=("kernel",), rank=2), jax.random.PRNGKey(3))
  continual.fit(method, params, iter([batch] * 3), 3, rng=jax.random.PRNGKey(2))
  assert len(made) == 1 and made[0]._cache_size() == 1


def test_the_registry_names_the_baselines_and_what_interp_finish_reads():
  assert continual.baselines() == ["naive", "interp"]
  assert continual.baselines(on_preferences=True) == ["dpo", "interp-dpo"]
  assert continual.REGISTRY["interp"].baseline and not continual.REGISTRY["fip"].baseline
