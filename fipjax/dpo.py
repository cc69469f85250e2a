"""Direct preference optimisation (Rafailov et al. 2023) as a task loss, with the reference policy's
log-probabilities computed once and stored (no reference model in memory during training).

A preference batch holds the chosen and the rejected sequence of each pair (prompt + response, right-padded)::

    {"chosen": {"input_ids", "attention_mask", "response_mask"}  [B, T],
     "rejected": {...},
     "ref_chosen": [B], "ref_rejected": [B]}        # log π_ref(response | prompt), from :func:`reference_logprobs`

With ``Δ = (log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))`` and TRL's names
(``DPOConfig.loss_type``, ``label_smoothing`` ε, ``rpo_alpha``):

* ``sigmoid`` (DPO, Rafailov et al. 2023): ``−(1 − ε) log σ(β Δ) − ε log σ(−β Δ)`` (ε > 0: conservative DPO, the
  preference labels flipped with probability ε);
* ``robust`` (Chowdhury et al. 2024): ``(−(1 − ε) log σ(β Δ) + ε log σ(−β Δ)) / (1 − 2ε)``, unbiased under label
  noise ε;
* ``hinge`` (SLiC, Zhao et al. 2023): ``max(0, 1 − β Δ)``;
* ``ipo`` (Azar et al. 2023): ``(Δ − 1/(2β))²`` on per-token mean log-probabilities, as in their paper and TRL;
* ``rpo_alpha`` α (RPO, Pang et al. 2024): plus α times the chosen responses' negative log-likelihood per token.
"""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp

from fipjax.models.common import token_logprobs

KINDS = ("sigmoid", "ipo", "hinge", "robust")


def sequence_logprob(logits: jax.Array, batch: Mapping[str, jax.Array], *, average: bool = False) -> jax.Array:
  """``log π(response | prompt)`` ``[B]``: the sum (or mean) of the response tokens' log-probabilities under
  ``logits [B, T, V]``; ``batch["response_mask"] [B, T]`` marks the response tokens."""
  m = batch["response_mask"][:, 1:].astype(jnp.float32)
  total = jnp.sum(token_logprobs(logits, batch["input_ids"]) * m, -1)
  return total / jnp.maximum(jnp.sum(m, -1), 1.0) if average else total


def _logits(apply: Callable, params, batch) -> tuple[jax.Array, dict]:
  """(logits ``[2B, T, V]``, the 2B sequences): chosen then rejected, in one forward pass."""
  pair = {k: jnp.concatenate([batch["chosen"][k], batch["rejected"][k]])
          for k in ("input_ids", "attention_mask", "response_mask")}
  return apply(params, pair), pair


def _both(apply: Callable, params, batch, average: bool) -> tuple[jax.Array, jax.Array]:
  """(chosen, rejected) log-probabilities from one forward pass over the 2B sequences."""
  logits, pair = _logits(apply, params, batch)
  logp = sequence_logprob(logits, pair, average=average)
  b = batch["chosen"]["input_ids"].shape[0]
  return logp[:b], logp[b:]


def reference_logprobs(apply: Callable, params, batch: Mapping, *, kind: str = "sigmoid") -> dict[str, jax.Array]:
  """``{"ref_chosen", "ref_rejected"}`` ``[B]`` of the reference policy ``params``: computed once per pair and
  stored with it."""
  chosen, rejected = _both(apply, params, batch, kind == "ipo")
  return {"ref_chosen": chosen, "ref_rejected": rejected}


def _check(kind: str, label_smoothing: float) -> None:
  if kind not in KINDS:
    raise ValueError(f"unknown preference loss {kind!r}; choose one of {KINDS}")
  if not 0.0 <= label_smoothing < 0.5:
    raise ValueError(f"label smoothing ε must be in [0, 0.5), got {label_smoothing}")


def preference_loss(chosen, rejected, ref_chosen, ref_rejected, *, beta: float, kind: str = "sigmoid",
                    label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """(per-pair loss ``[B]``, margin ``Δ [B]``) from policy and reference log-probabilities (see the module
  docstring for each ``kind``)."""
  _check(kind, label_smoothing)
  margin = (chosen - ref_chosen) - (rejected - ref_rejected)
  eps, z = label_smoothing, beta * margin
  if kind == "ipo":
    return (margin - 1.0 / (2.0 * beta)) ** 2, margin
  if kind == "hinge":
    return jax.nn.relu(1.0 - z), margin
  if kind == "robust":
    return (-(1.0 - eps) * jax.nn.log_sigmoid(z) + eps * jax.nn.log_sigmoid(-z)) / (1.0 - 2.0 * eps), margin
  if eps == 0.0:              # the plain DPO graph (bitwise as before label smoothing existed)
    return -jax.nn.log_sigmoid(z), margin
  return -(1.0 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z), margin


def implicit_margins(apply: Callable, params, batch: Mapping, *, kind: str = "sigmoid") -> jax.Array:
  """``Δ [B]``: how much more the policy ``params`` raised the chosen response than the rejected one over the
  stored reference (the implicit reward's margin, divided by β)."""
  return pair_statistics(apply, params, batch, kind=kind)[0]


def pair_statistics(apply: Callable, params, batch: Mapping, *, kind: str = "sigmoid") -> tuple[jax.Array, jax.Array]:
  """(``Δ [B]`` as :func:`implicit_margins`, ``log π(chosen | prompt) [B]``, summed over the response tokens)."""
  chosen, rejected = _both(apply, params, batch, kind == "ipo")
  total = chosen if kind != "ipo" else _both(apply, params, batch, False)[0]
  return (chosen - batch["ref_chosen"]) - (rejected - batch["ref_rejected"]), total


def task_loss(apply: Callable, *, beta: float = 0.1, kind: str = "sigmoid", label_smoothing: float = 0.0,
              rpo_alpha: float | None = None) -> Callable:
  """A :data:`fipjax.continual.TaskLoss` for preference batches: ``loss(params, batch, rng) -> (scalar,
  {"reward_accuracy", "margin"[, "nll"]})``; the implicit reward of a response is ``β (log π − log π_ref)``.
  ``rpo_alpha``: add α · the chosen responses' mean negative log-likelihood per token (TRL's ``rpo_alpha``)."""
  _check(kind, label_smoothing)

  def loss(params, batch, rng=None):
    logits, pair = _logits(apply, params, batch)
    logp = sequence_logprob(logits, pair, average=kind == "ipo")
    b = batch["chosen"]["input_ids"].shape[0]
    per_pair, margin = preference_loss(logp[:b], logp[b:], batch["ref_chosen"], batch["ref_rejected"], beta=beta,
                                       kind=kind, label_smoothing=label_smoothing)
    value, metrics = jnp.mean(per_pair), {"reward_accuracy": jnp.mean(margin > 0), "margin": jnp.mean(margin)}
    if rpo_alpha is not None:
      m = batch["chosen"]["response_mask"][:, 1:].astype(jnp.float32)
      nll = -jnp.sum(token_logprobs(logits[:b], batch["chosen"]["input_ids"]) * m) / jnp.maximum(jnp.sum(m), 1.0)
      value, metrics = value + rpo_alpha * nll, {**metrics, "nll": nll}
    return value, metrics

  return loss
