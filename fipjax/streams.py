"""Task streams: T ≥ 2 tasks learnt in order by any method, every task evaluated after every stage.

A :class:`Stream` is a model's pure ``apply`` and a tuple of :class:`TaskSpec` (each task's data, its head and
label range). A :class:`Runner` trains the first task once (cached across methods and runs), then, for each method,
tasks 2..T in order: before each stage it builds the method's old-task state from all earlier tasks (replay buffers
with stored outputs, Fisher, anchors), and after it evaluates every task into the accuracy matrix
``R[i, j]`` (test accuracy on task j after stage i). Runs resume exactly after a kill; results land atomically.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fipjax import continual, data, generative, geometry, parallel, paths, runs
from fipjax import si as si_lib
from fipjax import stages as stages_lib
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
  steps: int | None = cf.option(None, "first-task steps (overrides --first.epochs)", cf.positive)
  epochs: float = cf.option(1.0, "first-task epochs over its training rows", cf.positive)


@dataclasses.dataclass(frozen=True)
class StageConfig:
  """Every later stage: its length, and the old-task buffer the methods may use."""
  steps: int | None = cf.option(None, "steps of each later task (overrides --stages.epochs)", cf.positive)
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
  fsdp: bool = cf.option(False, "shard the parameters, gradients and optimiser state over every device (FSDP, "
                                "fipjax.sharding); else they are replicated. Batches are split either way")


@dataclasses.dataclass(frozen=True)
class StreamConfig:
  """The sections every task-stream experiment shares; an experiment's configuration extends it."""
  optim: continual.OptimConfig = cf.section(continual.OptimConfig)
  first: FirstStageConfig = cf.section(FirstStageConfig)
  stages: StageConfig = cf.section(StageConfig)
  method: continual.MethodConfig = cf.section(continual.MethodConfig, inline=True)
  run: RunConfig = cf.section(RunConfig)
  seed: int = cf.option(0, "seed of every random choice (data subsets, initial weights, batches, dropout)",
                        cf.non_negative)

  def runner_args(self) -> dict:
    """The :class:`fipjax.stages.StageLoop` keywords these sections set."""
    return dict(optim=self.optim, first=self.first, stages=self.stages, hp=self.method, run=self.run, seed=self.seed)


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


FIRST_STAGE_RECORDER = si_lib.path_integral
"""What every first stage records while it trains (SI's path integral), so that one cached network serves every
method."""


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


class Runner(stages_lib.StageLoop):
  """Trains a stream's tasks in order with any method; see the module docstring and
  :class:`fipjax.stages.StageLoop` (the arguments but ``stream``)."""

  def __init__(self, stream: Stream, **kw):
    super().__init__(**kw)
    self.stream, self.stage_names = stream, tuple(t.name for t in stream.tasks)
    self.check_batch_sizes(self.optim.batch_size, self.stages.replay_batch_size, self.run.eval_batch_size)
    self.check_rows({t.name: len(t.splits["train"]) for t in stream.tasks}, "rows")
    self._eval = jax.jit(lambda p, x: stream.apply(p, x))
    self._features = None if stream.split is None else jax.jit(lambda p, x: stream.split[0](p, x))
    # One compiled function per old task, shared by every method's path records.
    self._outputs = {t.name: jax.jit(stream.outputs(t)) for t in stream.tasks}
    self._references: tuple[PyTree, dict] = (None, {})

  # -- evaluation ------------------------------------------------------------------------------------------------

  def logits_on(self, params, ds, head: str | None) -> np.ndarray:
    """The head's logits on every row of ``ds``, in its order: ``[N, K]``; an error if any is not finite."""
    pick = (lambda z: z) if head is None else (lambda z: z[head])
    out = self._on_rows(lambda p, x: pick(self._eval(p, x)), params, ds)
    if not np.isfinite(out).all():
      raise runs.UsageError("the model's outputs are not finite (NaN or inf) on evaluation data: the weights "
                            "have diverged or an input is out of the model's range (e.g. --data.max-len above its "
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

  def _train(self, method, params, task, steps, seed, ckpt_dir, buffers=None, observer=None, name=""):
    return self.train(method, params,
                      self.batches(task.splits["train"], seed, buffers if method.needs_replay else None), steps, seed,
                      ckpt_dir,
                      observer, name, data_key={"task": task.name, "train": task.splits["train"].digest()})

  def first_stage(self, init_params: PyTree) -> tuple[PyTree, dict, tuple[list, list]]:
    """(the network after the first task, what its stage leaves for later ones: SI's path integral ω and the
    change Δ, its evaluation row), trained once per key and kept in the cache."""
    task = self.stream.tasks[0]
    parts = {"init": data.digest_arrays(*map(np.asarray, jax.tree.leaves(init_params))),
             "task": task.name, "data": task.splits["train"].digest(),
             "optim": cf.to_dict(self.optim), "first": cf.to_dict(self.first), "seed": self.seed,
             "records": ["si_path_integral"]}
    steps = self.first_steps(len(task.splits["train"]))
    # Every first stage records SI's path integral (one multiply-add per parameter and step), so one cached
    # network serves every method.
    method = dataclasses.replace(continual.naive(self.stream.task_loss(task, self.optim.dropout),
                                                 FIRST_STAGE_RECORDER(continual.adamw(self.optim, steps))),
                                 trainable=self.stream.trainable(task))
    name = f"stage 1 ({task.name})"

    def compute(ckpt_dir):
      runs.log(f"{name}: training for {steps} steps")
      with self.timings.phase("stage1"):
        params, history, opt_state = self._train(method, init_params, task, steps, self.seed, ckpt_dir, name=name)
      return {"params": params, "si_omega": tu.unmask(si_lib.recorded(opt_state), params)}, {"history": history}

    tree, _ = self.cached("stage1", parts, compute, template={"params": init_params, "si_omega": init_params},
                          label=name)
    params = tree["params"]
    row1 = self.evaluate(params)
    runs.log("stage 1: " + ", ".join(f"{t.name} {a:.3f}" for t, a in zip(self.stream.tasks, row1[0])))
    return params, continual.si_memory(tree["si_omega"], init_params, params), row1

  def generator(self, task: TaskSpec, params: PyTree) -> dict:
    """Brain-inspired replay's generator of ``task``, fit to the split-point features of its training rows under
    ``params`` (the network at the end of the task's stage): {"generator", "generator_info"}."""
    readout, ds = self.stream.split[1], task.splits["train"]
    h = self._on_rows(self._features, params, ds)
    gen, curve = generative.fit(h, np.asarray(ds.labels) - task.offset, task.num_labels, self.hp.bir.generator,
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

  # -- the stage loop's hooks ----------------------------------------------------------------------------------------

  def start(self, first) -> stages_lib.StageState:
    params, memory, row1 = first
    return stages_lib.StageState(params, {self.stage_names[0]: memory}, {
        "history": [], "records": [], "aware": [row1[0]], "agnostic": [row1[1]]}, {"first": first})

  def checkpointed_memory(self, state):
    """The memory's arrays but the first stage's (in the stage cache) and the generators' diagnostics."""
    first = (self.stage_names[0], state.scratch["first"][1])
    drop = lambda n, k: k == "generator_info" or (n == first[0] and k in first[1])
    return {n: {k: v for k, v in m.items() if not drop(n, k)} for n, m in state.memory.items()}

  def checkpoint_meta(self, state):
    return {"generators": _infos(state.memory)}

  def restored(self, k, state, memory, meta):
    first = self.stage_names[0]
    state.memory = memory
    state.memory[first] = {**state.scratch["first"][1], **memory.get(first, {})}
    for n, info in meta.get("generators", {}).items():
      state.memory[n]["generator_info"] = info

  def _sources(self, spec: continual.MethodSpec, k: int, state, buffers) -> dict:
    """The old tasks' replay sources for a method of ``spec``: buffers (with the entering network's outputs when it
    replays them) or generators of features (fit once, when the task's stage ended)."""
    replays, tasks, params = spec.replays(self.hp), self.stream.tasks, state.params
    if replays == "outputs":
      with self.timings.phase("buffers"):
        return self.with_references(params, buffers)
    if replays != "generated":
      return buffers
    for t in tasks[:k]:
      if "generator" not in state.memory.get(t.name, {}):   # made when the task ends, kept for every later stage
        state.memory[t.name] = {**state.memory.get(t.name, {}), **self.generator(t, params)}
    return {t.name: GeneratedReplay(state.memory[t.name]["generator"], params, self.stream.from_features(t),
                                    self.seed + 100 * k + j) for j, t in enumerate(tasks[:k])}

  def _tracker(self, k: int, params, buffers, method: continual.Method, state) -> PathTracker:
    probes = {}
    for t in self.stream.tasks[:k]:
      probe = buffers[t.name].data.take(np.arange(min(self.run.probe_size, len(buffers[t.name].data))))
      probes[t.name] = (probe.batch(np.arange(len(probe)))["inputs"], self.references(params, t, probe),
                        self._outputs[t.name])
    return PathTracker(probes, self.hp.fip.distance, method.to_model, self.run.record_every,
                       len(state.log["history"]))

  def stage(self, name, k, state, ckpt_dir):
    tasks, task, params = self.stream.tasks, self.stream.tasks[k], state.params
    with self.timings.phase("buffers"):          # rows now, outputs once the method is known to replay them
      buffers = self.buffers(params, k, with_outputs=False)
    ctx = continual.StageContext(
        self.stream.task_loss(task, self.optim.dropout),
        {t.name: self.stream.old_task(t, self.optim.dropout, buffers[t.name], state.memory.get(t.name))
         for t in tasks[:k]},
        params, self.stream.trainable(task), self.stream.head_params(task.head), self.seed,
        below=None if self.stream.split is None else self.stream.split[2])
    steps = self.stage_steps(len(task.splits["train"]))
    try:
      parsed = continual.parse_name(name)
      method = continual.build(parsed, ctx, self.hp, self.optim, steps)
    except ValueError as e:
      raise runs.UsageError(str(e)) from None
    spec = parsed.spec
    if spec.first_stage_program and not parsed.in_lora and self.stream.shares_head(task):
      # With the first task's head, the step records what the first stage records, so that it is the first
      # stage's program: compiled once, then loaded from the compilation cache.
      method = dataclasses.replace(method, optimizer=FIRST_STAGE_RECORDER(method.optimizer))
    sources = self._sources(spec, k, state, buffers)
    tracker = self._tracker(k, params, buffers, method, state)
    runs.log(f"stage {k + 1} ({name}): {steps} steps on {task.name}")
    params, hist, opt_state = self._train(method, params, task, steps, self.seed + 100 * k, ckpt_dir, sources,
                                          tracker, name=f"{name} ({task.name})")
    if spec.keeps is not None and k < len(tasks) - 1:      # read by later stages only
      state.memory[task.name] = spec.keeps(opt_state, state.params, params)
    state.params = params
    state.log["history"] += hist
    state.log["records"] += tracker.record.rows
    a, g = self.evaluate(params)
    state.log["aware"].append(a)
    state.log["agnostic"].append(g)

  def result(self, name, state):
    tasks, params, params1, log = self.stream.tasks, state.params, state.scratch["first"][0], state.log
    val_aware, val_agnostic = (self.evaluate(params, "val") if all("val" in t.splits for t in tasks)
                               else (None, None))
    steps_run = [self.stage_steps(len(t.splits["train"])) for t in tasks[1:]]
    train_time, names, history = state.scratch["wall_time_s"], list(self.stage_names), log["history"]
    r = np.array(log["aware"])
    return {
        "tasks": names,
        "accuracy_matrix": r.tolist(),
        "task_agnostic_matrix": log["agnostic"],
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
        "path": {k: [row[k] for row in log["records"]] for k in paths.PathRecord.FIELDS},
        **({"generators": _infos(state.memory)} if _infos(state.memory) else {}),
    }

  def summary(self, name, result):
    r = np.array(result["accuracy_matrix"])
    return (f"{name}: " + ", ".join(f"{n} {r[0, j]:.3f} → {r[-1, j]:.3f}" for j, n in enumerate(result["tasks"])) +
            f", weight change {result['weight_change']:.4f}" + continual.solver_summary(result))
