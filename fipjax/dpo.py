"""Direct preference optimisation (Rafailov et al. 2023) as a task loss, with the reference policy's
log-probabilities computed once and stored (no reference model in memory during training).

A preference batch holds the chosen and the rejected sequence of each pair (prompt + response, right-padded)::

    {"chosen": {"input_ids", "attention_mask", "response_mask"}  [B, T],
     "rejected": {...},
     "ref_chosen": [B], "ref_rejected": [B]}        # log π_ref(response | prompt), from :func:`reference_logprobs`

With ``Δ = (log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))``:
``sigmoid`` (DPO) minimises ``−log σ(β Δ)``; ``ipo`` (Azar et al. 2023) minimises ``(Δ − 1/(2β))²`` on
per-token mean log-probabilities, as in their paper and TRL.
"""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp

from fipjax.models.llama import token_logprobs

KINDS = ("sigmoid", "ipo")


def sequence_logprob(logits: jax.Array, batch: Mapping[str, jax.Array], *, average: bool = False) -> jax.Array:
  """``log π(response | prompt)`` ``[B]``: the sum (or mean) of the response tokens' log-probabilities under
  ``logits [B, T, V]``; ``batch["response_mask"] [B, T]`` marks the response tokens."""
  m = batch["response_mask"][:, 1:].astype(jnp.float32)
  total = jnp.sum(token_logprobs(logits, batch["input_ids"]) * m, -1)
  return total / jnp.maximum(jnp.sum(m, -1), 1.0) if average else total


def _both(apply: Callable, params, batch, average: bool) -> tuple[jax.Array, jax.Array]:
  """(chosen, rejected) log-probabilities from one forward pass over the 2B sequences."""
  pair = {k: jnp.concatenate([batch["chosen"][k], batch["rejected"][k]])
          for k in ("input_ids", "attention_mask", "response_mask")}
  logp = sequence_logprob(apply(params, pair), pair, average=average)
  b = batch["chosen"]["input_ids"].shape[0]
  return logp[:b], logp[b:]


def reference_logprobs(apply: Callable, params, batch: Mapping, *, kind: str = "sigmoid") -> dict[str, jax.Array]:
  """``{"ref_chosen", "ref_rejected"}`` ``[B]`` of the reference policy ``params``: computed once per pair and
  stored with it."""
  chosen, rejected = _both(apply, params, batch, kind == "ipo")
  return {"ref_chosen": chosen, "ref_rejected": rejected}


def preference_loss(chosen, rejected, ref_chosen, ref_rejected, *, beta: float,
                    kind: str = "sigmoid") -> tuple[jax.Array, jax.Array]:
  """(per-pair loss ``[B]``, margin ``Δ [B]``) from policy and reference log-probabilities."""
  if kind not in KINDS:
    raise ValueError(f"unknown preference loss {kind!r}; choose one of {KINDS}")
  margin = (chosen - ref_chosen) - (rejected - ref_rejected)
  if kind == "ipo":
    return (margin - 1.0 / (2.0 * beta)) ** 2, margin
  return -jax.nn.log_sigmoid(beta * margin), margin


def implicit_margins(apply: Callable, params, batch: Mapping, *, kind: str = "sigmoid") -> jax.Array:
  """``Δ [B]``: how much more the policy ``params`` raised the chosen response than the rejected one over the
  stored reference (the implicit reward's margin, divided by β)."""
  chosen, rejected = _both(apply, params, batch, kind == "ipo")
  return (chosen - batch["ref_chosen"]) - (rejected - batch["ref_rejected"])


def task_loss(apply: Callable, *, beta: float = 0.1, kind: str = "sigmoid") -> Callable:
  """A :data:`fipjax.continual.TaskLoss` for preference batches: ``loss(params, batch, rng) -> (scalar,
  {"reward_accuracy", "margin"})``; the implicit reward of a response is ``β (log π − log π_ref)``."""
  if kind not in KINDS:
    raise ValueError(f"unknown preference loss {kind!r}; choose one of {KINDS}")

  def loss(params, batch, rng=None):
    chosen, rejected = _both(apply, params, batch, kind == "ipo")
    per_pair, margin = preference_loss(chosen, rejected, batch["ref_chosen"], batch["ref_rejected"], beta=beta,
                                       kind=kind)
    return jnp.mean(per_pair), {"reward_accuracy": jnp.mean(margin > 0), "margin": jnp.mean(margin)}

  return loss
