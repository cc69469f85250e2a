"""Continual-learning methods as losses and parameter transforms, one training loop, and the CL metrics.

A :class:`Method` is a loss over a batch, a boolean mask of trainable parameters, an optax optimiser, and an
optional parameter transform (LoRA). :func:`fit` runs any of them. A batch is a dict::

    {"new": {...task-B arrays...}, "replay": {"inputs": ..., "labels": ..., "ref_outputs": ...}, "rng": key}

where ``replay`` is present for methods that use an old-task buffer.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fipjax import geometry, paths
from fipjax import tree as tu

PyTree = Any
Batch = dict[str, Any]
TaskLoss = Callable[[PyTree, Any, jax.Array | None], jax.Array | tuple[jax.Array, dict]]
"""``task_loss(model_params, task_batch, rng) -> scalar`` or ``(scalar, metrics)``: a task's training loss."""
OldApply = Callable[[PyTree, Any], jax.Array]
"""``f_old(model_params, old_inputs) -> old-task logits [N, K]`` (deterministic)."""


def _identity(params):
  return params


def _task(task_loss: TaskLoss, params, batch, rng, prefix: str) -> tuple[jax.Array, dict]:
  """Call a task loss; returns (loss, metrics with keys prefixed) whether it returned metrics or not."""
  out = task_loss(params, batch, rng)
  loss, metrics = out if isinstance(out, tuple) else (out, {})
  return loss, {f"{prefix}_loss": loss, **{f"{prefix}_{k}": v for k, v in metrics.items()}}


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
    needs_replay: whether batches must carry an old-task replay buffer.
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


# ---------------------------------------------------------------------------------------------------------------
# Methods.


def naive(task_loss: TaskLoss, optimizer: optax.GradientTransformation, **kw) -> Method:
  """Plain fine-tuning on the new task."""

  def loss(params, batch):
    return _task(task_loss, params, batch["new"], batch.get("rng"), "new")

  return Method("naive", loss, optimizer, **kw)


def replay(task_loss: TaskLoss, old_loss: TaskLoss, optimizer: optax.GradientTransformation,
           weight: float = 1.0, **kw) -> Method:
  """New-task loss + ``weight`` · old-task cross-entropy on the replay buffer (the fair baseline for FIP)."""

  def loss(params, batch):
    return _task(task_loss, params, batch["new"], batch.get("rng"), "new")

  def old_term(params, batch):
    old, metrics = _task(old_loss, params, batch["replay"], batch.get("rng"), "replay")
    return weight * old, metrics

  return Method("replay", loss, optimizer, replay_loss=old_term, needs_replay=True, **kw)


def fip(task_loss: TaskLoss, f_old: OldApply, optimizer: optax.GradientTransformation, *,
        distance: str = "bhattacharyya", beta: float = 1.0, name: str = "fip", **kw) -> Method:
  """FIP, penalty form: new-task loss + β · mean D(f_old(θ, x_buffer), z_ref) with stored reference outputs."""
  penalty = paths.fip_penalty(f_old, distance, beta)

  def loss(params, batch):
    return _task(task_loss, params, batch["new"], batch.get("rng"), "new")

  def penalty_term(params, batch):
    pen = penalty(params, batch["replay"]["inputs"], batch["replay"]["ref_outputs"])
    return pen, {"fip_penalty": pen}

  return Method(name, loss, optimizer, replay_loss=penalty_term, needs_replay=True, **kw)


def fip_geodesic(task_loss: TaskLoss, f_old: OldApply, *, learning_rate: float, damping: float = 1e-3,
                 max_norm: float | None = None, max_quad: float | None = None, cg_iters: int = 10,
                 chunk_size: int | None = None, name: str = "fip-geodesic", **kw) -> Method:
  """FIP, geodesic form: θ ← θ − lr · (G + λI)⁻¹ ∇L_new, G the Fisher–Rao pull-back on the replay inputs."""
  optimizer = optax.chain(
      paths.geodesic_direction(f_old, damping=damping, max_norm=max_norm,
                               max_quad=max_quad, cg_iters=cg_iters, chunk_size=chunk_size),
      optax.scale(-learning_rate))
  method = naive(task_loss, optimizer, **kw)
  return dataclasses.replace(method, name=name, needs_replay=True,
                             extra_args=lambda batch: {"ref_inputs": batch["replay"]["inputs"]})


def ewc(task_loss: TaskLoss, optimizer: optax.GradientTransformation, anchor: PyTree, fisher: PyTree, *,
        strength: float, **kw) -> Method:
  """Elastic weight consolidation: new-task loss + (strength/2) Σ_i F_i (θ_i − θ*_i)²."""

  def loss(params, batch):
    new, metrics = _task(task_loss, params, batch["new"], batch.get("rng"), "new")
    quad = jax.tree.map(lambda p, a, f: jnp.sum(f * (p - a) ** 2), params, anchor, fisher)
    pen = 0.5 * strength * sum(jax.tree.leaves(quad))
    return new + pen, {**metrics, "ewc_penalty": pen}

  return Method("ewc", loss, optimizer, **kw)


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


# ---------------------------------------------------------------------------------------------------------------
# The one training loop.


@dataclasses.dataclass
class TrainState:
  step: int
  train_params: PyTree      # after method.init (full model params, or base + adapters)
  opt_state: PyTree


def make_train_step(method: Method, mask: PyTree | None, *, donate: bool = True):
  """The jitted ``(trainable, frozen, opt_state, batch) -> (trainable, opt_state, loss, metrics)``.

  With ``donate`` the trainable parameters' and optimiser state's buffers are reused for the outputs.
  """

  def step(trainable, frozen, opt_state, batch):
    model_fn = lambda t: method.to_model(t if mask is None else tu.merge(t, mask, frozen))
    value_and_grad = lambda fn, t: jax.value_and_grad(lambda u: fn(model_fn(u), batch), has_aux=True)(t)
    # Named scopes label each pass in a profile (benchmarks/profile.py).
    with jax.named_scope("new_task"):
      (loss, metrics), grads = value_and_grad(method.loss, trainable)
    if method.replay_loss is not None:
      # The barrier orders the replay pass after the first backward: peak memory is the larger pass, not both.
      after, grads = jax.lax.optimization_barrier((trainable, grads))
      with jax.named_scope("replay"):
        (replay_loss, replay_metrics), replay_grads = value_and_grad(method.replay_loss, after)
      loss, metrics, grads = loss + replay_loss, {**metrics, **replay_metrics}, tu.tree_add(grads, replay_grads)
    with jax.named_scope("update"):
      updates, opt_state = method.optimizer.update(grads, opt_state, trainable, model_fn=model_fn,
                                                   **method.extra_args(batch))
    metrics = {**metrics, "step_length": tu.tree_norm(updates)}
    return optax.apply_updates(trainable, updates), opt_state, loss, metrics

  return jax.jit(step, donate_argnums=(0, 2) if donate else ())


def init_train_state(method: Method, model_params: PyTree) -> tuple[TrainState, PyTree | None]:
  """(initial state, trainable mask or None) for ``method`` starting from ``model_params``."""
  train_params = method.init(model_params)
  mask = None if method.trainable is None else method.trainable(train_params)
  trainable = train_params if mask is None else tu.select(train_params, mask)
  optimizer = optax.with_extra_args_support(method.optimizer)
  return TrainState(0, train_params, optimizer.init(trainable)), mask


def fit(method: Method, model_params: PyTree, batches: Iterable[Batch], num_steps: int, *,
        state: TrainState | None = None, callback: Callable[[TrainState, dict], None] | None = None,
        rng: jax.Array | None = None) -> tuple[PyTree, TrainState, list[dict]]:
  """Train ``method`` for ``num_steps`` on ``batches`` (an iterator of batch dicts), starting at ``model_params``.

  Frozen parameters never enter the optimiser and stay bitwise unchanged. ``state`` resumes a run (its
  ``step`` counts already consumed batches; the caller positions ``batches`` accordingly). ``callback(state,
  metrics)`` runs after every step on the host (logging, checkpointing, path records).

  Returns:
    (final model parameters, final train state, per-step metrics as host floats).
  """
  method = dataclasses.replace(method, optimizer=optax.with_extra_args_support(method.optimizer))
  init_state, mask = init_train_state(method, model_params)
  state = init_state if state is None else state
  train_params = state.train_params
  # A copy, so that donating the trainable buffers to the step never invalidates the caller's arrays.
  trainable = jax.tree.map(jnp.copy, train_params if mask is None else tu.select(train_params, mask))
  frozen = None if mask is None else tu.select(train_params, jax.tree.map(lambda m: not m, mask))
  step_fn = make_train_step(method, mask)
  opt_state = state.opt_state
  history = []
  it: Iterator[Batch] = iter(batches)
  for step in range(state.step, num_steps):
    batch = dict(next(it))
    if rng is not None:
      batch["rng"] = jax.random.fold_in(rng, step)
    trainable, opt_state, loss, metrics = step_fn(trainable, frozen, opt_state, batch)
    row = {"step": step + 1, "loss": float(loss), **{k: float(v) for k, v in metrics.items()}}
    history.append(row)
    if callback is not None:
      full = trainable if mask is None else tu.merge(trainable, mask, train_params)
      callback(TrainState(step + 1, full, opt_state), row)
  full = trainable if mask is None else tu.merge(trainable, mask, train_params)
  return method.to_model(full), TrainState(num_steps, full, opt_state), history


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


def cl_metrics(r: np.ndarray) -> dict[str, float]:
  return {"average_accuracy": average_accuracy(r), "backward_transfer": backward_transfer(r),
          "forgetting": forgetting(r)}


class Timer:
  def __init__(self):
    self.start = time.perf_counter()

  def __call__(self) -> float:
    return time.perf_counter() - self.start


# ---------------------------------------------------------------------------------------------------------------
# How far the weights moved.


def fractional_weight_change(final: PyTree, reference: PyTree) -> float:
  """``‖θ_final − θ_ref‖_F / ‖θ_ref‖_F`` over every leaf."""
  return float(tu.tree_norm(tu.tree_sub(final, reference)) / tu.tree_norm(reference))


def weight_change_by_group(final: PyTree, reference: PyTree, group: Callable[[str], str]) -> dict[str, float]:
  """Fractional weight change per group of leaves, ``group(path) -> name`` (e.g. one group per layer)."""
  num, den = {}, {}
  for (name, a), (_, b) in zip(tu.named_leaves(final), tu.named_leaves(reference)):
    g = group(name)
    num[g] = num.get(g, 0.0) + float(jnp.sum((a - b).astype(jnp.float32) ** 2))
    den[g] = den.get(g, 0.0) + float(jnp.sum(b.astype(jnp.float32) ** 2))
  return {g: float(np.sqrt(num[g] / den[g])) if den[g] > 0 else float("nan") for g in num}
