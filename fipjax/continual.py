"""Continual-learning methods as losses and parameter transforms, one training loop, and the CL metrics.

A :class:`Method` is a loss over a batch, a boolean mask of trainable parameters, an optax optimiser, and an
optional parameter transform (LoRA). :func:`fit` runs any of them. A batch is a dict::

    {"new": {...task-B arrays...}, "replay": {"inputs": ..., "labels": ..., "ref_outputs": ...}, "rng": key}

where ``replay`` is present for methods that use an old-task buffer.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding

from fipjax import config as cf
from fipjax import gem as gem_lib
from fipjax import generative, geometry, lora, parallel, paths, precision, sequences, si as si_lib
from fipjax import tree as tu

PyTree = Any
Batch = dict[str, Any]
TaskLoss = Callable[[PyTree, Any, jax.Array | None], jax.Array | tuple[jax.Array, dict]]
"""``task_loss(model_params, task_batch, rng) -> scalar`` or ``(scalar, metrics)``: a task's training loss."""
OldApply = Callable[[PyTree, Any], jax.Array]
"""``f_old(model_params, old_inputs) -> old-task logits [N, K]`` (deterministic)."""
Old = OldApply | Mapping[str, OldApply]
"""One old task (``batch["replay"]`` is its batch) or several by name (``batch["replay"][name]``)."""


def per_old_task(old: Old | Mapping, replay: dict) -> list[tuple[Any, dict]]:
  """[(old task's function, its replay batch)] for one old task or a mapping of several."""
  if not isinstance(old, Mapping):
    return [(old, replay)]
  return [(fn, replay[name]) for name, fn in old.items()]


def _identity(params):
  return params


def _task(task_loss: TaskLoss, params, batch, rng, prefix: str) -> tuple[jax.Array, dict]:
  """Call a task loss; returns (loss, metrics with keys prefixed) whether it returned metrics or not."""
  out = task_loss(params, batch, rng)
  loss, metrics = out if isinstance(out, tuple) else (out, {})
  return loss, {f"{prefix}_loss": loss, **{f"{prefix}_{k}": v for k, v in metrics.items()}}


def new_task_term(task_loss: TaskLoss, params, batch: Batch) -> tuple[jax.Array, dict]:
  """The new task's loss on ``batch["new"]`` (with its dropout key) and its metrics (``new_loss``, ``new_<name>``):
  the term every method's loss starts from."""
  return _task(task_loss, params, batch["new"], batch.get("rng"), "new")


@dataclasses.dataclass(frozen=True)
class Method:
  """One continual-learning method for a new task.

  Attributes:
    name: method name for reports.
    loss: ``loss(model_params, batch) -> (scalar, metrics dict)``.
    replay_loss: optional old-task term of the same signature, differentiated in a second pass after the first
      backward pass has finished, so the replay batch adds time but not peak memory (the two terms' gradients
      are summed).
    optimizer: an optax transformation (extra-args capable) over the trainable parameters.
    trainable: a function ``model_params -> boolean mask`` over the *train* parameters (after ``init``);
      None trains everything.
    init: ``model_params -> train_params`` (identity, or adds LoRA adapters).
    to_model: ``train_params -> model_params`` (identity, or merges LoRA adapters).
    extra_args: ``batch -> dict`` of extra arguments for the optimiser (the geodesic step's reference inputs).
    needs_replay: whether batches must carry old-task replay batches.
    replays: what those batches are: ``"buffer"`` (stored inputs, labels and outputs) or ``"generated"``
      (features drawn from a generator with the old network's outputs on them, brain-inspired replay).
    finish: ``(model weights at the start, trained model weights) -> the weights`` :func:`fit` returns (weight
      interpolation), or None.
    finish_reads: the :class:`MethodConfig` section that ``finish`` alone reads: the fine-tuning before it does not
      depend on it (one fine-tuning serves a sweep of that section).
  """

  name: str
  loss: Callable[[PyTree, Batch], tuple[jax.Array, dict]]
  optimizer: optax.GradientTransformation
  replay_loss: Callable[[PyTree, Batch], tuple[jax.Array, dict]] | None = None
  trainable: Callable[[PyTree], PyTree] | None = None
  init: Callable[[PyTree], PyTree] = _identity
  to_model: Callable[[PyTree], PyTree] = _identity
  extra_args: Callable[[Batch], dict] = lambda batch: {}
  needs_replay: bool = False
  replays: str = "buffer"
  finish: Callable[[PyTree, PyTree], PyTree] | None = None
  finish_reads: str | None = None


# ---------------------------------------------------------------------------------------------------------------
# Methods.


def naive(task_loss: TaskLoss, optimizer: optax.GradientTransformation, **kw) -> Method:
  """Plain fine-tuning on the new task."""

  def loss(params, batch):
    return _task(task_loss, params, batch["new"], batch.get("rng"), "new")

  return Method("naive", loss, optimizer, **kw)


def replay(task_loss: TaskLoss, old_loss: TaskLoss | Mapping[str, TaskLoss],
           optimizer: optax.GradientTransformation, weight: float = 1.0, **kw) -> Method:
  """New-task loss + ``weight`` · old-task cross-entropy on the replay buffer (the fair baseline for FIP);
  with several old tasks, the mean of their terms."""

  def loss(params, batch):
    return _task(task_loss, params, batch["new"], batch.get("rng"), "new")

  def old_term(params, batch):
    terms = [_task(fn, params, b, batch.get("rng"), "replay") for fn, b in per_old_task(old_loss, batch["replay"])]
    old = sum(t for t, _ in terms) / len(terms)
    return weight * old, {**terms[0][1], "replay_loss": old}

  return Method("replay", loss, optimizer, replay_loss=old_term, needs_replay=True, **kw)


def penalised(name: str, task_loss: TaskLoss, penalty: Callable[[PyTree, Any], jax.Array],
              optimizer: optax.GradientTransformation, **kw) -> Method:
  """New-task loss + ``penalty(params, batch["replay"])``, the penalty differentiated in the second pass: FIP's
  form for any model (classifier outputs here, token distributions in :func:`fipjax.sequences.fip_penalty`)."""

  def loss(params, batch):
    return _task(task_loss, params, batch["new"], batch.get("rng"), "new")

  def penalty_term(params, batch):
    pen = penalty(params, batch["replay"])
    return pen, {"fip_penalty": pen}

  return Method(name, loss, optimizer, replay_loss=penalty_term, needs_replay=True, **kw)


def fip(task_loss: TaskLoss, f_old: Old, optimizer: optax.GradientTransformation, *,
        distance: str = "bhattacharyya", beta: float = 1.0, name: str = "fip", **kw) -> Method:
  """FIP, penalty form: new-task loss + β · mean D(f_old(θ, x_buffer), z_ref) with stored reference outputs
  (with several old tasks, the mean of their penalties)."""

  def penalty(params, replay):
    pens = [paths.fip_penalty(fn, distance, beta)(params, b["inputs"], b["ref_outputs"])
            for fn, b in per_old_task(f_old, replay)]
    return sum(pens) / len(pens)

  return penalised(name, task_loss, penalty, optimizer, **kw)


def fip_geodesic(task_loss: TaskLoss, f_old: Old, *, learning_rate: float, damping: float = 1e-3,
                 max_norm: float | None = None, max_quad: float | None = None, cg_iters: int = 10,
                 chunk_size: int | None = None, name: str = "fip-geodesic", **kw) -> Method:
  """FIP, geodesic form: θ ← θ − lr · (G + λI)⁻¹ ∇L_new, G the Fisher–Rao pull-back on the replay inputs."""
  optimizer = optax.chain(
      paths.geodesic_direction(f_old, damping=damping, max_norm=max_norm,
                               max_quad=max_quad, cg_iters=cg_iters, chunk_size=chunk_size),
      optax.scale(-learning_rate))
  return _on_replay_inputs(naive(task_loss, optimizer, **kw), f_old, name)


def fip_preconditioned(task_loss: TaskLoss, f_old: Old, base: optax.GradientTransformation, *, kappa: float,
                       corrector: bool = True, corrector_weight: float = 1.0, cg_iters: int = 5,
                       name: str = "fip-geodesic", **kw) -> Method:
  """FIP, geodesic form on a diagonal optimiser (AdamW): its step solved against ``κ G + its own metric``
  (:func:`fipjax.paths.functional_precondition`): AdamW's step in G's null space, shrunk in G's range, and with
  ``corrector`` pulled back towards the old outputs stored with the replay inputs."""
  optimizer = paths.functional_precondition(base, f_old, kappa=kappa, corrector=corrector,
                                               corrector_weight=corrector_weight, cg_iters=cg_iters)
  return _on_replay_inputs(naive(task_loss, optimizer, **kw), f_old, name, with_outputs=corrector)


def fip_projected(task_loss: TaskLoss, f_old: Old, base: optax.GradientTransformation, *, rank: int,
                  refresh_every: int, krylov_size: int | None = None, name: str = "fip-geodesic", **kw) -> Method:
  """FIP by projection: ``base``'s step (AdamW's) with its part in the old tasks' top-``rank`` functional
  directions removed, those directions G's top eigenvectors on a replay batch, refreshed every ``refresh_every``
  steps (:func:`fipjax.paths.functional_projection`)."""
  optimizer = paths.functional_projection(base, f_old, rank=rank, refresh_every=refresh_every,
                                          krylov_size=krylov_size)
  return _on_replay_inputs(naive(task_loss, optimizer, **kw), f_old, name)


def _on_replay_inputs(method: Method, f_old: Old, name: str, *, with_outputs: bool = False) -> Method:
  """``method`` with replay batches whose inputs reach its optimiser as ``ref_inputs`` (G's reference inputs),
  and with ``with_outputs`` their stored old outputs as ``ref_outputs``."""
  keys = {"ref_inputs": "inputs", **({"ref_outputs": "ref_outputs"} if with_outputs else {})}
  pick = lambda replay, key: (replay[key] if not isinstance(f_old, Mapping)
                              else {name_: replay[name_][key] for name_ in f_old})
  return dataclasses.replace(method, name=name, needs_replay=True,
                             extra_args=lambda batch: {arg: pick(batch["replay"], key) for arg, key in keys.items()})


def ewc(task_loss: TaskLoss, optimizer: optax.GradientTransformation, anchor: PyTree, fisher: PyTree, *,
        strength: float, **kw) -> Method:
  """Elastic weight consolidation: new-task loss + (strength/2) Σ_i F_i (θ_i − θ*_i)²."""

  def loss(params, batch):
    new, metrics = _task(task_loss, params, batch["new"], batch.get("rng"), "new")
    quad = jax.tree.map(lambda p, a, f: jnp.sum(f * (p - a) ** 2), params, anchor, fisher)
    pen = 0.5 * strength * sum(jax.tree.leaves(quad))
    return new + pen, {**metrics, "ewc_penalty": pen}

  return Method("ewc", loss, optimizer, **kw)


def si(task_loss: TaskLoss, optimizer: optax.GradientTransformation, anchor: PyTree, importance: PyTree, *,
       strength: float, mask: PyTree | None = None, **kw) -> Method:
  """Synaptic Intelligence: new-task loss + c · Σ_i Ω_i (θ_i − θ*_i)², with Ω the old tasks' summed importances
  (:mod:`fipjax.si`) over the model's parameters (``mask``: the trained ones). The penalty's gradient is added
  inside the optimiser, so the path integral this stage records for later tasks uses the new task's own
  gradient; ``loss`` reports the task loss, and ``si_penalty`` the penalty."""
  pick = (lambda t: t) if mask is None else (lambda t: tu.select(t, mask))
  optimizer = si_lib.path_integral(optax.chain(
      si_lib.add_penalty_gradient(pick(importance), pick(anchor), strength=strength), optimizer))

  def loss(params, batch):
    new, metrics = _task(task_loss, params, batch["new"], batch.get("rng"), "new")
    pen = jax.lax.stop_gradient(si_lib.penalty(params, importance, anchor, strength=strength))
    return new, {**metrics, "si_penalty": pen}

  return Method("si", loss, optimizer, **kw)


def _projected(name: str, projection: optax.GradientTransformationExtraArgs, task_loss: TaskLoss,
               optimizer: optax.GradientTransformation, space: str, **kw) -> Method:
  if space not in ("gradient", "step"):
    raise ValueError(f"{name}: space must be 'gradient' or 'step', got {space!r}")
  chain = (optax.chain(projection, optimizer) if space == "gradient" else
           optax.chain(optimizer, gem_lib.on_steps(projection)))
  method = naive(task_loss, chain, **kw)
  return dataclasses.replace(method, name=name, needs_replay=True,
                             extra_args=lambda batch: {"replay": batch["replay"], "rng": batch.get("rng")})


def gem(task_loss: TaskLoss, old_loss: Mapping[str, TaskLoss], optimizer: optax.GradientTransformation, *,
        margin: float = 0.0, space: str = "gradient", **kw) -> Method:
  """Gradient Episodic Memory (:func:`fipjax.gem.gem`): the new-task gradient (``space="gradient"``, then the
  optimiser: the paper's, exact with SGD) or the optimiser's step (``"step"``; the margin then relative to the
  step's length) projected so that no old task's loss on its replay batch rises to first order."""
  return _projected("gem", gem_lib.gem(old_loss, margin=margin, relative=space == "step"), task_loss, optimizer,
                    space, **kw)


def agem(task_loss: TaskLoss, old_loss: Mapping[str, TaskLoss], optimizer: optax.GradientTransformation, *,
         space: str = "gradient", **kw) -> Method:
  """A-GEM: the gradient or the optimiser's step (as :func:`gem`) projected against the mean memory gradient of
  the old tasks' replay batches."""
  return _projected("agem", gem_lib.agem(old_loss), task_loss, optimizer, space, **kw)


def generative_replay(task_loss: TaskLoss, readouts: Mapping[str, Callable[[PyTree, jax.Array], jax.Array]],
                      optimizer: optax.GradientTransformation, *, temperature: float = 2.0,
                      new_weight: float = 0.5, **kw) -> Method:
  """Brain-inspired replay's loss: ``new_weight`` · new-task loss + (1 − new_weight) · the mean over old tasks of
  ``T² · KL(softmax(z_ref/T) ‖ softmax(readout(θ, h)/T))`` on generated features ``h`` (batch["replay"][name] =
  {"features", "ref_outputs"}), the old network's outputs on them as soft targets."""

  def loss(params, batch):
    new, metrics = _task(task_loss, params, batch["new"], batch.get("rng"), "new")
    return new_weight * new, metrics

  def distill(params, batch):
    terms = []
    for name, readout in readouts.items():
      b = batch["replay"][name]
      logp = jax.nn.log_softmax(readout(params, b["features"]) / temperature)
      ref = jax.nn.log_softmax(b["ref_outputs"] / temperature)
      terms.append(temperature**2 * jnp.mean(jnp.sum(jnp.exp(ref) * (ref - logp), -1)))
    term = sum(terms) / len(terms)
    return (1.0 - new_weight) * term, {"replay_distill": term}

  return Method("bir", loss, optimizer, replay_loss=distill, needs_replay=True, replays="generated", **kw)


def diagonal_fisher(f_old: OldApply, params: PyTree, inputs: PyTree, labels: jax.Array | None = None, *,
                    batch_size: int = 8) -> PyTree:
  """Diagonal Fisher from per-example gradients: ``F_i = E_x E_{y∼p(y|x)} (∂ log p(y|x)/∂θ_i)²``.

  With ``labels`` it is the empirical Fisher (y the true label); without, the true Fisher with the expectation
  over y taken exactly (``Σ_y p(y|x) g_y²``). Never the square of a mini-batch-mean gradient.
  """
  n = geometry.num_rows(inputs)

  def per_example(x, y):
    x1 = jax.tree.map(lambda a: a[None], x)
    logp = lambda p: jax.nn.log_softmax(f_old(p, x1)[0])
    if y is not None:
      return jax.tree.map(jnp.square, jax.grad(lambda p: logp(p)[y])(params))
    probs = jax.lax.stop_gradient(jnp.exp(logp(params)))
    jac = jax.jacrev(logp)(params)                         # leaves [K, ...]
    return jax.tree.map(lambda j: jnp.tensordot(probs, j**2, axes=1), jac)

  @jax.jit
  def chunk_sum(xs, ys):
    per = jax.vmap(per_example)(xs, ys) if ys is not None else jax.vmap(lambda x: per_example(x, None))(xs)
    return jax.tree.map(lambda a: a.sum(0), per)

  total = tu.tree_zeros_like(params)
  for i in range(0, n, batch_size):
    xs = jax.tree.map(lambda a: a[i:i + batch_size], inputs)
    ys = None if labels is None else labels[i:i + batch_size]
    total = tu.tree_add(total, chunk_sum(xs, ys))
  return tu.tree_scale(1.0 / n, total)


def with_lora(method: Method, config: lora.LoraConfig, key: jax.Array, train: str | tuple[str, ...] = ()) -> Method:
  """``method`` trained in LoRA's subspace: adapters on ``config.targets`` plus the base leaves matching the
  ``train`` regexes (a new head); every other weight frozen. G, penalties and losses see the merged model."""
  return dataclasses.replace(method, init=lambda p: lora.train_params(p, key, config),
                             to_model=lambda tp: lora.to_model(tp, config),
                             trainable=lambda tp: lora.train_mask(tp, train))


# ---------------------------------------------------------------------------------------------------------------
# One registry: every method built from one configuration.


SCHEDULES = ("constant", "linear", "cosine")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW and the batch every stage trains with."""
  lr: float = cf.option(2e-5, "AdamW learning rate of every full-model method", cf.positive)
  weight_decay: float = cf.option(0.01, "AdamW weight decay", cf.non_negative)
  batch_size: int = cf.option(8, "training batch size (new-task rows per step)", cf.positive)
  dropout: bool = cf.option(True, "train with the model's dropout")
  schedule: str = cf.option("constant", "learning-rate schedule over each stage's steps after the warm-up "
                            "(TRL's lr_scheduler_type)", cf.one_of(*SCHEDULES))
  warmup_ratio: float = cf.option(0.0, "share of each stage's steps over which the learning rate rises linearly "
                                  "from 0", cf.interval(0, 1))
  max_grad_norm: float | None = cf.option(None, "clip the gradient to this global norm (none: no clipping)",
                                          cf.positive)
  gradient_accumulation_steps: int = cf.option(1, "batches whose gradients are averaged into one optimiser step "
                                               "(a stage's steps count batches; TRL's name)", cf.positive)


def learning_rate(optim: OptimConfig, steps: int | None = None) -> float | optax.Schedule:
  """``optim``'s learning rate over ``steps`` optimiser steps: constant, or its warm-up then its schedule."""
  if optim.schedule == "constant" and optim.warmup_ratio == 0:
    return optim.lr
  if steps is None:
    raise ValueError(f"a {optim.schedule} schedule with warm-up ratio {optim.warmup_ratio} needs the stage's steps")
  warmup = math.ceil(optim.warmup_ratio * steps)
  rest = max(steps - warmup, 1)
  decay = {"constant": optax.constant_schedule(optim.lr), "linear": optax.linear_schedule(optim.lr, 0.0, rest),
           "cosine": optax.cosine_decay_schedule(optim.lr, rest)}[optim.schedule]
  return decay if warmup == 0 else optax.join_schedules([optax.linear_schedule(0.0, optim.lr, warmup), decay],
                                                        [warmup])


def adamw(optim: OptimConfig, steps: int | None = None) -> optax.GradientTransformation:
  """The one optimiser builder: AdamW at ``optim``'s learning rate (its schedule over ``steps`` batches) and weight
  decay, after clipping the gradient's norm, averaging ``optim.gradient_accumulation_steps`` batches' gradients a
  step."""
  k = optim.gradient_accumulation_steps
  opt = optax.adamw(learning_rate(optim, None if steps is None else max(steps // k, 1)),
                    weight_decay=optim.weight_decay)
  if optim.max_grad_norm is not None:
    opt = optax.chain(optax.clip_by_global_norm(optim.max_grad_norm), opt)
  if k == 1:
    return opt
  accumulate = optax.MultiSteps(opt, every_k_schedule=k)
  return optax.GradientTransformationExtraArgs(accumulate.init, accumulate.update)   # extra args reach ``opt``


@dataclasses.dataclass(frozen=True)
class FipConfig:
  """FIP, penalty form (fip, lora-fip, fip-dpo): β · mean distance of the old outputs to their stored references."""
  beta: float = cf.option(8.0, "penalty weight β on the mean distance (the authors' sum over 8 ≈ 8)", cf.non_negative)
  distance: str = cf.option("bhattacharyya", "output distance D",
                            cf.one_of("bhattacharyya", "kl", "squared_euclidean"))


@dataclasses.dataclass(frozen=True)
class GeodesicConfig:
  """FIP, geodesic forms (fip-geodesic): steps that keep the old outputs' change dθᵀ G dθ small."""
  form: str = cf.option(
      "adam", "'adam' (the default, chosen on the cpu preset's validation split) solves (κG + D) dθ = D u with u "
      "AdamW's step (the methods' learning rate) and D = √v̂ + ε its diagonal metric: AdamW in G's null space, "
      "shrunk in its range; 'gradient' solves (G + λI) dθ = −∇L and scales by --geodesic.lr (it needs more CG "
      "iterations: 3 on the cpu preset, 10 on split digits); 'projection' removes from AdamW's step its part in G's "
      "top --geodesic.rank eigenvectors (Lanczos on a replay batch, refreshed every --geodesic.refresh-every steps)",
      cf.one_of("gradient", "adam", "projection"))
  kappa: float = cf.option(2e-4, "adam form: weight κ of the functional metric G (chosen on the cpu preset's "
                           "validation split)", cf.non_negative)
  corrector: bool = cf.option(True, "adam form: also pull the old outputs back towards their stored references in "
                              "the same solve (Gauss–Newton corrector)")
  corrector_weight: float = cf.option(1.0, "adam form: weight γ of the corrector's pull back (1: the Gauss–Newton "
                                      "model's own)", cf.non_negative)
  rank: int = cf.option(8, "projection form: eigenvectors of G projected out", cf.positive)
  refresh_every: int = cf.option(10, "projection form: steps between Lanczos refreshes", cf.positive)
  lr: float = cf.option(2e-5, "gradient form: step size on the CG direction", cf.positive)
  damping: float = cf.option(1e-2, "damping λ in (G + λI)", cf.positive)
  cg_iters: int = cf.option(1, "CG iterations per step", cf.positive)
  max_norm: float | None = cf.option(None, "gradient form: bound on the direction's norm (none: no bound)",
                                     cf.positive)


@dataclasses.dataclass(frozen=True)
class LoraOptim:
  """AdamW's values in LoRA's coordinates."""
  lr: float = cf.option(5e-4, "AdamW learning rate of the LoRA methods (instead of --optim.lr)", cf.positive)


@dataclasses.dataclass(frozen=True)
class LoraFip:
  """FIP's values in LoRA's coordinates (none: the full model's)."""
  beta: float | None = cf.option(None, "lora-fip: penalty weight (none: --fip.beta)", cf.non_negative)


@dataclasses.dataclass(frozen=True)
class LoraGeodesic:
  """The geodesic form's values in LoRA's coordinates (none: the full model's)."""
  kappa: float | None = cf.option(5e-3, "adam form: κ in adapter coordinates (none: --geodesic.kappa)",
                                  cf.non_negative)
  lr: float | None = cf.option(1.0, "gradient form: step size on the CG direction (none: --geodesic.lr)",
                               cf.positive)
  max_norm: float | None = cf.option(0.03, "gradient form: bound on the direction's norm (none: "
                                     "--geodesic.max-norm)", cf.positive)


@dataclasses.dataclass(frozen=True)
class LoraSettings:
  """LoRA (lora, lora-<method>): where the adapters go, their rank and scale, and the values the LoRA methods use
  instead of the full model's (``--lora.<section>.<name>`` overrides ``--<section>.<name>``)."""
  targets: str = cf.option(r"(^|/)(query|value)/kernel$", "regex of the kernels LoRA adapts")
  rank: int = cf.option(8, "LoRA rank r", cf.positive)
  alpha: float = cf.option(16.0, "LoRA α (scale α/r)", cf.positive)
  optim: LoraOptim = cf.section(LoraOptim)
  fip: LoraFip = cf.section(LoraFip)
  geodesic: LoraGeodesic = cf.section(LoraGeodesic)


@dataclasses.dataclass(frozen=True)
class EwcConfig:
  """Elastic weight consolidation (ewc): (λ/2) Σ F (θ − θ*)² with the old tasks' diagonal Fisher."""
  strength: float = cf.option(1e6, "penalty strength λ", cf.non_negative)
  samples: int = cf.option(2000, "buffer rows per old task in the per-example Fisher", cf.positive)


@dataclasses.dataclass(frozen=True)
class SiConfig:
  """Synaptic intelligence (si): c · Σ Ω (θ − θ*)² with the path integral's importances."""
  strength: float = cf.option(1.0, "penalty strength c", cf.non_negative)
  xi: float = cf.option(0.1, "damping ξ in Ω = ω / (Δ² + ξ) (the paper's 0.1)", cf.positive)


@dataclasses.dataclass(frozen=True)
class GemConfig:
  """Gradient episodic memory (gem, agem): steps that raise no old task's replay loss to first order."""
  margin: float = cf.option(0.5, "gem: memory strength γ, the dual variables' lower bound (the paper's 0.5)",
                            cf.non_negative)
  space: str = cf.option("gradient", "project the gradient before AdamW (the papers' order) or AdamW's step (the "
                         "step applied keeps the constraints)", cf.one_of("gradient", "step"))


@dataclasses.dataclass(frozen=True)
class InterpConfig:
  """Weight interpolation (interp; WiSE-FT, model averaging): plain fine-tuning, then θ_prev + α (θ_tuned − θ_prev)."""
  alpha: float = cf.option(0.5, "α: 0 keeps the weights entering the stage, 1 is plain fine-tuning's",
                           cf.interval(0, 1, closed=True))


def interpolate(hp: "MethodConfig", start: PyTree, end: PyTree) -> PyTree:
  """``start + α (end − start)`` leaf by leaf, α = ``hp.interp.alpha``; exactly ``start`` at α = 0 and ``end`` at
  α = 1."""
  alpha = hp.interp.alpha
  if alpha in (0.0, 1.0):
    return start if alpha == 0.0 else end
  return jax.tree.map(lambda a, b: (a + alpha * (b - a)).astype(b.dtype), start, end)


@dataclasses.dataclass(frozen=True)
class BirConfig:
  """Brain-inspired replay (bir): generated features of the old tasks distilled from the old network."""
  temperature: float = cf.option(2.0, "distillation temperature T (the paper's 2)", cf.positive)
  freeze_below: bool = cf.option(True, "freeze the layers below the replayed representation (as the paper's frozen "
                                 "convolutional layers)")
  generator: generative.GeneratorConfig = cf.section(generative.GeneratorConfig)


@dataclasses.dataclass(frozen=True)
class MethodConfig:
  """Hyperparameters of the methods, a section each (only those of the methods run are read)."""
  fip: FipConfig = cf.section(FipConfig)
  geodesic: GeodesicConfig = cf.section(GeodesicConfig)
  lora: LoraSettings = cf.section(LoraSettings)
  ewc: EwcConfig = cf.section(EwcConfig)
  si: SiConfig = cf.section(SiConfig)
  gem: GemConfig = cf.section(GemConfig)
  bir: BirConfig = cf.section(BirConfig)
  interp: InterpConfig = cf.section(InterpConfig)


def _overridden(section, overrides):
  """``section`` with the values ``overrides`` sets (its leaves that are not None)."""
  values = {f.name: getattr(overrides, f.name) for f in dataclasses.fields(overrides)}
  return dataclasses.replace(section, **{k: v for k, v in values.items() if v is not None})


def in_lora(hp: MethodConfig, optim: OptimConfig) -> tuple[MethodConfig, OptimConfig]:
  """The values the LoRA methods train with: the ``lora`` section's overrides folded into the sections they
  override (the one place where a LoRA value replaces a full-model one)."""
  o = hp.lora
  return (dataclasses.replace(hp, fip=_overridden(hp.fip, o.fip), geodesic=_overridden(hp.geodesic, o.geodesic)),
          _overridden(optim, o.optim))


@dataclasses.dataclass(frozen=True)
class OldTask:
  """What a method may know of an earlier task."""
  outputs: OldApply                      # the logits FIP keeps (its head): ``(params, inputs) -> [N, K]``
  own_outputs: OldApply                  # logits over the task's own labels (EWC's Fisher)
  loss: TaskLoss                         # its training loss on a replay batch (replay)
  buffer_inputs: Callable[[int], PyTree]  # the first n inputs of its replay buffer
  from_features: Callable[[PyTree, jax.Array], jax.Array] | None = None   # ``outputs`` from split-point features
  memory: Mapping[str, Any] = dataclasses.field(default_factory=dict)    # what its stage left: SI's ω and Δ
  # FIP's distance to the stored reference on a replay batch, ``(params, batch, distance name) -> scalar``, where
  # it is not a distance between ``outputs`` and stored logits (a sequence model's compressed token distributions).
  reference_distance: Callable[[PyTree, Any, str], jax.Array] | None = None

  def distance(self, params, batch, distance: str) -> jax.Array:
    """Mean distance ``D`` of this task's outputs under ``params`` to the stored references of a replay batch."""
    if self.reference_distance is not None:
      return self.reference_distance(params, batch, distance)
    return paths.fip_penalty(self.outputs, distance)(params, batch["inputs"], batch["ref_outputs"])


@dataclasses.dataclass(frozen=True)
class StageContext:
  """What the registry builds a method for: the new task, the earlier ones, and where the stage starts."""
  task_loss: TaskLoss
  old: Mapping[str, OldTask]
  params: PyTree                          # the model at the stage's start (EWC's anchor)
  trainable: Callable[[PyTree], PyTree] | None   # full-model trainable mask (None: everything)
  head: str | tuple[str, ...]             # regex(es) of the new task's head parameters (LoRA trains them too)
  seed: int
  below: str | None = None                # regex of the parameters below the model's split point (none: no split)

  def old_outputs(self) -> dict[str, OldApply]:
    return {n: t.outputs for n, t in self.old.items()}

  def old_losses(self) -> dict[str, TaskLoss]:
    return {n: t.loss for n, t in self.old.items()}


def _build_ewc(ctx: StageContext, hp: MethodConfig, optimizer) -> Method:
  fisher = None
  for t in ctx.old.values():
    # The sum of the old tasks' true diagonal Fishers, taken at the stage's start, anchors the penalty there.
    f = diagonal_fisher(t.own_outputs, ctx.params, t.buffer_inputs(hp.ewc.samples), batch_size=4)
    fisher = f if fisher is None else tu.tree_add(fisher, f)
  return ewc(ctx.task_loss, optimizer, ctx.params, fisher, strength=hp.ewc.strength)


def _build_fip(ctx: StageContext, hp: MethodConfig, optimizer) -> Method:
  """β · the mean over old tasks of each one's distance to its stored references (``OldTask.distance``)."""
  olds, beta, distance = ctx.old, hp.fip.beta, hp.fip.distance

  def penalty(params, replay):
    return beta * (sum(t.distance(params, replay[n], distance) for n, t in olds.items()) / len(olds))

  return penalised("fip", ctx.task_loss, penalty, optimizer)


def _build_geodesic(ctx: StageContext, hp: MethodConfig, optimizer) -> Method:
  g = hp.geodesic
  if g.form == "adam":
    return fip_preconditioned(ctx.task_loss, ctx.old_outputs(), optimizer, kappa=g.kappa, corrector=g.corrector,
                              corrector_weight=g.corrector_weight, cg_iters=g.cg_iters)
  if g.form == "projection":
    return fip_projected(ctx.task_loss, ctx.old_outputs(), optimizer, rank=g.rank, refresh_every=g.refresh_every)
  return fip_geodesic(ctx.task_loss, ctx.old_outputs(), learning_rate=g.lr, max_norm=g.max_norm, damping=g.damping,
                      cg_iters=g.cg_iters)


def _build_si(ctx: StageContext, hp: MethodConfig, optimizer) -> Method:
  missing = [n for n, t in ctx.old.items() if "si_omega" not in t.memory]
  if missing:
    raise ValueError(f"si needs the path integral recorded while each old task trained; {', '.join(missing)} "
                     "has none (it was learnt by another method).")
  imp = [si_lib.importance(t.memory["si_omega"], t.memory["si_change"], xi=hp.si.xi) for t in ctx.old.values()]
  total = jax.tree.map(lambda *xs: sum(xs), *imp)
  return si(ctx.task_loss, optimizer, ctx.params, total, strength=hp.si.strength,
            mask=None if ctx.trainable is None else ctx.trainable(ctx.params))


def si_memory(omega: PyTree, start: PyTree, end: PyTree) -> dict:
  """What a stage leaves for SI: the path integral ω (over the model's parameters) and the weights' change Δ."""
  return {"si_omega": omega, "si_change": tu.tree_sub(end, start)}


def _si_keeps(opt_state: PyTree, start: PyTree, end: PyTree) -> dict:
  """:func:`si_memory` of a stage trained with SI's path integral recorder (its ω in the optimiser's state)."""
  return si_memory(tu.unmask(si_lib.recorded(opt_state), end), start, end)


def _build_bir(ctx: StageContext, hp: MethodConfig, optimizer) -> Method:
  if ctx.below is None or any(t.from_features is None for t in ctx.old.values()):
    raise ValueError("bir replays a hidden representation: the stream needs a split of its model into features "
                     "and a readout (Stream.split).")
  method = generative_replay(ctx.task_loss, {n: t.from_features for n, t in ctx.old.items()}, optimizer,
                             temperature=hp.bir.temperature, new_weight=1.0 / (len(ctx.old) + 1))
  if hp.bir.freeze_below:
    below = ctx.below
    method = dataclasses.replace(method, trainable=lambda p: jax.tree.map(lambda m: not m, tu.regex_mask(p, below)))
  return method


REPLAYS = ("none", "inputs", "outputs", "rows", "generated")
"""What a method's batches replay of the old tasks: nothing; the buffer's inputs (G's reference inputs); its inputs
with the outputs of the network entering the stage stored on them (FIP's references); its labelled rows; or
features drawn from a generator fit when each old task ended."""

OUTPUT_KINDS = ("logits", "tokens")
"""What the old outputs are: a classifier's logits, or a causal LM's token distributions (stored as top-k)."""


def _no_problems(hp: MethodConfig, outputs: str) -> list[str]:
  return []


def _check_fip(hp: MethodConfig, outputs: str) -> list[str]:
  if outputs == "tokens" and hp.fip.distance not in sequences.DISTANCES:
    return [f"--fip.distance {hp.fip.distance} has no compressed form for token distributions; choose one of "
            f"{', '.join(sequences.DISTANCES)}"]
  return []


def _check_geodesic(hp: MethodConfig, outputs: str) -> list[str]:
  if outputs == "tokens" and hp.geodesic.form == "adam" and hp.geodesic.corrector:
    return ["--geodesic.form adam with its corrector pulls old outputs back to stored logits, and token "
            "distributions are stored as top-k references, not logits; add --geodesic.corrector false, or use "
            "--geodesic.form gradient"]
  return []


class FrontKnob(NamedTuple):
  """The knob a quick retention-versus-learning front sweeps for a method (``--frontier``): a dotted flag of the
  experiment's configuration, and the values to try from its configured value (``value -> values``; None: one
  point at the configured value)."""
  flag: str
  values: Callable[[Any], list]


def _scaled(*factors: float) -> Callable[[Any], list]:
  return lambda v: [type(v)(v * f) for f in factors]


_STEPS = FrontKnob("stages.steps", lambda v: sorted({max(1, v // 4), max(1, v // 2), v}))
_BUFFER = FrontKnob("stages.buffer_size", lambda v: sorted({max(1, v // 4), v}))
_LORA_RANK = FrontKnob("lora.rank", lambda v: sorted({max(1, v // 2), v, 2 * v}))


@dataclasses.dataclass(frozen=True)
class MethodSpec:
  """A registry entry: how the method is built and what it needs from, and leaves to, the stages around it.

  Attributes:
    build: ``(stage context, hyperparameters, AdamW) -> Method``.
    replay: what its batches replay (:data:`REPLAYS`), or ``hyperparameters -> that``.
    lora: whether it has a LoRA form (SI's importances and BI-R's frozen layers are over the model's own weights).
    first_stage_program: on the full model its step is the first stage's (plain fine-tuning): where the heads
      agree it may record what the first stage records, so that its program is compiled once for both.
    keeps: ``(final optimiser state, weights at the stage's start, at its end) -> arrays`` that a finished stage
      leaves for the method's later stages (SI's ω, recorded by its optimiser, and Δ), or None.
    check: ``(hyperparameters, output kind) -> problems``: values it cannot run with on those old outputs
      (:data:`OUTPUT_KINDS`), one sentence each.
    front: the knob its quick front sweeps (:class:`FrontKnob`), or None (one point).
    lora_front: the knob its LoRA form's quick front sweeps instead of ``front`` (None: ``front``).
    baseline: what a practitioner tries first: a front's default comparison (:func:`baselines`).
  """
  build: Callable[[StageContext, MethodConfig, optax.GradientTransformation], Method]
  replay: str | Callable[[MethodConfig], str] = "none"
  lora: bool = True
  first_stage_program: bool = False
  keeps: Callable[[PyTree, PyTree, PyTree], dict] | None = None
  check: Callable[[MethodConfig, str], list[str]] = _no_problems
  front: FrontKnob | None = None
  lora_front: FrontKnob | None = None
  baseline: bool = False

  def replays(self, hp: MethodConfig) -> str:
    return self.replay(hp) if callable(self.replay) else self.replay

  def front_knob(self, in_lora: bool) -> FrontKnob | None:
    """The knob a quick front sweeps for this method, on the full model or in LoRA."""
    return self.lora_front if in_lora and self.lora_front is not None else self.front


def _geodesic_replay(hp: MethodConfig) -> str:
  return "outputs" if hp.geodesic.form == "adam" and hp.geodesic.corrector else "inputs"


REGISTRY: dict[str, MethodSpec] = {
    "naive": MethodSpec(lambda ctx, hp, opt: naive(ctx.task_loss, opt), first_stage_program=True, front=_STEPS,
                        lora_front=_LORA_RANK, baseline=True),      # plain LoRA: its rank
    "fip": MethodSpec(_build_fip, replay="outputs", check=_check_fip, front=FrontKnob("fip.beta", _scaled(.25, 1, 4))),
    "fip-geodesic": MethodSpec(_build_geodesic, replay=_geodesic_replay, check=_check_geodesic,
                               front=FrontKnob("geodesic.kappa", _scaled(.25, 1, 4))),
    "ewc": MethodSpec(_build_ewc, front=FrontKnob("ewc.strength", _scaled(.1, 1, 10))),
    "replay": MethodSpec(lambda ctx, hp, opt: replay(ctx.task_loss, ctx.old_losses(), opt), replay="rows",
                         front=_BUFFER),
    "si": MethodSpec(_build_si, lora=False, keeps=_si_keeps, front=FrontKnob("si.strength", _scaled(.1, 1, 10))),
    "gem": MethodSpec(lambda ctx, hp, opt: gem(ctx.task_loss, ctx.old_losses(), opt, margin=hp.gem.margin,
                                               space=hp.gem.space), replay="rows", front=_BUFFER),
    "agem": MethodSpec(lambda ctx, hp, opt: agem(ctx.task_loss, ctx.old_losses(), opt, space=hp.gem.space),
                       replay="rows", front=_BUFFER),
    "bir": MethodSpec(_build_bir, replay="generated", lora=False),
    "interp": MethodSpec(lambda ctx, hp, opt: dataclasses.replace(
        naive(ctx.task_loss, opt), finish=lambda start, end: interpolate(hp, start, end), finish_reads="interp"),
        first_stage_program=True, front=FrontKnob("interp.alpha", lambda v: [0.25, 0.5, 0.75]), baseline=True),
}
"""``name -> MethodSpec``: adding a method is one entry (docs/extending.md)."""


PLAIN, LORA, PREFERENCE = "naive", "lora", "dpo"
"""How names compose: the registry's plain fine-tuning (``naive``) is named ``lora`` alone in LoRA and ``dpo`` alone on
a preference loss; any other method ``m`` is ``lora-m``, ``m-dpo``, ``lora-m-dpo``."""


class Name(NamedTuple):
  """A method's name composed: a registered ``method``, ``in_lora`` (prefix ``lora-``) and ``on_preferences``
  (suffix ``-dpo``): ``lora-fip-dpo`` is (fip, True, True); ``lora`` is (naive, True, False)."""
  method: str
  in_lora: bool = False
  on_preferences: bool = False

  @property
  def spec(self) -> MethodSpec:
    return REGISTRY[self.method]

  def __str__(self) -> str:
    parts = [LORA] * self.in_lora + [self.method] * (self.method != PLAIN) + [PREFERENCE] * self.on_preferences
    return "-".join(parts) or PLAIN


def baselines(*, on_preferences: bool = False) -> list[str]:
  """The registry's baselines (:attr:`MethodSpec.baseline`) by name: ``naive, interp`` or ``dpo, interp-dpo``."""
  return [str(Name(m, False, on_preferences)) for m, spec in REGISTRY.items() if spec.baseline]


def method_names(lora_variants: tuple[str, ...] = ("naive", "fip", "fip-geodesic"), *,
                 on_preferences: bool = False) -> tuple[str, ...]:
  """Every registered name, then each of ``lora_variants`` in LoRA, on preference losses if ``on_preferences``:
  ``naive, fip, …, lora, lora-fip, …`` or ``dpo, fip-dpo, …, lora-dpo, lora-fip-dpo, …``."""
  names = [Name(m, False, on_preferences) for m in REGISTRY]
  names += [Name(v, True, on_preferences) for v in lora_variants]
  return tuple(map(str, names))


def parse_name(name: str, *, on_preferences: bool = False) -> Name:
  """The composition of ``name`` (see :class:`Name`); ``on_preferences``: names must end in ``-dpo`` (or be
  ``dpo``). Raises ValueError naming the valid names."""
  parts = name.split("-")
  if on_preferences:
    if parts[-1] != PREFERENCE:
      raise ValueError(f"preference methods are named <method>-dpo (dpo, lora-dpo, replay-dpo, fip-dpo, …), got "
                       f"{name!r}")
    parts = parts[:-1]
  lora_ = parts[:1] == [LORA]
  base = "-".join(parts[lora_:]) or PLAIN
  if base not in REGISTRY or str(Name(base, lora_, on_preferences)) != name:
    raise ValueError(f"unknown method {name!r}; choose one of "
                     f"{', '.join(method_names(on_preferences=on_preferences))} (or lora-<method>)")
  if lora_ and not REGISTRY[base].lora:
    raise ValueError(f"{name!r}: {base} acts on the model's own parameters and has no LoRA form "
                     f"(run {base} instead)")
  return Name(base, lora_, on_preferences)


def method_argument(value: str, *, on_preferences: bool = False) -> str:
  """An argparse ``type`` for ``--method``: ``all``, or names :func:`parse_name` accepts, comma-separated."""
  if value != "all":
    try:
      for name in value.split(","):
        parse_name(name, on_preferences=on_preferences)
    except ValueError as e:
      raise cf.argparse.ArgumentTypeError(str(e)) from None
  return value


def method_list(value: str, every: tuple[str, ...]) -> list[str]:
  """The methods a ``--method`` value names: ``every`` for ``all``, else its comma-separated names, once each."""
  return list(every) if value == "all" else list(dict.fromkeys(value.split(",")))


def check_methods(names: Iterable[str], hp: MethodConfig, outputs: str, *, on_preferences: bool = False) -> list[str]:
  """Every problem of the methods ``names`` with the hyperparameters ``hp`` on old outputs of kind ``outputs``,
  naming the methods concerned."""
  by_problem: dict[str, list[str]] = {}
  for name in names:
    n = parse_name(name, on_preferences=on_preferences)
    for problem in n.spec.check(in_lora(hp, OptimConfig())[0] if n.in_lora else hp, outputs):
      by_problem.setdefault(problem, []).append(name)
  return [f"{p} ({', '.join(ns)})" for p, ns in by_problem.items()]


def build(name: str | Name, ctx: StageContext, hp: MethodConfig, optim: OptimConfig,
          steps: int | None = None) -> Method:
  """The method ``name`` (see :func:`parse_name`) for a stage of ``steps`` batches ``ctx``, configured by ``hp``
  and ``optim`` (with the ``lora`` section's overrides in LoRA, :func:`in_lora`)."""
  n = name if isinstance(name, Name) else parse_name(name)
  if n.in_lora:
    hp, optim = in_lora(hp, optim)
  method = n.spec.build(ctx, hp, adamw(optim, steps))
  own, stage = method.trainable, ctx.trainable
  trainable = (stage if own is None else own if stage is None else
               lambda p: jax.tree.map(lambda a, b: a and b, stage(p), own(p)))
  method = dataclasses.replace(method, name=str(n), trainable=trainable)
  if n.in_lora:
    try:
      tu.regex_mask(ctx.params, hp.lora.targets)
    except ValueError as e:
      raise ValueError(f"--lora.targets: {e}") from None
    method = with_lora(method, lora.LoraConfig(targets=(hp.lora.targets,), rank=hp.lora.rank, alpha=hp.lora.alpha),
                       jax.random.PRNGKey(ctx.seed + 1), ctx.head)
  return method


# ---------------------------------------------------------------------------------------------------------------
# The one training loop.


@dataclasses.dataclass
class TrainState:
  step: int
  train_params: PyTree      # after method.init (full model params, or base + adapters)
  opt_state: PyTree


class HostState:
  """The state after a step as host (numpy) copies, made on first access (or before the next step, if the callback
  kept it): valid after later steps have reused the device buffers, and free when a callback does not look."""

  def __init__(self, step: int, train_params: Callable[[], PyTree], opt_state: PyTree):
    self.step, self._params, self._opt = step, train_params, opt_state

  @functools.cached_property
  def train_params(self) -> PyTree:
    return jax.device_get(self._params())

  @functools.cached_property
  def opt_state(self) -> PyTree:
    return jax.device_get(self._opt)

  def materialize(self) -> "HostState":
    self.train_params, self.opt_state
    return self


class NonFiniteLoss(FloatingPointError):
  """A training loss that is NaN or infinite: the run stops rather than report it."""

  def __init__(self, step: int, loss: float):
    super().__init__(f"loss {loss} at step {step}")
    self.step, self.loss = step, loss


def make_train_step(method: Method, mask: PyTree | None, *, donate: bool = True):
  """The jitted ``(trainable, frozen, opt_state, batch) -> (trainable, opt_state, loss, metrics)``.

  With ``donate`` the trainable parameters' and optimiser state's buffers are reused for the outputs.
  """
  method = _float32_steps(method)

  def step(trainable, frozen, opt_state, batch):
    model_fn = lambda t: method.to_model(t if mask is None else tu.merge(t, mask, frozen))
    value_and_grad = lambda fn, t, b: jax.value_and_grad(lambda u: fn(model_fn(u), b), has_aux=True)(t)
    # Named scopes label each pass in a profile (benchmarks/profile.py).
    with jax.named_scope("new_task"):
      (loss, metrics), grads = value_and_grad(method.loss, trainable, batch)
    if method.replay_loss is not None:
      # The replay pass waits for the first backward pass, so peak memory is the larger pass, not both.
      replay_batch = tu.tree_after(batch, grads)
      with jax.named_scope("replay"):
        (replay_loss, replay_metrics), replay_grads = value_and_grad(method.replay_loss, trainable, replay_batch)
      loss, metrics, grads = loss + replay_loss, {**metrics, **replay_metrics}, tu.tree_add(grads, replay_grads)
    with jax.named_scope("update"):
      updates, opt_state = method.optimizer.update(grads, opt_state, trainable, model_fn=model_fn,
                                                   **method.extra_args(tu.tree_after(batch, grads)))
    metrics = {**metrics, "step_length": tu.tree_norm(updates), **paths.solver_metrics(opt_state)}
    return optax.apply_updates(trainable, updates), opt_state, loss, metrics

  return jax.jit(step, donate_argnums=(0, 2) if donate else ())


def _float32_steps(method: Method) -> Method:
  """``method`` whose optimiser takes extra arguments and keeps float32 master weights of narrow (bfloat16)
  trainable parameters (:func:`fipjax.precision.float32_master`; unchanged for float32 ones)."""
  return dataclasses.replace(method, optimizer=precision.float32_master(method.optimizer))


def init_train_state(method: Method, model_params: PyTree) -> tuple[TrainState, PyTree | None]:
  """(initial state, trainable mask or None) for ``method`` starting from ``model_params``."""
  train_params = method.init(model_params)
  mask = None if method.trainable is None else method.trainable(train_params)
  trainable = train_params if mask is None else tu.select(train_params, mask)
  return TrainState(0, train_params, _float32_steps(method).optimizer.init(trainable)), mask


def num_steps(explicit: int | None, epochs: float, rows: int, batch_size: int) -> int:
  """``explicit`` steps, or ``epochs`` passes over ``rows`` in batches of ``batch_size`` (at least one step)."""
  return int(explicit) if explicit is not None else max(1, int(epochs * rows // batch_size))


def train_step(method: Method, model_params: PyTree, *, donate: bool = True, abstract: bool = False):
  """(jitted step, its arguments but the batch: trainable, frozen, optimiser state) of ``method`` at
  ``model_params``: the step :func:`fit` runs. ``abstract``: the arguments as shapes (``jax.ShapeDtypeStruct``),
  for lowering without allocating a training state."""
  method = _float32_steps(method)
  if abstract:
    def arrays(p):
      state, _ = init_train_state(method, p)
      return state.train_params, state.opt_state
    state = TrainState(0, *jax.eval_shape(arrays, model_params))
    mask = None if method.trainable is None else method.trainable(state.train_params)
  else:
    state, mask = init_train_state(method, model_params)
  trainable = state.train_params if mask is None else tu.select(state.train_params, mask)
  frozen = None if mask is None else tu.select(state.train_params, jax.tree.map(lambda m: not m, mask))
  return make_train_step(method, mask, donate=donate), trainable, frozen, state.opt_state


def peak_bytes(compiled) -> int:
  """Peak device memory of a compiled program from XLA's memory analysis: what one execution allocates (arguments,
  outputs not aliased to them, temporaries), or the backend's peak where that is larger. XLA's CPU peak leaves the
  temporaries out."""
  stats = compiled.memory_analysis()
  if stats is None:
    return 0
  allocated = (stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
               + stats.temp_size_in_bytes)
  return int(max(allocated, getattr(stats, "peak_memory_in_bytes", 0) or 0))


def step_peak_bytes(method: Method, model_params: PyTree, batch: Batch) -> int:
  """Peak memory of one training step of ``method`` on ``batch`` as :func:`fit` runs it (donating the trained
  parameters' and optimiser state's buffers), compiled once more from the arguments' shapes, not run."""
  step, *args = train_step(method, model_params, abstract=True)
  return peak_bytes(step.lower(*args, batch).compile())


def _placed_like(params: PyTree, tree: PyTree) -> PyTree:
  """``tree`` with the leaves not yet placed on the parameters' mesh (an optimiser's fresh step count, new LoRA
  adapters) replicated on it, as the step's outputs are: the first step then has the later steps' signature, so
  the step is compiled once rather than again at the second step."""
  placed = lambda x: isinstance(getattr(x, "sharding", None), NamedSharding)
  mesh = next((x.sharding.mesh for x in jax.tree.leaves(params) if placed(x)), None)
  if mesh is None:
    return tree
  return jax.tree.map(lambda x: x if placed(x) else parallel.replicate(x, mesh), tree)


def fit(method: Method, model_params: PyTree, batches: Iterable[Batch], num_steps: int, *,
        state: TrainState | None = None, callback: Callable[[HostState | None, dict], None] | None = None,
        rng: jax.Array | None = None, sync_every: int = 1,
        keep_state: Callable[[int], bool] | None = None,
        on_compiled: Callable[[Any], None] | None = None) -> tuple[PyTree, TrainState, list[dict]]:
  """Train ``method`` for ``num_steps`` on ``batches`` (an iterator of batch dicts), starting at ``model_params``.

  Frozen parameters never enter the optimiser and stay bitwise unchanged. ``state`` resumes a run (its
  ``step`` counts already consumed batches; the caller positions ``batches`` accordingly).

  The host reads the step metrics every ``sync_every`` steps, at every step where ``keep_state(step)`` (default:
  every step) and at the last; in between, the loop does not wait for the device, so the next batches are
  prepared and sent while a step runs. ``callback(state, metrics)`` then runs on the host for each step read, in
  order (logging, checkpointing, path records); ``state`` is a :class:`HostState`, whose arrays stay valid, at the
  steps where ``keep_state`` holds, and None at the others. A NaN or infinite loss raises :class:`NonFiniteLoss`
  naming its step (found at most ``sync_every`` steps later; never after a state was handed to the callback).
  ``on_compiled(compiled)`` gets the step's compiled program once, after the first step (for its memory analysis:
  :func:`peak_bytes`), from JAX's cache: no second compilation.

  Returns:
    (final model parameters, final train state, per-step metrics as host floats).
  """
  method = _float32_steps(method)
  if state is None:
    existing = {id(x) for x in jax.live_arrays()}
    state, mask = init_train_state(method, model_params)
    # Built by this init, not an array anyone else holds (the parameters, a frozen copy, an array a method's closure
    # keeps): an id met before is copied (a reused id costs a copy, never a wrong donation).
    owned = lambda x: isinstance(x, jax.Array) and id(x) not in existing
  else:
    mask = None if method.trainable is None else method.trainable(state.train_params)
    owned = lambda x: False                      # the caller's state (a state resumes twice)
  keep_state = (lambda step: True) if keep_state is None else keep_state
  train_params = state.train_params
  # The step donates its buffers: the caller's arrays are copied first so that they stay valid; a fresh optimiser
  # state is not (a second AdamW state resident beside the first was 1.1 GiB at 135M parameters).
  seen = set()

  def own(tree):      # an array met twice is copied the second time: a buffer is donated once
    fresh = lambda x: owned(x) and id(x) not in seen and not seen.add(id(x))
    return jax.tree.map(lambda x: x if fresh(x) else jnp.copy(x), tree)

  trainable = own(train_params if mask is None else tu.select(train_params, mask))
  trainable, opt_state = _placed_like(train_params, (trainable, own(state.opt_state)))
  frozen = None if mask is None else tu.select(train_params, jax.tree.map(lambda m: not m, mask))
  full = lambda t: t if mask is None else tu.merge(t, mask, train_params)
  step_fn = make_train_step(method, mask)
  history, pending = [], []
  it: Iterator[Batch] = iter(batches)
  for step in range(state.step, num_steps):
    batch = dict(next(it))
    if rng is not None:
      batch["rng"] = jax.random.fold_in(rng, step)
    trainable, opt_state, loss, metrics = step_fn(trainable, frozen, opt_state, batch)
    if on_compiled is not None and step == state.step:      # the outputs have the arguments' types: a cache hit
      on_compiled(step_fn.lower(trainable, frozen, opt_state, batch).compile())
    done = step + 1
    pending.append((done, loss, metrics))
    kept = keep_state(done)
    if not (kept or done % sync_every == 0 or done == num_steps):
      continue
    for at, loss_at, metrics_at in jax.device_get(pending):
      row = {"step": at, "loss": float(loss_at), **{k: float(v) for k, v in metrics_at.items()}}
      if not math.isfinite(row["loss"]):
        raise NonFiniteLoss(at, row["loss"])
      history.append(row)
      if callback is not None:
        snapshot = HostState(at, functools.partial(full, trainable), opt_state) if at == done and kept else None
        callback(snapshot, row)
        if snapshot is not None and sys.getrefcount(snapshot) > 2:   # kept: copy before the buffers are reused
          snapshot.materialize()
    pending = []
  final = method.to_model(full(trainable))
  final = final if method.finish is None else method.finish(model_params, final)
  return final, TrainState(num_steps, full(trainable), opt_state), history


# ---------------------------------------------------------------------------------------------------------------
# Continual-learning metrics. R[i, j] = test accuracy on task j after training task i.


def average_accuracy(r: np.ndarray) -> float:
  """ACC = (1/T) Σ_j R[T, j]."""
  r = np.asarray(r)
  return float(r[-1].mean())


def backward_transfer(r: np.ndarray) -> float:
  """BWT = (1/(T−1)) Σ_{j<T} (R[T, j] − R[j, j]) (Lopez-Paz & Ranzato, 2017)."""
  r = np.asarray(r)
  t = r.shape[0]
  return float(np.mean([r[-1, j] - r[j, j] for j in range(t - 1)]))


def forgetting(r: np.ndarray) -> float:
  """Average forgetting (Chaudhry et al., 2018): mean over j < T of ``max_{l<T} R[l, j] − R[T, j]``."""
  r = np.asarray(r)
  t = r.shape[0]
  return float(np.mean([r[:-1, j].max() - r[-1, j] for j in range(t - 1)]))


def solver_curves(history: list[dict]) -> dict:
  """``{"solver": {"cg_residual": [...], "cg_iterations": [...]}}`` (CG) or ``{"solver": {"lanczos_residual":
  [...], "projected_share": [...]}}`` (the projection), one entry per step, for methods whose steps run a solver
  (see :func:`fipjax.paths.solver_metrics`); ``{}`` for the others."""
  keys = next((ks for ks in paths.SOLVER_METRICS.values() if history and ks[0] in history[0]), None)
  return {} if keys is None else {"solver": {k: [row[k] for row in history] for k in keys}}


def solver_summary(curves: dict) -> str:
  """One log line from :func:`solver_curves`' output ('' without a solver)."""
  solver = curves.get("solver", {})
  if "cg_residual" in solver:
    res, its = np.asarray(solver["cg_residual"]), np.asarray(solver["cg_iterations"])
    return (f"; CG relative residual median {np.median(res):.2g}, max {res.max():.2g}, "
            f"{its.mean():.1f} iterations per step")
  if "lanczos_residual" in solver:
    res, share = np.asarray(solver["lanczos_residual"]), np.asarray(solver["projected_share"])
    return (f"; Lanczos relative residual median {np.median(res):.2g}, max {res.max():.2g}; "
            f"share of the step projected out median {np.median(share):.2g}")
  return ""


def cl_metrics(r: np.ndarray) -> dict[str, float]:
  return {"average_accuracy": average_accuracy(r), "backward_transfer": backward_transfer(r),
          "forgetting": forgetting(r)}


# ---------------------------------------------------------------------------------------------------------------
# How far the weights moved.


# Each a single program: eager per-leaf reductions of parameters sharded over a mesh dispatch one collective each,
# and XLA's CPU client can deadlock interleaving them (seen with FSDP on 4 host devices).
_relative_norm = jax.jit(lambda final, ref: tu.tree_norm(tu.tree_sub(final, ref)) / tu.tree_norm(ref))
_squared_sums = jax.jit(lambda final, ref: jax.tree.map(
    lambda a, b: (jnp.sum((a - b).astype(jnp.float32) ** 2), jnp.sum(b.astype(jnp.float32) ** 2)), final, ref))


def fractional_weight_change(final: PyTree, reference: PyTree) -> float:
  """``‖θ_final − θ_ref‖_F / ‖θ_ref‖_F`` over every leaf."""
  return float(_relative_norm(final, reference))


def weight_change_by_group(final: PyTree, reference: PyTree, group: Callable[[str], str]) -> dict[str, float]:
  """Fractional weight change per group of leaves, ``group(path) -> name`` (e.g. one group per layer)."""
  sums = jax.device_get(_squared_sums(final, reference))
  num, den = {}, {}
  for (name, _), (d, r) in zip(tu.named_leaves(final), jax.tree.leaves(sums, is_leaf=lambda x: isinstance(x, tuple))):
    g = group(name)
    num[g] = num.get(g, 0.0) + float(d)
    den[g] = den.get(g, 0.0) + float(r)
  return {g: float(np.sqrt(num[g] / den[g])) if den[g] > 0 else float("nan") for g in num}
