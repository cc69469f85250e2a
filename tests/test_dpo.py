"""DPO / IPO as a task loss with stored reference log-probabilities."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fipjax import dpo

VOCAB = 9
apply = lambda params, batch: params[batch["input_ids"]]        # a bigram model: logits [B, T, V]


def _pairs():
  chosen = jnp.array([[1, 2, 3, 4, 0], [5, 6, 2, 0, 0]])
  rejected = jnp.array([[1, 2, 7, 7, 8], [5, 6, 8, 1, 0]])
  seq = lambda ids, prompt: {"input_ids": ids, "attention_mask": (ids > 0).astype(jnp.int32),
                             "response_mask": ((ids > 0) & (jnp.arange(ids.shape[1]) >= prompt)).astype(jnp.int32)}
  return {"chosen": seq(chosen, 2), "rejected": seq(rejected, 2)}


def _by_hand(table, ids, prompt, average=False):
  out = []
  for row in np.asarray(ids):
    logp = [jax.nn.log_softmax(table[row[t - 1]])[row[t]] for t in range(prompt, len(row)) if row[t] > 0]
    out.append(np.mean(logp) if average else np.sum(logp))
  return np.array(out)


def test_sequence_logprob_sums_response_tokens(x64):
  table = jax.random.normal(jax.random.key(0), (VOCAB, VOCAB), jnp.float64)
  batch = _pairs()
  for average in (False, True):
    got = dpo.sequence_logprob(apply(table, batch["chosen"]), batch["chosen"], average=average)
    np.testing.assert_allclose(got, _by_hand(table, batch["chosen"]["input_ids"], 2, average), rtol=1e-12)


@pytest.mark.parametrize("kind", dpo.KINDS)
def test_loss_formula_and_training_direction(x64, kind):
  ref = jax.random.normal(jax.random.key(1), (VOCAB, VOCAB), jnp.float64)
  batch = {**_pairs(), **dpo.reference_logprobs(apply, ref, _pairs(), kind=kind)}
  loss_fn = dpo.task_loss(apply, beta=0.5, kind=kind)
  loss, metrics = loss_fn(ref, batch)
  expected = np.log(2.0) if kind == "sigmoid" else (1.0 / (2 * 0.5)) ** 2      # policy = reference: Δ = 0
  np.testing.assert_allclose(loss, expected, rtol=1e-12)
  assert float(metrics["reward_accuracy"]) == 0.0
  policy = ref + 0.3 * jax.random.normal(jax.random.key(2), ref.shape, jnp.float64)
  avg = kind == "ipo"
  margin = ((_by_hand(policy, batch["chosen"]["input_ids"], 2, avg) - batch["ref_chosen"])
            - (_by_hand(policy, batch["rejected"]["input_ids"], 2, avg) - batch["ref_rejected"]))
  want = (-jax.nn.log_sigmoid(0.5 * margin) if kind == "sigmoid" else (margin - 1.0) ** 2).mean()
  np.testing.assert_allclose(loss_fn(policy, batch)[0], want, rtol=1e-10)
  for _ in range(50):
    policy = policy - 0.5 * jax.grad(lambda p: loss_fn(p, batch)[0])(policy)
  assert float(loss_fn(policy, batch)[1]["reward_accuracy"]) == 1.0
  assert float(loss_fn(policy, batch)[0]) < expected


def test_unknown_kind():
  with pytest.raises(ValueError, match="hinge"):
    dpo.task_loss(apply, kind="hinge")
