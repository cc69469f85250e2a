"""Token distributions of a sequence model, stored compressed: the FIP penalty for language models.

A reference next-token distribution ``p`` over a vocabulary of V tokens costs ``4 V`` bytes per token in float32
(196,608 for SmolLM2). :class:`TopK` keeps its k most likely tokens and their log-probabilities; the rest is one
*tail* bucket of mass ``p_tail = 1 − Σ_top p``. Distances are then computed between the coarse-grained
distributions on the k + 1 buckets ``(p_top, p_tail)`` and ``(q_top, q_tail)``, with ``q`` the current model's
distribution on the same buckets. Coarse-graining can only bring distributions closer (data processing), so

    0 ≤ D_B(p, q) − D_B^k(p, q) ≤ −log(1 − √(p_tail q_tail) / BC^k)       (Bhattacharyya, BC^k = e^{−D_B^k})
    0 ≤ KL(p ‖ q) − KL^k(p ‖ q) = p_tail · KL(p_tail-part ‖ q_tail-part)

(the first because the tail's share of the full coefficient lies between 0 and √(p_tail q_tail) by
Cauchy–Schwarz). Both compressed distances vanish with their gradients at ``q = p``, and their Hessians there are
the Fisher–Rao metric of the bucketed distribution (≼ the full one), so the compressed penalty is FIP's penalty
seen through k + 1 outputs per token. :func:`bhattacharyya_error_bound` evaluates the bound;
:func:`choose_k` picks k from the tail mass it leaves.
"""

from __future__ import annotations

from typing import Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_LOG_FLOOR = -69.0     # log(1e-30): a tail below this counts as 1e-30 (keeps −∞ − (−∞) out of the KL term)


class TopK(NamedTuple):
  """The k most likely tokens ``ids [..., k]``, their log-probabilities ``logprobs [..., k]``, and the log of the
  remaining mass ``log_tail [...]`` (computed from the tokens themselves, not as 1 − Σ top: in float32 that
  difference loses every tail below about 1e-6, which a language model's top 32 often leave)."""
  ids: jax.Array
  logprobs: jax.Array
  log_tail: jax.Array

  def bytes_per_token(self) -> int:
    return int(self.ids.shape[-1] * (self.ids.dtype.itemsize + self.logprobs.dtype.itemsize)
               + self.log_tail.dtype.itemsize)


def _log_softmax(logits: jax.Array) -> jax.Array:
  return jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), -1)


def _log_rest(logp: jax.Array, ids: jax.Array) -> jax.Array:
  """log Σ_{i ∉ ids} p_i ``[...]`` from ``logp [..., V]`` and ``ids [..., k]``, floored at :data:`_LOG_FLOOR`."""
  flat, flat_ids = logp.reshape(-1, logp.shape[-1]), ids.reshape(-1, ids.shape[-1]).astype(jnp.int32)
  rest = flat.at[jnp.arange(flat.shape[0])[:, None], flat_ids].set(-jnp.inf)
  return jnp.maximum(jax.nn.logsumexp(rest, -1), _LOG_FLOOR).reshape(logp.shape[:-1])


def compress(logits: jax.Array, k: int, *, logprob_dtype=jnp.float32) -> TopK:
  """Top-k of ``softmax(logits [..., V])`` and the log of the rest; token ids as uint16 when V ≤ 65,536.

  float32 log-probabilities make the compressed distance exactly 0 at the reference (k = 32: 196 bytes a
  token, 0.1% of SmolLM2's full float32 distribution); float16 saves a third, at a floor of about 1e-7 nats.
  """
  logp = _log_softmax(logits)
  top, ids = jax.lax.top_k(logp, k)
  id_dtype = jnp.uint16 if logits.shape[-1] <= 2 ** 16 else jnp.int32
  return TopK(ids.astype(id_dtype), top.astype(logprob_dtype), _log_rest(logp, ids).astype(logprob_dtype))


def _buckets(logits: jax.Array, ref: TopK):
  """(log p_top, log p_tail, log q_top, log q_tail): the reference ``p`` and the model ``q`` on the buckets."""
  logq = _log_softmax(logits)
  ids = ref.ids.astype(jnp.int32)
  log_q_top, log_q_tail = jnp.take_along_axis(logq, ids, -1), _log_rest(logq, ids)
  log_p = jnp.concatenate([ref.logprobs, ref.log_tail[..., None]], -1).astype(logq.dtype)
  log_p = log_p - jax.nn.logsumexp(log_p, -1, keepdims=True)        # stored rounding: the buckets sum to 1
  return log_p[..., :-1], log_p[..., -1], log_q_top, log_q_tail


def bhattacharyya_topk(logits: jax.Array, ref: TopK) -> jax.Array:
  """Bhattacharyya distance between the bucketed reference and ``softmax(logits [..., V])``, ``[...]``."""
  lp, lpt, lq, lqt = _buckets(logits, ref)
  terms = jnp.concatenate([0.5 * (lp + lq), 0.5 * (lpt + lqt)[..., None]], -1)
  return jnp.maximum(-jax.nn.logsumexp(terms, -1), 0.0)


def kl_topk(logits: jax.Array, ref: TopK) -> jax.Array:
  """KL(bucketed reference ‖ bucketed ``softmax(logits)``), ``[...]``."""
  lp, lpt, lq, lqt = _buckets(logits, ref)
  return jnp.sum(jnp.exp(lp) * (lp - lq), -1) + jnp.exp(lpt) * (lpt - lqt)


def bhattacharyya_error_bound(logits: jax.Array, ref: TopK) -> jax.Array:
  """Upper bound on ``D_B(full) − D_B(compressed)`` per token, from stored and current quantities only."""
  _, lpt, _, lqt = _buckets(logits, ref)
  ratio = jnp.exp(0.5 * (lpt + lqt) + bhattacharyya_topk(logits, ref))     # √(p_t q_t) / BC^k
  return -jnp.log1p(-jnp.minimum(ratio, 1 - 1e-7))


DISTANCES: dict[str, Callable[[jax.Array, TopK], jax.Array]] = {"bhattacharyya": bhattacharyya_topk,
                                                                 "kl": kl_topk}


def choose_k(logits: jax.Array, mask: jax.Array, tolerance: float, *, candidates=(4, 8, 16, 32, 64, 128, 256),
             quantile: float = 0.99) -> tuple[int, float]:
  """(the smallest candidate k whose reference tail mass is ≤ ``tolerance`` on the ``quantile`` of tokens, that
  tail-mass quantile); ``logits [..., V]``, ``mask [...]`` marks the tokens that count. Near the reference the
  Bhattacharyya error bound is about the tail mass, so this bounds the penalty's error per token on all but
  1 − quantile of them. ValueError when no candidate reaches the tolerance."""
  logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), -1))[np.asarray(mask) > 0]
  ordered = -np.sort(-logp, -1)
  for k in candidates:
    tail = float(np.quantile(1.0 - np.exp(ordered[:, :k]).sum(-1), quantile))
    if tail <= tolerance:
      return k, tail
  raise ValueError(f"no k in {tuple(candidates)} leaves a tail mass ≤ {tolerance} on {quantile:.0%} of tokens "
                   f"(k = {candidates[-1]} leaves {tail:.3g}); allow a larger k or a larger tolerance")


def response_positions(batch: Mapping[str, jax.Array]) -> jax.Array:
  """``[B, T-1]`` mask of the positions whose next token is a response token (the logits that score it)."""
  return batch["response_mask"][:, 1:].astype(jnp.float32)


def fip_penalty(apply: Callable, *, beta: float, distance: str = "bhattacharyya") -> Callable:
  """The FIP penalty for a sequence model: ``β · mean over response tokens of D(p_ref, p_θ)`` with the
  reference stored as :class:`TopK` (``batch["ref"]``, ``[B, T-1, k]``, aligned with the predicting positions).

  Returns:
    ``penalty(params, batch) -> scalar``; ``batch`` holds ``input_ids``, ``attention_mask``, ``response_mask``
    ``[B, T]`` and ``ref``.
  """
  d = DISTANCES[distance]

  def penalty(params, batch):
    logits = apply(params, batch)[:, :-1]
    m = response_positions(batch)
    return beta * jnp.sum(d(logits, TopK(*batch["ref"])) * m) / jnp.maximum(jnp.sum(m), 1.0)

  return penalty


def reference_topk(apply: Callable, params, batch: Mapping[str, jax.Array], k: int, *,
                   logprob_dtype=jnp.float32) -> TopK:
  """The stored reference of a batch: :func:`compress` of the model's next-token logits ``[B, T-1, k]``."""
  return compress(apply(params, batch)[:, :-1], k, logprob_dtype=logprob_dtype)
