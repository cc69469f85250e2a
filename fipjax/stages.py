"""The one stage loop every continual run shares: a first stage learnt once (cached across methods and runs), then
for each method the later stages in order, each evaluated on every stage's test data.

A :class:`StageLoop` owns what is the same for every kind of stream: a method's finished result reused from the run
directory, the stages' checkpoints and exact resume after a kill, the simulated kill of tests, timings, and the
training loop with its observers (:func:`fipjax.runs.train`). A subclass supplies what differs: how a stage's
batches are drawn and its method built (:meth:`StageLoop.stage`), how a stage is evaluated, and what a finished stage
leaves for later ones (:class:`StageState`): :class:`fipjax.streams.Runner` for classification tasks,
:class:`fipjax.alignment.AlignmentRunner` for preference rounds.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
import weakref
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import numpy as np

from fipjax import checkpoint, continual, data, memory, parallel, runs, sharding
from fipjax import config as cf
from fipjax import results as results_lib

PyTree = Any


@dataclasses.dataclass
class StageState:
  """One method's run through the later stages.

  Attributes:
    params: the model's weights after the last finished stage.
    memory: ``stage name -> arrays`` that each finished stage left for later ones (SI's ω, BI-R's generator, a
      round's pairs); saved with the stage checkpoints where :meth:`StageLoop.checkpointed_memory` says.
    log: JSON records the result is built from (evaluation rows, loss history, path records, …), saved with every
      stage checkpoint.
    scratch: what this process keeps beside them (not saved: rebuilt on resume).
  """
  params: PyTree
  memory: dict[str, dict]
  log: dict[str, Any]
  scratch: dict[str, Any] = dataclasses.field(default_factory=dict)


class StageLoop:
  """The stage loop; see the module docstring.

  Args:
    optim, first, stages, hp, run: configuration sections (:class:`fipjax.streams.StreamConfig`).
    seed: every random choice derives from it (stage k's batches and dropout use ``seed + 100 k``).
    model_key: what identifies the model beyond its initial weights: part of every cache key.
    cache: where first stages (and other reusable artefacts) are kept (None: not cached).
    progress: tqdm bars (else a log line every 10% of a stage).
    stop_after: simulate a kill after this many steps of this process, whatever the stage (tests).
  """
  stage_names: tuple[str, ...]
  stage_word = "stage"
  first_stages = 1          # how many stages first_stage covers (a continued run: every stage learnt before)
  batch_flag = "--optim.batch-size"          # the flag that sets the training batch, for messages
  buffer_flags = ("--stages.buffer-size", "--stages.replay-batch-size")     # the replay buffer's, for messages
  kind = results_lib.STREAM.kind           # the schema of its results (fipjax.results)

  def __init__(self, *, optim: continual.OptimConfig, first, stages, hp: continual.MethodConfig, run, seed: int,
               model_key: dict, cache: runs.StageCache | None = None, progress: bool = True,
               stop_after: int | None = None):
    self.optim, self.first, self.stages, self.hp, self.run = optim, first, stages, hp, run
    self.seed, self.model_key, self.cache, self.progress = seed, model_key, cache, progress
    self.budget = None if stop_after is None else runs.StepBudget(stop_after)
    self.timings = runs.Timings()
    self._digests: list[tuple[list[weakref.ref], str]] = []
    # Every device: batches split over it; parameters replicated, or split too under FSDP (--run.fsdp).
    self.mesh = sharding.fsdp_mesh() if run.fsdp else parallel.data_mesh()
    self._placed_logged = False
    size, batch = self.buffer_flags
    if stages.buffer_size < stages.replay_batch_size:
      raise runs.UsageError(f"{size} {stages.buffer_size} keeps fewer rows than one replay batch of "
                            f"{stages.replay_batch_size} ({batch}); raise it or lower the batch.")

  def check_rows(self, rows: Mapping[str, int], what: str) -> None:
    """Every stage trains on at least one batch: ``rows`` (stage name -> training rows) in words of ``what``."""
    for name, n in rows.items():
      if n < self.optim.batch_size:
        raise runs.UsageError(f"{self.stage_word} {name} has {n} training {what}, fewer than one batch of "
                              f"{self.optim.batch_size} ({self.batch_flag}); lower it or use more {what}.")

  def check_batch_sizes(self, *sizes: int) -> None:
    """Batches the devices split evenly (a usage error otherwise)."""
    try:
      for b in sizes:
        parallel.check_batch_size(b, self.mesh)
    except ValueError as e:
      raise runs.UsageError(str(e)) from None

  def place(self, params: PyTree) -> PyTree:
    """``params`` on this loop's mesh: split by the families' rules under FSDP, else replicated."""
    if not self.run.fsdp:
      return parallel.replicate(params, self.mesh)
    placed = sharding.shard_params(params, self.mesh, sharding.RULES)
    if not self._placed_logged:
      self._placed_logged = True
      b = sharding.bytes_per_device(placed)
      runs.log(f"FSDP over {self.mesh.devices.size} devices: parameters {b['total'] / 2**20:.1f} MiB, "
               f"{b['max_per_device'] / 2**20:.1f} MiB on the fullest device")
    return placed

  def batches(self, rows: data.Dataset, seed: int,
              buffers: Mapping[str, Any] | None) -> Callable[[int], Iterator[dict]]:
    """``start step -> iterator`` of training batches: ``{"new": a batch of rows}`` (:func:`fipjax.data.train_batches`,
    keyed by ``seed``) and, with ``buffers``, ``"replay"``: step k's batch of each (a function of k alone, so a
    resumed run sees what an uninterrupted one would)."""
    def start(step0):
      for step, b in enumerate(data.train_batches(rows, self.optim.batch_size, seed, start_step=step0), start=step0):
        batch = {"new": b}
        if buffers is not None:
          batch["replay"] = {n: buf.sample(step, self.stages.replay_batch_size) for n, buf in buffers.items()}
        yield batch
    return start

  def stage_steps(self, rows: int) -> int:
    """A later stage's steps over ``rows`` training rows (``--stages.steps`` or ``--stages.epochs``)."""
    return continual.num_steps(self.stages.steps, self.stages.epochs, rows, self.optim.batch_size)

  def first_steps(self, rows: int) -> int:
    return continual.num_steps(self.first.steps, self.first.epochs, rows, self.optim.batch_size)

  def train(self, method: continual.Method, params: PyTree, batches: Callable[[int], Iterator[dict]], steps: int,
            seed: int, ckpt_dir: pathlib.Path | None, observer: runs.Observer | None = None, name: str = "",
            data_key: Any = None, on_compiled: Callable[[Any], None] | None = None):
    """:func:`fipjax.runs.train` with this loop's checkpoints, progress, timings and kill budget; batches and
    dropout keyed by ``seed``: (final parameters, history, final optimiser state).

    A method that ends by a ``finish`` of the trained weights (weight interpolation) trains them once per key in
    the cache, when there is one and ``data_key`` (JSON) identifies the batches and the loss: every α of a sweep
    is then evaluated from the same fine-tuning, at no training cost after the first (optimiser state None).

    ``params`` and every batch are placed on this loop's mesh (:meth:`place`, :func:`fipjax.parallel.shard_batch`).
    ``on_compiled``: :func:`fipjax.continual.fit`'s (not called when the fine-tuning comes from the cache).
    """
    start = self.place(params)
    placed = lambda step0: (parallel.shard_batch(b, self.mesh) for b in batches(step0))
    go = lambda m, d: runs.train(m, start, placed, steps, name=name, ckpt_dir=d,
                                 checkpoint_every=self.run.checkpoint_every, rng=jax.random.PRNGKey(seed),
                                 observer=observer, progress=self.progress, budget=self.budget, timings=self.timings,
                                 on_compiled=on_compiled)
    if method.finish is None or self.cache is None or data_key is None:
      return go(method, ckpt_dir)
    dump = lambda: None if observer is None else observer.dump()

    def compute(steps_dir):
      tuned, history, _ = go(dataclasses.replace(method, finish=None), steps_dir)
      return tuned, {"history": history, "observer": dump()}

    unfinished = {k: v for k, v in cf.to_dict(self.hp).items() if k != method.finish_reads}
    parts = {"start": self.digest(params), "data": data_key, "steps": steps, "seed": seed,
             "optim": cf.to_dict(self.optim), "stages": cf.to_dict(self.stages), "hp": unfinished, "method": name}
    tuned, meta = self.cached("tuned", parts, compute, template=start, label=f"{name}: the fine-tuning before "
                              "interpolation")
    if observer is not None:
      observer.restore(meta["observer"])
    return method.finish(start, tuned), meta["history"], None

  def digest(self, params: PyTree) -> str:
    """The weights' digest, remembered for the last two trees (hashing 135M weights takes seconds) by weak
    references to their arrays: remembering a digest never keeps the weights alive."""
    leaves = jax.tree.leaves(params)
    for refs, value in self._digests:
      if len(refs) == len(leaves) and all(r() is x for r, x in zip(refs, leaves)):
        return value
    value = data.digest_arrays(*map(np.asarray, leaves))
    self._digests = [*self._digests[-1:], ([weakref.ref(x) for x in leaves], value)]
    return value

  def cached(self, name: str, parts: dict, compute: Callable, **kw) -> tuple[PyTree, dict]:
    """:func:`fipjax.runs.cached` in this loop's cache, keyed also by the model."""
    return runs.cached(self.cache, name, {"model": self.model_key, **parts}, compute, **kw)

  # -- what a kind of stream supplies ------------------------------------------------------------------------------

  def first_stage(self, init_params: PyTree) -> tuple[PyTree, dict]:
    """(the weights after the first stage, what it leaves for later ones), learnt once per key."""
    raise NotImplementedError

  def start(self, first: tuple[PyTree, dict]) -> StageState:
    """A method's state entering the second stage."""
    raise NotImplementedError

  def enter(self, k: int, state: StageState) -> None:
    """Before stage k (0-based) whether it runs or is resumed from its checkpoint (default: nothing)."""

  def stage(self, name: str, k: int, state: StageState, ckpt_dir: pathlib.Path) -> None:
    """Learn stage k with method ``name`` from ``state``, updating it (weights, memory, log) and evaluating."""
    raise NotImplementedError

  def result(self, name: str, state: StageState) -> dict:
    """The method's results.json entry after the last stage (logged by :meth:`summary`)."""
    raise NotImplementedError

  def summary(self, name: str, result: dict) -> str:
    return name

  def checkpointed_memory(self, state: StageState) -> dict:
    """The part of ``state.memory`` a stage checkpoint keeps (default: none; what it needs is rebuilt)."""
    return {}

  def restored(self, k: int, state: StageState, memory: dict, meta: dict) -> None:
    """Fold stage k's checkpoint's memory and metadata back into ``state`` (default: nothing)."""

  # -- the loop ----------------------------------------------------------------------------------------------------

  def run_method(self, name: str, first: tuple[PyTree, dict], run_dir: runs.RunDir) -> dict:
    """Stages 2..T with method ``name`` from the first stage's result; kept in ``run_dir`` as it finishes."""
    done = run_dir.part(name)
    if done is not None:
      runs.log(f"{name}: already finished in an earlier invocation, reusing it")
      return done
    state, ckpt, t0 = self.start(first), run_dir.checkpoints(name), time.perf_counter()
    last = len(self.stage_names) - 1
    for k in range(self.first_stages, last + 1):
      self.enter(k, state)
      stage_dir = ckpt / f"after_{self.stage_word}{k + 1}"
      if checkpoint.is_complete(stage_dir):          # an intermediate stage finished before a kill
        tree = checkpoint.restore_tree(stage_dir)
        meta = checkpoint.load_meta(stage_dir)
        state.params, state.log = tree["params"], meta["log"]
        self.restored(k, state, tree.get("memory", {}), meta)
        continue
      self.stage(name, k, state, ckpt / f"{self.stage_word}{k + 1}")
      if k < last:
        kept = self.checkpointed_memory(state)
        checkpoint.save(stage_dir, {"params": state.params, **({"memory": kept} if kept else {})},
                        {"log": state.log, **self.checkpoint_meta(state)}, keep_structure=True)
    state.scratch["wall_time_s"] = time.perf_counter() - t0
    result = self.result(name, state)
    results_lib.check(self.kind, result)
    run_dir.save_part(name, result)
    runs.log(self.summary(name, result))
    return result

  def checkpoint_meta(self, state: StageState) -> dict:
    """JSON a stage checkpoint keeps beside ``state.log`` (default: none)."""
    return {}

  def run_all(self, methods: Sequence[str], init_params: PyTree, run_dir: runs.RunDir) -> dict:
    """The first stage (cached), then every method over the later stages: ``{"methods", …, "timings"}``."""
    return self.run_methods(methods, self.first_stage(init_params), run_dir)

  def run_methods(self, methods: Sequence[str], first, run_dir: runs.RunDir) -> dict:
    """:meth:`run_all` after its first stage (``first``: what :meth:`first_stage` returned). A caller that drops the
    initial parameters between the two lets them be freed where the loop keeps nothing of them."""
    results = {"kind": self.kind, "methods": {}, **self.describe()}
    for name in methods:
      with self.timings.phase(name):
        results["methods"][name] = self.run_method(name, first, run_dir)
        # The method's compiled programs (its step, records, evaluation at its shapes) are not needed by the next:
        # resident memory grew by about 2 GB a method on SmolLM2 without this (docs/performance.md).
        memory.release(compiled=True)
    results["timings"] = self.timings
    results["memory"] = {**self.timings.memory, "end": runs.memory_now()}
    return results

  def describe(self) -> dict:
    """Entries of results.json beside the methods' (default: none)."""
    return {}
