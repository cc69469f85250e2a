"""Compressed reference distributions: the compressed distances against the full ones, their error bound, and
the sequence FIP penalty."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fipjax import geometry, sequences


def _pair(key, shape=(64,), vocab=200, spread=3.0, shift=0.3):
  """Reference and perturbed logits, peaked like a language model's."""
  k1, k2 = jax.random.split(key)
  ref = spread * jax.random.normal(k1, (*shape, vocab), jnp.float64)
  return ref, ref + shift * jax.random.normal(k2, ref.shape, jnp.float64)


@pytest.mark.parametrize("k", [1, 8, 50, 199])
def test_compressed_distances_bracket_the_full_ones(x64, k):
  ref, new = _pair(jax.random.key(k))
  top = sequences.compress(ref, k, logprob_dtype=jnp.float64)
  full_b = geometry.bhattacharyya(new, ref)
  comp_b = sequences.bhattacharyya_topk(new, top)
  bound = sequences.bhattacharyya_error_bound(new, top)
  assert np.all(comp_b <= full_b + 1e-12)
  assert np.all(full_b - comp_b <= bound + 1e-12)
  comp_kl = sequences.kl_topk(new, top)
  assert np.all(comp_kl <= geometry.kl_divergence(new, ref) + 1e-12)
  assert np.all(comp_kl >= -1e-12)


def test_bound_holds_in_float32_for_a_tiny_reference_tail():
  """A reference whose top 8 hold all but 3e-7 of the mass (1 − Σ top would round that tail to 0 in float32)
  against a model that puts most of its mass elsewhere."""
  ref = jnp.full((1, 1000), -20.0).at[0, :8].set(jnp.linspace(0.0, -2.0, 8))
  new = jnp.zeros((1, 1000)).at[0, :8].set(jnp.linspace(0.0, -2.0, 8))
  top = sequences.compress(ref, 8)
  gap = geometry.bhattacharyya(new, ref) - sequences.bhattacharyya_topk(new, top)
  assert float(top.log_tail[0]) == pytest.approx(float(jax.nn.logsumexp(jax.nn.log_softmax(ref[0])[8:])), rel=1e-5)
  assert -1e-6 <= float(gap[0]) <= float(sequences.bhattacharyya_error_bound(new, top)[0]) + 1e-6
  assert sequences.kl_topk(new, top)[0] <= geometry.kl_divergence(new, ref)[0] + 1e-5


def test_all_tokens_kept_is_exact_and_reference_is_zero(x64):
  ref, new = _pair(jax.random.key(0), vocab=30)
  top = sequences.compress(ref, 30, logprob_dtype=jnp.float64)
  np.testing.assert_allclose(sequences.bhattacharyya_topk(new, top), geometry.bhattacharyya(new, ref), atol=1e-12)
  np.testing.assert_allclose(sequences.kl_topk(new, top), geometry.kl_divergence(new, ref), atol=1e-12)
  top8 = sequences.compress(ref, 8, logprob_dtype=jnp.float64)
  chex.assert_trees_all_close(sequences.bhattacharyya_topk(ref, top8), jnp.zeros(64), atol=1e-12)
  grad = jax.grad(lambda z: jnp.sum(sequences.bhattacharyya_topk(z, top8)))(ref)
  chex.assert_trees_all_close(grad, jnp.zeros_like(grad), atol=1e-7)   # √ of the distance floor only


def test_hessian_at_reference_is_bucketed_fisher(x64):
  """Second order: D_B^k(z_ref + dz) ≈ ⅛ · Fisher–Rao of the bucketed distribution, ≤ the full ⅛ dzᵀ G dz."""
  ref, _ = _pair(jax.random.key(3), shape=(1,), vocab=12)
  dz = 1e-3 * jax.random.normal(jax.random.key(4), ref.shape, jnp.float64)
  top = sequences.compress(ref, 4, logprob_dtype=jnp.float64)
  compressed = sequences.bhattacharyya_topk(ref + dz, top)[0]
  p = jax.nn.softmax(ref[0])
  # Bucket probabilities and their first-order change: δπ_b = Σ_{i∈b} p_i (dz_i − ⟨p, dz⟩).
  centred = p * (dz[0] - jnp.dot(p, dz[0]))
  ids = top.ids[0].astype(int)
  tail = jnp.ones(12, bool).at[ids].set(False)
  pi = jnp.concatenate([p[ids], jnp.array([p[tail].sum()])])
  dpi = jnp.concatenate([centred[ids], jnp.array([centred[tail].sum()])])
  np.testing.assert_allclose(compressed, 0.125 * jnp.sum(dpi ** 2 / pi), rtol=1e-2)
  assert compressed <= geometry.bhattacharyya(ref + dz, ref)[0] + 1e-15


def test_storage_and_choose_k():
  vocab = 49152
  # Zipf-like next-token distributions (p ∝ rank^-2 in a random order), as a language model's are.
  rank = jax.vmap(lambda k: jax.random.permutation(k, vocab))(jax.random.split(jax.random.key(1), 64)) + 1
  logits = -2.0 * jnp.log(rank.astype(jnp.float32)) + 0.1 * jax.random.normal(jax.random.key(2), rank.shape)
  top = sequences.compress(logits, 32)
  assert top.ids.dtype == jnp.uint16 and top.logprobs.dtype == jnp.float32
  assert top.bytes_per_token() == 32 * 6 + 4 and top.bytes_per_token() / (4 * vocab) < 0.002
  assert sequences.compress(logits, 32, logprob_dtype=jnp.float16).bytes_per_token() == 32 * 4 + 2
  k, tail = sequences.choose_k(logits, jnp.ones(64), tolerance=0.05)
  logp = np.sort(np.asarray(jax.nn.log_softmax(logits)), -1)[..., ::-1]
  tail_at = lambda k: np.quantile(1 - np.exp(logp[..., :k]).sum(-1), 0.99)
  assert tail == pytest.approx(tail_at(k)) and tail <= 0.05 < tail_at(k // 2)
  with pytest.raises(ValueError, match="no k in"):
    sequences.choose_k(logits, jnp.ones(64), tolerance=1e-6)


def test_sequence_penalty_counts_response_tokens_only(x64):
  vocab = 11
  table = jax.random.normal(jax.random.key(0), (vocab, vocab), jnp.float64)
  apply = lambda params, batch: params[batch["input_ids"]]           # a bigram model: logits [B, T, V]
  ids = jnp.array([[1, 2, 3, 4, 5, 0], [3, 3, 7, 8, 0, 0]])
  batch = {"input_ids": ids, "attention_mask": (ids > 0).astype(int),
           "response_mask": jnp.array([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 0, 0]])}
  batch["ref"] = tuple(sequences.reference_topk(apply, table, batch, 4, logprob_dtype=jnp.float64))
  pen = sequences.fip_penalty(apply, beta=2.0)
  assert float(pen(table, batch)) == pytest.approx(0.0, abs=1e-12)
  moved = table + 0.5 * jax.random.normal(jax.random.key(1), table.shape, jnp.float64)
  # The logits that score response tokens are those after inputs 2, 3, 4 (row 0) and 3, 3, 7 (row 1).
  scored = jnp.array([2, 3, 4, 3, 3, 7])
  by_hand = sequences.bhattacharyya_topk(moved[scored], sequences.compress(table[scored], 4,
                                                                           logprob_dtype=jnp.float64))
  np.testing.assert_allclose(pen(moved, batch), 2.0 * jnp.mean(by_hand), atol=1e-12)
  moved_prompt = table.at[1].add(3.0)        # after input 1 comes a prompt token: not counted
  assert float(pen(moved_prompt, batch)) == pytest.approx(0.0, abs=1e-12)
