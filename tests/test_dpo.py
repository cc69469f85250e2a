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


def _paper_loss(kind: str, margin: np.ndarray, beta: float, eps: float) -> np.ndarray:
  """Each loss as its paper writes it, in NumPy (float64)."""
  log_sigmoid = lambda x: -np.log1p(np.exp(-x))
  z = beta * margin
  if kind == "sigmoid":      # DPO (Rafailov et al. 2023, eq. 7); ε: conservative DPO's label flips
    return -(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z)
  if kind == "robust":       # Chowdhury et al. 2024, eq. 8
    return (-(1 - eps) * log_sigmoid(z) + eps * log_sigmoid(-z)) / (1 - 2 * eps)
  if kind == "hinge":        # SLiC-HF (Zhao et al. 2023), calibration loss with δ = 1
    return np.maximum(0.0, 1.0 - z)
  return (margin - 1.0 / (2.0 * beta)) ** 2        # IPO (Azar et al. 2023, eq. 17)


@pytest.mark.parametrize("kind", dpo.KINDS)
@pytest.mark.parametrize("eps", (0.0, 0.1))
def test_loss_formula_and_training_direction(x64, kind, eps):
  ref = jax.random.normal(jax.random.key(1), (VOCAB, VOCAB), jnp.float64)
  batch = {**_pairs(), **dpo.reference_logprobs(apply, ref, _pairs(), kind=kind)}
  loss_fn = dpo.task_loss(apply, beta=0.5, kind=kind, label_smoothing=eps)
  loss, metrics = loss_fn(ref, batch)
  expected = _paper_loss(kind, np.zeros(2), 0.5, eps).mean()            # policy = reference: Δ = 0
  np.testing.assert_allclose(loss, expected, rtol=1e-12)
  assert float(metrics["reward_accuracy"]) == 0.0
  policy = ref + 0.3 * jax.random.normal(jax.random.key(2), ref.shape, jnp.float64)
  avg = kind == "ipo"
  margin = ((_by_hand(policy, batch["chosen"]["input_ids"], 2, avg) - batch["ref_chosen"])
            - (_by_hand(policy, batch["rejected"]["input_ids"], 2, avg) - batch["ref_rejected"]))
  np.testing.assert_allclose(loss_fn(policy, batch)[0], _paper_loss(kind, margin, 0.5, eps).mean(), rtol=1e-10)
  for _ in range(50):
    policy = policy - 0.5 * jax.grad(lambda p: loss_fn(p, batch)[0])(policy)
  assert float(loss_fn(policy, batch)[1]["reward_accuracy"]) == 1.0
  assert float(loss_fn(policy, batch)[0]) < expected


def test_rpo_adds_the_chosen_responses_nll_per_token(x64):
  """RPO (Pang et al. 2024; TRL's rpo_alpha): the DPO loss plus α · the chosen tokens' mean negative
  log-likelihood."""
  ref = jax.random.normal(jax.random.key(1), (VOCAB, VOCAB), jnp.float64)
  policy = ref + 0.3 * jax.random.normal(jax.random.key(2), ref.shape, jnp.float64)
  batch = {**_pairs(), **dpo.reference_logprobs(apply, ref, _pairs())}
  plain, _ = dpo.task_loss(apply, beta=0.5)(policy, batch)
  rpo, metrics = dpo.task_loss(apply, beta=0.5, rpo_alpha=0.7)(policy, batch)
  ids = np.asarray(batch["chosen"]["input_ids"])
  token_logps = [jax.nn.log_softmax(policy[row[t - 1]])[row[t]] for row in ids for t in range(2, len(row))
                 if row[t] > 0]
  nll = -np.mean(token_logps)
  np.testing.assert_allclose(metrics["nll"], nll, rtol=1e-12)
  np.testing.assert_allclose(rpo, plain + 0.7 * nll, rtol=1e-12)


def test_unknown_kind_and_label_smoothing_out_of_range():
  with pytest.raises(ValueError, match="exponential"):
    dpo.task_loss(apply, kind="exponential")
  with pytest.raises(ValueError, match="label smoothing"):
    dpo.task_loss(apply, label_smoothing=0.5)
