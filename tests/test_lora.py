import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fipjax import continual, geometry, lora
from fipjax import tree as tu
from fipjax.models import bert
from conftest import init_mlp, mlp

from flax import nnx

MLP_CFG = lora.LoraConfig(targets=(r"layer_[01]/kernel$",), rank=2, alpha=4.0)


def _tiny_bert():
  cfg = bert.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=24, max_position_embeddings=16)
  graphdef, params = bert.split_params(bert.BertClassifier(cfg, {"yelp": 5, "imdb": 2}, rngs=nnx.Rngs(0)))
  return bert.make_apply(graphdef), params


def _perturbed(adapters, key):
  """Adapters with non-zero B (as after training)."""
  leaves, treedef = jax.tree.flatten(adapters)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [x + 0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def test_mlp_identity_at_init_merge_unmerge():
  params = init_mlp(jax.random.PRNGKey(0), (3, 6, 4), jnp.float32)
  x = jax.random.normal(jax.random.PRNGKey(1), (5, 3))
  adapters = lora.init(params, jax.random.PRNGKey(2), MLP_CFG)
  chex.assert_trees_all_equal(lora.merge(params, adapters, MLP_CFG), params)
  chex.assert_shape(adapters["layer_0"]["kernel"]["a"], (3, 2))
  chex.assert_shape(adapters["layer_1"]["kernel"]["b"], (2, 4))
  trained = _perturbed(adapters, jax.random.PRNGKey(3))
  merged = lora.merge(params, trained, MLP_CFG)
  # The merged model equals applying the adapters explicitly: x(W + s·A·B) = xW + s·(xA)B.
  h = jnp.tanh(x @ params["layer_0"]["kernel"] + MLP_CFG.scale * (x @ trained["layer_0"]["kernel"]["a"]) @ trained["layer_0"]["kernel"]["b"]
               + params["layer_0"]["bias"])
  explicit = (h @ params["layer_1"]["kernel"] + MLP_CFG.scale * (h @ trained["layer_1"]["kernel"]["a"]) @ trained["layer_1"]["kernel"]["b"]
              + params["layer_1"]["bias"])
  chex.assert_trees_all_close(mlp(merged, x), explicit, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(lora.unmerge(merged, trained, MLP_CFG), params, atol=1e-6)
  n, pct = lora.trainable_count(params, adapters)
  assert n == 3 * 2 + 2 * 6 + 6 * 2 + 2 * 4 and pct == pytest.approx(100 * n / (3 * 6 + 6 + 6 * 4 + 4))


def test_scales():
  assert lora.LoraConfig(rank=8, alpha=16).scale == 2.0
  assert lora.LoraConfig(rank=16, alpha=16, rslora=True).scale == 4.0


def test_pattern_that_matches_nothing_is_an_error():
  params = init_mlp(jax.random.PRNGKey(0), (3, 6, 4), jnp.float32)
  with pytest.raises(ValueError, match="match no parameter"):
    lora.init(params, jax.random.PRNGKey(0), lora.LoraConfig(targets=("attention/query",)))
  with pytest.raises(ValueError, match="≥ 2 axes"):
    lora.init(params, jax.random.PRNGKey(0), lora.LoraConfig(targets=("bias",)))


def test_bert_defaults_target_query_value():
  apply, params = _tiny_bert()
  adapters = lora.init(params, jax.random.PRNGKey(0))
  names = [n for n, _ in tu.named_leaves(adapters)]
  assert len(names) == 2 * 2 * 2    # 2 layers × (query, value) × (a, b)
  assert all("/attention/self/query/kernel/" in n or "/attention/self/value/kernel/" in n for n in names)
  batch = {"input_ids": jnp.array([[3, 4, 5, 0]]), "attention_mask": jnp.array([[1, 1, 1, 0]])}
  chex.assert_trees_all_equal(apply(lora.merge(params, adapters), batch), apply(params, batch))


def test_training_changes_only_adapters_and_head_bitwise():
  apply, params = _tiny_bert()
  cfg = lora.LoraConfig(rank=4, alpha=8)
  batch = {"input_ids": jnp.array([[3, 4, 5, 6], [7, 8, 9, 0]]), "attention_mask": jnp.array([[1] * 4, [1, 1, 1, 0]])}
  labels = jnp.array([0, 1])

  def task_loss(model_params, b, rng=None):
    return optax.softmax_cross_entropy_with_integer_labels(apply(model_params, b[0])["imdb"], b[1]).mean()

  method = continual.naive(task_loss, optax.adamw(1e-2, weight_decay=0.01),
                           init=lambda p: lora.train_params(p, jax.random.PRNGKey(1), cfg),
                           to_model=lambda tp: lora.to_model(tp, cfg),
                           trainable=lambda tp: lora.train_mask(tp, r"^heads/imdb/"))
  final, state, history = continual.fit(method, params, iter([{"new": (batch, labels)}] * 5), 5)
  assert history[-1]["loss"] < history[0]["loss"]
  base = state.train_params["base"]
  changed = {n for (n, a), (_, b) in zip(tu.named_leaves(base), tu.named_leaves(params))
             if not np.array_equal(np.asarray(a), np.asarray(b))}
  assert changed == {"heads/imdb/bias", "heads/imdb/kernel"}
  assert tu.tree_norm(state.train_params["lora"]) > tu.tree_norm(lora.init(params, jax.random.PRNGKey(1), cfg))
  chex.assert_trees_all_close(final, lora.to_model(state.train_params, cfg))


def test_adapter_input_dropout():
  params = init_mlp(jax.random.PRNGKey(0), (8, 6, 4), jnp.float32)
  cfg = lora.LoraConfig(targets=(r"layer_0/kernel$",), rank=2, alpha=2.0, dropout=0.5)
  adapters = _perturbed(lora.init(params, jax.random.PRNGKey(1), cfg), jax.random.PRNGKey(2))
  plain = lora.merge(params, adapters, cfg)
  dropped = lora.merge(params, adapters, cfg, rng=jax.random.PRNGKey(3))
  delta_rows = np.abs(np.asarray(dropped["layer_0"]["kernel"] - params["layer_0"]["kernel"])).sum(1)
  assert (delta_rows == 0).any() and (delta_rows > 0).any()      # some input features dropped, not all
  assert not np.allclose(plain["layer_0"]["kernel"], dropped["layer_0"]["kernel"])
  chex.assert_trees_all_equal(plain["layer_1"], dropped["layer_1"])


def test_geodesic_fip_in_the_lora_subspace(x64):
  """The geodesic step with LoRA solves (G_A + λI) x = ∇_A L with G_A pulled back to adapter coordinates."""
  params = init_mlp(jax.random.PRNGKey(0), (3, 6, 4))
  cfg = lora.LoraConfig(targets=(r"layer_[01]/kernel$",), rank=2, alpha=2.0)
  x_old = jax.random.normal(jax.random.PRNGKey(1), (8, 3))
  x_new = jax.random.normal(jax.random.PRNGKey(2), (8, 3)) + 1.0
  y_new = jnp.arange(8) % 4
  task_loss = lambda p, b, rng=None: optax.softmax_cross_entropy_with_integer_labels(mlp(p, b[0]), b[1]).mean()
  start = _perturbed(lora.init(params, jax.random.PRNGKey(3), cfg), jax.random.PRNGKey(4))  # B ≠ 0: G_A ≠ 0
  lr, damping = 0.05, 1e-2
  method = continual.fip_geodesic(task_loss, mlp, learning_rate=lr, damping=damping, cg_iters=200,
                                  init=lambda p: {"base": p, "lora": start},
                                  to_model=lambda tp: lora.to_model(tp, cfg),
                                  trainable=lambda tp: lora.train_mask(tp))
  batch = {"new": (x_new, y_new), "replay": {"inputs": x_old}}
  final, state, _ = continual.fit(method, params, iter([batch]), 1)
  chex.assert_trees_all_equal(state.train_params["base"], params)

  f_adapters = lambda a, x: mlp(lora.merge(params, a, cfg), x)
  g_dense = geometry.pullback_metric(f_adapters, start, x_old, "fisher_rao").damped(damping).dense()
  ravel, _ = tu.ravel_fn(start)
  grad = ravel(jax.grad(lambda a: task_loss(lora.merge(params, a, cfg), (x_new, y_new)))(start))
  expected = ravel(start) - lr * np.linalg.solve(g_dense, grad)
  # CG stops at its relative residual 1e-6; the entries move by ~1e-2, so 1e-6 is a sharp check.
  np.testing.assert_allclose(ravel(state.train_params["lora"]), expected, rtol=0, atol=1e-6)
