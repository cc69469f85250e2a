"""Task streams: T ≥ 2 tasks learnt in order by any method, every task evaluated after every stage.

A :class:`Stream` is a model's pure ``apply`` and a tuple of :class:`TaskSpec` (each task's data, its head and
label range). A :class:`Runner` trains the first task once (cached across methods and runs), then, for each method,
tasks 2..T in order: before each stage it builds the method's old-task state from all earlier tasks (replay buffers
with stored outputs, Fisher, anchors), and after it evaluates every task into the accuracy matrix
``R[i, j]`` (test accuracy on task j after stage i). Runs resume exactly after a kill; results land atomically.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fipjax import checkpoint, continual, data, generative, geometry, parallel, paths, report, runs
from fipjax import si as si_lib
from fipjax import config as cf
from fipjax import tree as tu

PyTree = Any


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """One task: its data splits, where its logits are, and which labels are its own.

  Attributes:
    name: the task's name (reports, checkpoints).
    splits: ``{"train", "test"[, "val"]}`` → :class:`data.Dataset`; labels are in the head's coordinates.
    head: the key of ``apply``'s output dict holding the task's logits (None: ``apply`` returns one array).
    offset, num_labels: the task's own labels are ``offset .. offset + num_labels − 1`` of its head.
    loss: ``(head logits [B, K], labels [B]) -> per-row loss [B]``, the task's training loss (cross-entropy).
    keep: ``head logits [N, K] -> outputs`` that methods keep once the task is old (default: the whole head).
  """
  name: str
  splits: Mapping[str, Any]
  num_labels: int
  head: str | None = None
  offset: int = 0
  loss: Callable[[jax.Array, jax.Array], jax.Array] = optax.softmax_cross_entropy_with_integer_labels
  keep: Callable[[jax.Array], jax.Array] | None = None


def _head(out, task: TaskSpec) -> jax.Array:
  return out if task.head is None else out[task.head]


@dataclasses.dataclass(frozen=True)
class Stream:
  """A model and its tasks, in the order they are learnt.

  Attributes:
    apply: ``apply(params, inputs, *, deterministic=True, rng=None)`` → logits ``[N, K]`` or ``{head: [N, K]}``.
    tasks: the tasks in order.
    head_params: ``head -> regex`` of that head's parameters (frozen while other tasks train; LoRA trains it).
    layer_group: ``parameter path -> group`` for the per-layer weight change (default: the first path part).
    split: optional ``(features, readout, below)``: ``features(params, inputs, *, deterministic, rng) -> [N, H]``
      and ``readout(params, h, *, deterministic, rng)`` with ``readout ∘ features == apply``, and the regex of
      the parameters below the split (brain-inspired replay generates ``h``).
  """
  apply: Callable[..., Any]
  tasks: tuple[TaskSpec, ...]
  head_params: Callable[[str | None], str]
  layer_group: Callable[[str], str] = lambda path: path.split("/")[0]
  split: tuple[Callable[..., Any], Callable[..., Any], str] | None = None

  def __post_init__(self):
    names = [t.name for t in self.tasks]
    if len(names) < 2 or len(set(names)) != len(names):
      raise ValueError(f"a stream needs at least two tasks with distinct names, got {names}")

  def logits(self, params, inputs, task: TaskSpec, rng=None) -> jax.Array:
    return _head(self.apply(params, inputs, deterministic=rng is None, rng=rng), task)

  def task_loss(self, task: TaskSpec, dropout: bool) -> continual.TaskLoss:
    """The task's loss (cross-entropy over its whole head, a shared head's every label), with its accuracy."""

    def loss(params, batch, rng=None):
      z = self.logits(params, batch["inputs"], task, rng if dropout else None)
      return task.loss(z, batch["labels"]).mean(), {"acc": jnp.mean(jnp.argmax(z, -1) == batch["labels"])}

    return loss

  def outputs(self, task: TaskSpec) -> continual.OldApply:
    """What methods keep of the task once it is old (``task.keep`` of its head logits), deterministic."""
    keep = task.keep or (lambda z: z)
    return lambda params, inputs: keep(self.logits(params, inputs, task))

  def from_features(self, task: TaskSpec) -> continual.OldApply | None:
    """``outputs`` of the task computed from split-point features (None without a split)."""
    if self.split is None:
      return None
    keep, readout = task.keep or (lambda z: z), self.split[1]
    return lambda params, h: keep(_head(readout(params, h), task))

  def own_outputs(self, task: TaskSpec) -> continual.OldApply:
    """Logits over the task's own labels only."""
    return lambda params, inputs: self.logits(params, inputs, task)[:, task.offset:task.offset + task.num_labels]

  def shares_head(self, task: TaskSpec) -> bool:
    return sum(t.head == task.head for t in self.tasks) > 1

  def trainable(self, task: TaskSpec) -> Callable[[PyTree], PyTree] | None:
    """Everything but the heads no stage of ``task`` should change (other tasks' own heads)."""
    others = sorted({t.head for t in self.tasks if t.head != task.head})
    if not others:
      return None
    return lambda params: jax.tree.map(lambda m: not m, tu.regex_mask(params, [self.head_params(h) for h in others]))

  def old_task(self, task: TaskSpec, dropout: bool, buffer: data.ReplayBuffer,
               memory: Mapping[str, Any] | None = None) -> continual.OldTask:
    return continual.OldTask(self.outputs(task), self.own_outputs(task), self.task_loss(task, dropout),
                             lambda n: buffer.data.batch(np.arange(min(n, len(buffer.data))))["inputs"],
                             self.from_features(task), memory or {})


# ---------------------------------------------------------------------------------------------------------------
# Schedules (configuration sections the runner reads).


@dataclasses.dataclass(frozen=True)
class FirstStageConfig:
  """How long the first task trains (its result is cached and shared by every method)."""
  stage1_steps: int | None = cf.option(None, "first-task steps (overrides --stage1-epochs)", cf.positive)
  stage1_epochs: float = cf.option(1.0, "first-task epochs over its training rows", cf.positive)


@dataclasses.dataclass(frozen=True)
class StageConfig:
  """Every later stage: its length, and the old-task buffer the methods may use."""
  steps: int | None = cf.option(None, "steps of each later task (overrides --epochs)", cf.positive)
  epochs: float = cf.option(10.0, "epochs of each later task over its training rows", cf.positive)
  replay_batch_size: int = cf.option(8, "replay rows per old task per step", cf.positive)
  buffer_size: int = cf.option(2000, "replay-buffer rows kept per old task", cf.positive)


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Evaluation, checkpoints and records: what the numbers do not depend on."""
  eval_batch_size: int = cf.option(64, "evaluation batch size", cf.positive)
  checkpoint_every: int = cf.option(500, "steps between orbax checkpoints", cf.positive)
  record_every: int = cf.option(50, "steps between path records (distance to the old outputs)", cf.positive)
  probe_size: int = cf.option(64, "buffer rows per old task on which the path is recorded", cf.positive)


@dataclasses.dataclass(frozen=True)
class StreamConfig:
  """The sections every task-stream experiment shares; an experiment's configuration extends it."""
  optim: continual.OptimConfig = cf.section(continual.OptimConfig)
  first: FirstStageConfig = cf.section(FirstStageConfig)
  stages: StageConfig = cf.section(StageConfig)
  method: continual.MethodConfig = cf.section(continual.MethodConfig)
  run: RunConfig = cf.section(RunConfig)
  seed: int = cf.option(0, "seed of every random choice (data subsets, initial weights, batches, dropout)",
                        cf.non_negative)

  def runner_args(self) -> dict:
    """The :class:`Runner` keywords these sections set."""
    return dict(optim=self.optim, first=self.first, stages=self.stages, hp=self.method, run=self.run, seed=self.seed)


def _arrays(memory: dict, first: tuple[str, dict]) -> dict:
  """The arrays of the tasks' memory that a checkpoint needs: not the first stage's (it is in the stage cache),
  nor the generator diagnostics (metadata)."""
  drop = lambda n, k: k == "generator_info" or (n == first[0] and k in first[1])
  return {n: {k: v for k, v in m.items() if not drop(n, k)} for n, m in memory.items()}


def _infos(memory: dict) -> dict:
  return {n: m["generator_info"] for n, m in memory.items() if "generator_info" in m}


class GeneratedReplay:
  """Brain-inspired replay's batches for one old task: features drawn from its generator, with the outputs of the
  network entering the stage on them as soft targets; batch k is a function of k alone (exact resume)."""

  def __init__(self, generator: PyTree, teacher: PyTree, from_features: Callable, seed: int):
    self.generator, self.teacher, self.key = generator, teacher, jax.random.PRNGKey(seed)

    def draw(gen, params, key, n):
      h, _ = generative.sample(gen, key, n)
      return {"features": h, "ref_outputs": from_features(params, h)}

    self._draw = jax.jit(draw, static_argnums=3)

  def sample(self, step: int, batch_size: int) -> dict:
    return self._draw(self.generator, self.teacher, jax.random.fold_in(self.key, step), batch_size)


# ---------------------------------------------------------------------------------------------------------------
# Records along a stage.


class PathTracker(runs.Observer):
  """The path of a stage: new-task loss, mean distance of the old tasks' outputs to their stored references on a
  probe of each buffer, step lengths, cumulative functional / Euclidean lengths (:class:`paths.PathRecord`)."""

  def __init__(self, probes: Mapping[str, tuple[PyTree, np.ndarray, Callable]], distance: str,
               to_model: Callable, record_every: int, step_offset: int = 0):
    self.probes = probes
    self.dist = geometry.get_distance(distance).fn
    self.to_model, self.every, self.offset = to_model, record_every, step_offset
    self.prev = {n: ref for n, (_, ref, _) in probes.items()}
    self.record = paths.PathRecord()
    self.since_last = 0.0

  def observe(self, state, row, last):
    self.since_last += row["step_length"]
    if state is None:
      return
    params = self.to_model(state.train_params)
    z = {n: np.asarray(f(params, x)) for n, (x, _, f) in self.probes.items()}
    d_start = np.mean([np.mean(self.dist(z[n], ref)) for n, (_, ref, _) in self.probes.items()])
    d_step = np.mean([np.mean(self.dist(z[n], self.prev[n])) for n in self.probes])
    self.prev = z
    self.record.append(self.offset + row["step"], row["new_loss"], d_start, self.since_last, d_step)
    self.since_last = 0.0

  def dump(self):
    return {"rows": self.record.rows, "prev": {n: np.asarray(v).tolist() for n, v in self.prev.items()},
            "since_last": self.since_last}

  def restore(self, state):
    self.record.rows = state["rows"]
    self.prev = {n: np.asarray(v, np.float32) for n, v in state["prev"].items()}
    self.since_last = state["since_last"]


# ---------------------------------------------------------------------------------------------------------------
# The runner.


class Runner:
  """Trains a stream's tasks in order with any method; see the module docstring.

  Args:
    stream: the model and tasks.
    optim, first, stages, hp, run: configuration sections.
    seed: every random choice derives from it (stage k's batches and dropout use ``seed + 100 k``).
    model_key: what identifies the model beyond its initial weights (name, dtype, heads): part of the cache key.
    cache: where the first stage is kept (None: not cached).
    progress: tqdm bars (else a log line every 10% of a stage).
    stop_after: simulate a kill after this many steps of this process, whatever the stage (tests).
  """

  def __init__(self, stream: Stream, *, optim: continual.OptimConfig, first: FirstStageConfig,
               stages: StageConfig, hp: continual.MethodConfig, run: RunConfig, seed: int, model_key: dict,
               cache: runs.StageCache | None = None, progress: bool = True, stop_after: int | None = None):
    self.stream, self.optim, self.first, self.stages, self.hp, self.run = stream, optim, first, stages, hp, run
    self.seed, self.model_key, self.cache, self.progress = seed, model_key, cache, progress
    self.budget = None if stop_after is None else runs.StepBudget(stop_after)
    self.mesh = parallel.data_mesh()
    try:
      for b in (optim.batch_size, stages.replay_batch_size, run.eval_batch_size):
        parallel.check_batch_size(b, self.mesh)
    except ValueError as e:
      raise runs.UsageError(str(e)) from None
    for t in stream.tasks:
      if len(t.splits["train"]) < optim.batch_size:
        raise runs.UsageError(f"task {t.name} has {len(t.splits['train'])} training rows, fewer than one batch of "
                              f"{optim.batch_size}; lower --batch-size or use more rows.")
    self._eval = jax.jit(lambda p, x: stream.apply(p, x))
    self._features = None if stream.split is None else jax.jit(lambda p, x: stream.split[0](p, x))
    # One compiled function per old task, shared by every method's path records.
    self._outputs = {t.name: jax.jit(stream.outputs(t)) for t in stream.tasks}
    self.timings = runs.Timings()
    self._references: tuple[PyTree, dict] = (None, {})

  # -- evaluation ------------------------------------------------------------------------------------------------

  def logits_on(self, params, ds, head: str | None) -> np.ndarray:
    """The head's logits on every row of ``ds``, in its order: ``[N, K]``; an error if any is not finite."""
    pick = (lambda z: z) if head is None else (lambda z: z[head])
    out = self._on_rows(lambda p, x: pick(self._eval(p, x)), params, ds)
    if not np.isfinite(out).all():
      raise runs.UsageError("the model's outputs are not finite (NaN or inf) on evaluation data: the weights "
                            "have diverged or an input is out of the model's range (e.g. --max-len above its "
                            "position embeddings). Nothing was reported.")
    return out

  def _on_rows(self, fn: Callable, params, ds) -> np.ndarray:
    """``fn(params, inputs) -> [B, D]`` on every row of ``ds``, in its order: ``[N, D]``."""
    out = None
    for batch, idx in data.eval_batches(ds, self.run.eval_batch_size):
      z = np.asarray(fn(params, parallel.shard_batch(batch["inputs"], self.mesh)))
      out = np.empty((len(ds), z.shape[-1]), np.float32) if out is None else out
      out[idx] = z[:len(idx)]
    return out

  def accuracy(self, params, task: TaskSpec, split: str) -> tuple[float, float | None]:
    """(task-aware, task-agnostic or None when the head is the task's alone) accuracy on one split."""
    ds = task.splits[split]
    z = self.logits_on(params, ds, task.head)
    lo, k = task.offset, task.num_labels
    aware = float(np.mean(np.argmax(z[:, lo:lo + k], -1) + lo == ds.labels))
    agnostic = float(np.mean(np.argmax(z, -1) == ds.labels)) if self.stream.shares_head(task) else None
    return aware, agnostic

  def evaluate(self, params, split: str = "test") -> tuple[list[float], list[float | None]]:
    """(task-aware, task-agnostic) accuracy of every task on ``split``."""
    with self.timings.phase(f"eval_{split}"):
      res = [self.accuracy(params, t, split) for t in self.stream.tasks]
    return [a for a, _ in res], [g for _, g in res]

  # -- training ----------------------------------------------------------------------------------------------------

  def _batches(self, task: TaskSpec, seed: int, buffers: Mapping[str, Any] | None):
    def start(step0):
      stream = data.train_batches(task.splits["train"], self.optim.batch_size, seed, start_step=step0)
      for step, b in enumerate(stream, start=step0):
        batch = {"new": b}
        if buffers is not None:
          batch["replay"] = {n: buf.sample(step, self.stages.replay_batch_size) for n, buf in buffers.items()}
        yield parallel.shard_batch(batch, self.mesh)
    return start

  def _train(self, method, params, task, steps, seed, ckpt_dir, buffers=None, observer=None, name=""):
    return runs.train(method, parallel.replicate(params, self.mesh),
                      self._batches(task, seed, buffers if method.needs_replay else None), steps, name=name,
                      ckpt_dir=ckpt_dir, checkpoint_every=self.run.checkpoint_every, rng=jax.random.PRNGKey(seed),
                      observer=observer, progress=self.progress, budget=self.budget, timings=self.timings)

  def first_stage(self, init_params: PyTree) -> tuple[PyTree, dict]:
    """(the network after the first task, what its stage leaves for later ones: SI's path integral ω and the
    change Δ), trained once per key and kept in the cache."""
    task = self.stream.tasks[0]
    parts = {"model": self.model_key, "init": data.digest_arrays(*map(np.asarray, jax.tree.leaves(init_params))),
             "task": task.name, "data": task.splits["train"].digest(),
             "optim": cf.to_dict(self.optim), "first": cf.to_dict(self.first), "seed": self.seed,
             "records": ["si_path_integral"]}
    steps = continual.num_steps(self.first.stage1_steps, self.first.stage1_epochs, len(task.splits["train"]),
                                self.optim.batch_size)
    # Every first stage records SI's path integral (one multiply-add per parameter and step), so one cached
    # network serves every method.
    adamw = optax.adamw(self.optim.lr, weight_decay=self.optim.weight_decay)
    method = dataclasses.replace(continual.naive(self.stream.task_loss(task, self.optim.dropout),
                                                 si_lib.path_integral(adamw)),
                                 trainable=self.stream.trainable(task))
    name = f"stage 1 ({task.name})"
    memory = lambda params, omega: {"si_omega": omega, "si_change": tu.tree_sub(params, init_params)}
    if self.cache is None:
      params, _, opt_state = self._train(method, init_params, task, steps, self.seed, None, name=name)
      return params, memory(params, tu.unmask(si_lib.recorded(opt_state), params))
    key = self.cache.key("stage1", parts)
    with self.cache.lock(key) as path:
      if checkpoint.is_complete(path / "final"):
        runs.log(f"{name}: reusing the network in {path}")
        tree = checkpoint.restore(path / "final", {"params": init_params, "si_omega": init_params})
        return tree["params"], memory(tree["params"], tree["si_omega"])
      runs.log(f"{name}: training for {steps} steps")
      with self.timings.phase("stage1"):
        params, history, opt_state = self._train(method, init_params, task, steps, self.seed, path / "checkpoints",
                                                 name=name)
        omega = tu.unmask(si_lib.recorded(opt_state), params)
        checkpoint.save(path / "final.tmp", {"params": params, "si_omega": omega},
                        {"history": history, "key": parts})
      runs.StageCache.publish(path / "final.tmp", path / "final")
      checkpoint.remove(path / "checkpoints")
    return params, memory(params, omega)

  def generator(self, task: TaskSpec, params: PyTree) -> dict:
    """Brain-inspired replay's generator of ``task``, fit to the split-point features of its training rows under
    ``params`` (the network at the end of the task's stage): {"generator", "generator_info"}."""
    readout, ds = self.stream.split[1], task.splits["train"]
    h = self._on_rows(self._features, params, ds)
    gen, curve = generative.fit(h, np.asarray(ds.labels) - task.offset, task.num_labels, self.hp.bir_generator,
                                seed=self.seed + 13)
    hs, ys = generative.sample(gen, jax.random.PRNGKey(self.seed + 17), 1000)
    z = _head(readout(params, hs), task)[:, task.offset:task.offset + task.num_labels]
    agree = float(jnp.mean(jnp.argmax(z, -1) == ys))
    runs.log(f"bir: generator of {task.name} fit to {len(h)} feature vectors, loss {curve[0]:.2f} → {curve[-1]:.2f}; "
             f"its samples are classified as their class {agree:.1%} of the time (chance {1 / task.num_labels:.1%})")
    return {"generator": gen, "generator_info": {"loss_curve": curve, "class_agreement": agree}}

  def buffers(self, params, k: int, with_outputs: bool = True) -> dict[str, data.ReplayBuffer]:
    """Replay buffers of the tasks before stage k, with the outputs of ``params`` (the network entering stage k)
    stored once (``with_outputs``: else rows alone)."""
    out = {}
    for j, task in enumerate(self.stream.tasks[:k]):
      train = task.splits["train"]
      idx = np.sort(np.random.default_rng([self.seed, 11 + j]).choice(
          len(train), size=min(self.stages.buffer_size, len(train)), replace=False))
      out[task.name] = data.ReplayBuffer(train.take(idx), seed=self.seed + j)
    return self.with_references(params, out) if with_outputs else out

  def with_references(self, params, buffers: Mapping[str, data.ReplayBuffer]) -> dict[str, data.ReplayBuffer]:
    """``buffers`` (by task name) with the outputs of ``params`` on their rows (:meth:`references`)."""
    tasks = {t.name: t for t in self.stream.tasks}
    return {n: dataclasses.replace(b, ref_outputs=self.references(params, tasks[n], b.data))
            for n, b in buffers.items()}

  def references(self, params, task: TaskSpec, ds) -> np.ndarray:
    """The outputs FIP keeps of ``task`` under ``params`` on the rows ``ds`` (its head's logits, through
    ``task.keep``): ``[N, K]``. Computed once per network and rows: every method of stage 2 starts from the same
    network and shares them."""
    key = (task.name, ds.digest())
    if self._references[0] is not params:
      self._references = (params, {})
    if key not in self._references[1]:
      ref = self.logits_on(params, ds, task.head)
      self._references[1][key] = ref if task.keep is None else np.asarray(task.keep(jnp.asarray(ref)), np.float32)
    return self._references[1][key]

  def run_method(self, name: str, first: tuple[PyTree, dict], row1: tuple[list, list], run_dir: runs.RunDir) -> dict:
    """Tasks 2..T with method ``name`` from the first-stage network and its memory; the result is kept in
    ``run_dir``."""
    done = run_dir.part(name)
    if done is not None:
      runs.log(f"{name}: already finished in an earlier invocation, reusing it")
      return done
    tasks, aware, agnostic = self.stream.tasks, [row1[0]], [row1[1]]
    params1, memory = first[0], {tasks[0].name: first[1]}     # memory: what each finished task's stage left
    params, history, records, steps_run, t0 = params1, [], [], [], time.perf_counter()
    ckpt = run_dir.checkpoints(name)
    for k in range(1, len(tasks)):
      task, stage_dir = tasks[k], ckpt / f"after_stage{k + 1}"
      steps = continual.num_steps(self.stages.steps, self.stages.epochs, len(task.splits["train"]),
                                  self.optim.batch_size)
      steps_run.append(steps)
      if checkpoint.is_complete(stage_dir):          # an intermediate stage finished before a kill
        meta = checkpoint.load_meta(stage_dir)
        tree = checkpoint.restore_tree(stage_dir)
        params, memory = tree["params"], tree["memory"]
        memory[tasks[0].name] = {**first[1], **memory.get(tasks[0].name, {})}
        for n, info in meta.get("generators", {}).items():
          memory[n]["generator_info"] = info
        history, records, aware, agnostic = meta["history"], meta["records"], meta["aware"], meta["agnostic"]
        continue
      with self.timings.phase("buffers"):          # rows now, outputs once the method is known to replay them
        buffers = self.buffers(params, k, with_outputs=False)
      ctx = continual.StageContext(
          self.stream.task_loss(task, self.optim.dropout),
          {t.name: self.stream.old_task(t, self.optim.dropout, buffers[t.name], memory.get(t.name))
           for t in tasks[:k]},
          params, self.stream.trainable(task), self.stream.head_params(task.head), self.seed,
          below=None if self.stream.split is None else self.stream.split[2])
      try:
        method = continual.build(name, ctx, self.hp, self.optim)
      except ValueError as e:
        raise runs.UsageError(str(e)) from None
      if name == "naive" and self.stream.shares_head(task):
        # With the first task's head, naive fine-tuning records SI's path integral as the first stage does, so
        # that its step is the first stage's program: compiled once, then loaded from the compilation cache.
        method = dataclasses.replace(method, optimizer=si_lib.path_integral(method.optimizer))
      if method.needs_replay and method.replays != "generated":
        with self.timings.phase("buffers"):
          buffers = self.with_references(params, buffers)
      sources = buffers
      if method.replays == "generated":
        for t in tasks[:k]:
          if "generator" not in memory.get(t.name, {}):   # made when the task ends, kept for every later stage
            memory[t.name] = {**memory.get(t.name, {}), **self.generator(t, params)}
        sources = {t.name: GeneratedReplay(memory[t.name]["generator"], params, self.stream.from_features(t),
                                           self.seed + 100 * k + j) for j, t in enumerate(tasks[:k])}
      probes = {}
      for t in tasks[:k]:
        probe = buffers[t.name].data.take(np.arange(min(self.run.probe_size, len(buffers[t.name].data))))
        probes[t.name] = (probe.batch(np.arange(len(probe)))["inputs"], self.references(params, t, probe),
                          self._outputs[t.name])
      tracker = PathTracker(probes, self.hp.distance, method.to_model, self.run.record_every, len(history))
      runs.log(f"stage {k + 1} ({name}): {steps} steps on {task.name}")
      start = params
      params, hist, opt_state = self._train(method, params, task, steps, self.seed + 100 * k, ckpt / f"stage{k + 1}",
                                            sources, tracker, name=f"{name} ({task.name})")
      omega = si_lib.recorded(opt_state)
      if omega is not None and k < len(tasks) - 1:      # read by later stages only
        memory[task.name] = {"si_omega": tu.unmask(omega, params), "si_change": tu.tree_sub(params, start)}
      history, records = history + hist, records + tracker.record.rows
      a, g = self.evaluate(params)
      aware, agnostic = aware + [a], agnostic + [g]
      if k < len(tasks) - 1:
        checkpoint.save(stage_dir, {"params": params, "memory": _arrays(memory, (tasks[0].name, first[1]))},
                        {"history": history, "records": records, "aware": aware, "agnostic": agnostic,
                         "generators": _infos(memory)}, keep_structure=True)
    val_aware, val_agnostic = (self.evaluate(params, "val") if all("val" in t.splits for t in tasks)
                               else (None, None))
    train_time = time.perf_counter() - t0
    names = [t.name for t in tasks]
    r = np.array(aware)
    result = {
        "tasks": names,
        "accuracy_matrix": r.tolist(),
        "task_agnostic_matrix": agnostic,
        "validation": None if val_aware is None else dict(zip(names, val_aware)),
        "validation_task_agnostic": None if val_agnostic is None else dict(zip(names, val_agnostic)),
        "weight_change": continual.fractional_weight_change(params, params1),
        "weight_change_by_layer": continual.weight_change_by_group(params, params1, self.stream.layer_group),
        **continual.cl_metrics(r),
        "steps": steps_run,
        "train_time_s": train_time,
        "steps_per_s": sum(steps_run) / train_time,
        "final_loss": history[-1]["loss"] if history else None,
        "loss_curve": [row["loss"] for row in history],
        **continual.solver_curves(history),
        "path": {k: [r[k] for r in records] for k in paths.PathRecord.FIELDS},
        **({"generators": _infos(memory)} if _infos(memory) else {}),
    }
    run_dir.save_part(name, result)
    runs.log(f"{name}: " + ", ".join(f"{n} {r[0, j]:.3f} → {r[-1, j]:.3f}" for j, n in enumerate(names)) +
             f", weight change {result['weight_change']:.4f}" + continual.solver_summary(result))
    return result

  def run_all(self, methods: Sequence[str], init_params: PyTree, run_dir: runs.RunDir) -> dict:
    """The first stage (cached), then every method over the later tasks: ``{"methods": …, "timings": …}``."""
    first = self.first_stage(init_params)
    row1 = self.evaluate(first[0])
    runs.log("stage 1: " + ", ".join(f"{t.name} {a:.3f}" for t, a in zip(self.stream.tasks, row1[0])))
    results = {"methods": {}}
    for name in methods:
      with self.timings.phase(name):
        results["methods"][name] = self.run_method(name, first, row1, run_dir)
    results["timings"] = self.timings
    return results


def experiment_main(module: str, argv: Sequence[str] | None, cfg, args, methods: Sequence[str],
                    build: Callable[[], tuple[Any, PyTree]], *, title: str, runs_root: pathlib.Path,
                    before: Callable[[], None] = lambda: None, user_errors: tuple[type[Exception], ...] = (),
                    write: Callable[[pathlib.Path, dict, str], str] = report.write) -> int:
  """An experiment's ``main`` once ``argv`` is parsed into ``cfg`` and ``args``: ``before()`` (checks that need no
  data, set-up), then :func:`run_experiment` into ``args.out`` (else the unfinished run of this configuration under
  ``runs_root``, else a new one). Returns the exit code; failures are one paragraph on stderr (:func:`runs.cli_main`,
  ``user_errors`` exiting 2 beside :class:`fipjax.data.DataError`)."""
  command = " ".join([f"python -m {module}"] + list(sys.argv[1:] if argv is None else argv))
  config = cf.to_dict(cfg)

  def run():
    before()
    out = args.out or runs.default_out(runs_root, {"config": config, "methods": list(methods)})
    runs.log(f"configuration (preset {args.preset}):\n{cf.describe(cfg)}")
    run_experiment(build, methods=methods, config=config, out=out, cache_dir=getattr(args, "cache_dir", None),
                   title=title, command=command, write=write)

  return runs.cli_main(run, user_errors=(data.DataError, *user_errors))


def run_experiment(build: Callable[[], tuple[Any, PyTree]], *, methods: Sequence[str], config: dict,
                   out: pathlib.Path, cache_dir: pathlib.Path | None, title: str, command: str,
                   write: Callable[[pathlib.Path, dict, str], str] = report.write) -> dict:
  """Everything an experiment's command line does after parsing: check ``out`` and ``cache_dir`` (writing
  nothing), ``build()`` the runner and the initial parameters (loading the model and data: bad input fails here),
  open the run directory, ``runner.run_all(methods, init, run_dir)``, write ``results.json`` (last, atomically),
  and ``write`` ``report.md`` and the figures (a :class:`Runner` or :class:`fipjax.alignment.AlignmentRunner`)."""
  identity = {"config": config, "methods": list(methods)}
  runs.RunDir.check(out, identity)
  if cache_dir is not None:
    runs.check_writable_dir(cache_dir, "--cache-dir")
    runs.use_compilation_cache(pathlib.Path(cache_dir) / "xla")
  runner, init_params = build()
  run_dir, resuming = runs.RunDir.open(pathlib.Path(out), identity)
  runs.log(f"{'resuming' if resuming else 'writing'} {out}; devices: {jax.device_count()} "
           f"({jax.devices()[0].device_kind})")
  results = runner.run_all(methods, init_params, run_dir)
  results = {"config": config, "seed": runner.seed, "command": command, "versions": report.versions(), **results}
  print(write(run_dir.path, results, title))
  run_dir.finish(results)
  runs.log(f"wrote {run_dir.path / 'results.json'}, {run_dir.path / 'report.md'}")
  return results
