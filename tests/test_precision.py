"""bfloat16 parameters trained through float32 master weights (fipjax.precision)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fipjax import config as cf
from fipjax import continual, lora, precision
from fipjax import tree as tu
from conftest import init_mlp, mlp


def _run(opt, params, grads, steps):
  state = opt.init(params)
  for _ in range(steps):
    updates, state = opt.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def test_float32_parameters_get_the_inner_transform_exactly():
  params = {"w": jnp.linspace(-1.0, 1.0, 6), "b": jnp.ones(2)}
  grads = jax.tree.map(jnp.cos, params)
  inner = optax.adamw(1e-2, weight_decay=0.1)
  got, state = _run(precision.float32_master(inner), params, grads, 5)
  want, want_state = _run(inner, params, grads, 5)
  chex.assert_trees_all_equal(got, want)
  chex.assert_trees_all_equal(state, want_state)
  assert precision.float32_master(precision.float32_master(inner)) is not inner     # wrapped once, not twice
  wrapped = precision.float32_master(inner)
  assert precision.float32_master(wrapped) is wrapped


def test_bfloat16_steps_accumulate_in_float32_as_a_float32_run_would():
  # A constant gradient makes the float32 trajectory independent of the weights' rounding: the master weights must
  # follow it exactly and the bfloat16 weights be its rounding. AdamW at lr 1e-4 moves a weight of size ~1 by 1e-4 a
  # step, under half of bfloat16's spacing there (2^-7): plain AdamW on bfloat16 weights never moves them.
  start = {"w": jnp.linspace(0.5, 1.5, 8), "b": jnp.arange(1.0, 4.0)}
  narrow = precision.cast_floating(start, jnp.bfloat16)
  grads = jax.tree.map(lambda p: jnp.cos(7.0 * p).astype(jnp.bfloat16), narrow)
  inner = optax.adamw(1e-4, weight_decay=0.0)
  want, _ = _run(inner, jax.tree.map(lambda p: p.astype(jnp.float32), narrow),
                 jax.tree.map(lambda g: g.astype(jnp.float32), grads), 40)
  got, state = _run(precision.float32_master(inner), narrow, grads, 40)
  chex.assert_trees_all_equal(state.master, want)
  chex.assert_trees_all_equal(got, precision.cast_floating(want, jnp.bfloat16))
  assert {x.dtype for x in jax.tree.leaves(got)} == {jnp.dtype(jnp.bfloat16)}
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.inner) if jnp.issubdtype(x.dtype, jnp.floating))
  stuck, _ = _run(inner, narrow, grads, 40)
  chex.assert_trees_all_equal(stuck, narrow)                   # the failure the master weights prevent
  assert not np.array_equal(got["w"], narrow["w"])


def test_only_narrow_leaves_get_a_master_copy():
  params = {"base": jnp.ones(4, jnp.bfloat16), "adapter": jnp.ones(3, jnp.float32), "step": jnp.zeros((), jnp.int32)}
  state = precision.float32_master(optax.sgd(0.1)).init({k: v for k, v in params.items() if k != "step"})
  assert state.master["adapter"] is None and state.master["base"].dtype == jnp.float32


def test_lora_adapters_are_float32_on_a_bfloat16_base_and_their_delta_survives_the_merge():
  base = {"layer": {"kernel": jnp.ones((16, 8), jnp.bfloat16)}}
  config = lora.LoraConfig(targets="kernel$", rank=2, alpha=2.0)
  adapters = lora.init(base, jax.random.PRNGKey(0), config)
  assert adapters["layer"]["kernel"]["a"].dtype == jnp.float32
  adapters = jax.tree.map(lambda x: jnp.full_like(x, 1e-2), adapters)      # s·A·B = 2e-4 everywhere
  merged = lora.merge(base, adapters, config)["layer"]["kernel"]
  delta = config.scale * (adapters["layer"]["kernel"]["a"] @ adapters["layer"]["kernel"]["b"])
  assert merged.dtype == jnp.float32
  chex.assert_trees_all_close(merged - 1.0, delta, atol=1e-7)   # rounded to bfloat16 it would be 0 (1 + 2e-4 → 1)


@pytest.mark.parametrize("name", ["naive", "fip", "lora", "ewc"])
def test_methods_train_bfloat16_parameters_close_to_float32(name):
  params = init_mlp(jax.random.PRNGKey(0), (3, 8, 2), jnp.float32)
  x = jax.random.normal(jax.random.PRNGKey(1), (32, 3))
  y = (x[:, 0] > 0).astype(jnp.int32)
  loss = lambda p, b, rng=None: optax.softmax_cross_entropy_with_integer_labels(
      mlp(p, b["inputs"]).astype(jnp.float32), b["labels"]).mean()
  readout = lambda p, h: h @ p["layer_1"]["kernel"] + p["layer_1"]["bias"]
  ones = jax.tree.map(jnp.ones_like, params)

  def train(p):
    old = continual.OldTask(mlp, mlp, loss, lambda n: x[:n], readout, {"si_omega": ones, "si_change": ones})
    ctx = continual.StageContext(loss, {"a": old}, p, None, head="^layer_1/", seed=0)
    hp = cf.with_values(continual.MethodConfig(), {"lora.targets": "kernel$", "ewc.samples": 8, "ewc.strength": 10.0})
    method = continual.build(name, ctx, hp, continual.OptimConfig(lr=1e-2, weight_decay=0.0))
    replay = {"a": {"inputs": -x, "labels": y, "ref_outputs": mlp(params, -x)}}
    batches = [{"new": {"inputs": x, "labels": 1 - y}, "replay": replay}] * 12
    return continual.fit(method, p, iter(batches), 12)

  final, state, history = train(precision.cast_floating(params, jnp.bfloat16))
  want, _, want_history = train(precision.cast_floating(precision.cast_floating(params, jnp.bfloat16), jnp.float32))
  # LoRA's merged kernels are float32: the adapters' delta would round away in bfloat16.
  narrow = {n for n, x in tu.named_leaves(final) if x.dtype == jnp.bfloat16}
  assert narrow == {n for n, _ in tu.named_leaves(final) if not (name == "lora" and n.endswith("kernel"))}
  assert all(np.isfinite(h["loss"]) for h in history)
  assert any(isinstance(s, precision.MasterState) for s in jax.tree.leaves(
      state.opt_state, is_leaf=lambda s: isinstance(s, precision.MasterState)))
  # Gradients at the rounded weights differ from float32's in bfloat16's third digit; 12 steps stay that close.
  chex.assert_trees_all_close(jax.tree.map(lambda a: a.astype(jnp.float32), final), want, atol=3e-2)
  assert abs(history[-1]["loss"] - want_history[-1]["loss"]) < 2e-2


def test_bfloat16_loaded_parameters_compute_as_their_float32_rounding(small_llama, monkeypatch):
  from fipjax import models
  from fipjax.models import llama
  wide = models.load(small_llama)
  narrow = models.load(small_llama, param_dtype=jnp.bfloat16)
  assert {x.dtype for x in jax.tree.leaves(narrow.params)} == {jnp.dtype(jnp.bfloat16)}
  ids = jnp.asarray([[1, 5, 9, 200, 7], [0, 0, 3, 4, 11]])
  batch = {"input_ids": ids, "attention_mask": (ids > 0).astype(jnp.int32)}
  apply = jax.jit(llama.make_apply(narrow.graphdef))
  rounded = precision.cast_floating(precision.cast_floating(wide.params, jnp.bfloat16), jnp.float32)
  got = apply(narrow.params, batch)
  assert got.dtype == jnp.float32                               # float32 compute on bfloat16 weights
  chex.assert_trees_all_close(got, apply(rounded, batch), rtol=1e-6, atol=1e-6)
  # The KV cache follows the compute dtype.
  made = []
  empty = llama.KVCache.empty
  monkeypatch.setattr(llama.KVCache, "empty", lambda *a: made.append(a[-1]) or empty(*a))
  compute = models.load(small_llama, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  for m in (narrow, compute):
    llama.generate(m.graphdef, m.params, ids, batch["attention_mask"], jax.random.key(0), max_new_tokens=2,
                   eos_id=None)
  assert made == [jnp.float32, jnp.bfloat16]
