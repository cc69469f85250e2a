"""Runs on disk: run directories that never overwrite another run, a stage cache safe under concurrent runs,
resumable checkpointed training, and one-paragraph errors with the exit code a shell expects.

* :class:`RunDir` — ``run.json`` names the run's identity (its whole configuration); the same command resumes, a
  different one is refused while the directory holds progress, finished results are never overwritten.
* :class:`StageCache` — a stage's result stored under a key derived from everything passed to the stage (plus the
  package version and the data's content digests), computed by one process at a time (a file lock), published by an
  atomic rename.
* :func:`train` — :func:`continual.fit` with orbax checkpoints every N steps, exact resume, progress, and a
  resumable observer (path records).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import hashlib
import importlib.metadata
import json
import math
import pathlib
import shutil
import sys
import time
import uuid
from typing import Any, Callable, Iterator

import jax
import numpy as np
from tqdm import tqdm

from fipjax import checkpoint, continual, memory

PyTree = Any
VERSION = importlib.metadata.version("fipjax")


class RunError(Exception):
  """An error reported as one paragraph, no traceback. ``exit_code`` 2: the user's input; 1: the machine's."""
  exit_code = 2


class UsageError(RunError):
  """Bad input that the user can fix."""


class MachineError(RunError):
  """The machine failed the run (disk full, file system read-only): nothing the flags can fix."""
  exit_code = 1


def log(msg: str) -> None:
  print(f"[{datetime.datetime.now():%H:%M:%S}] {msg}", flush=True)


def write_json(path: pathlib.Path, obj) -> None:
  """Atomically (temporary file + rename): a reader never sees half a file. NaN is refused (not JSON)."""
  tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
  tmp.write_text(json.dumps(obj, indent=1, allow_nan=False))
  tmp.replace(path)


def digest(obj) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def use_compilation_cache(path: pathlib.Path) -> pathlib.Path:
  """Keep JAX's compiled programs in ``path`` (JAX's persistent compilation cache), unless a cache directory is
  already configured (``JAX_COMPILATION_CACHE_DIR``): a resumed run, a rerun, or a later method or seed with the
  same shapes loads its compiled training steps (JAX keeps programs that took over a second to compile) instead of
  compiling them again. Returns the directory used."""
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", str(path))
  return pathlib.Path(jax.config.jax_compilation_cache_dir)


_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration", "/jax/compilation_cache/cache_retrieval_time_sec")
_compile_total = [0.0]


def _on_duration(event: str, seconds: float, **_) -> None:
  if event in _COMPILE_EVENTS:
    _compile_total[0] += seconds


jax.monitoring.register_event_duration_secs_listener(_on_duration)


def compile_seconds() -> float:
  """Seconds this process has spent tracing, lowering and compiling XLA programs (or loading them from the
  persistent cache), from JAX's monitoring events."""
  return _compile_total[0]


def memory_now() -> dict[str, int]:
  """This process's resident memory now and at its peak so far (bytes), and the first device's bytes in use and
  peak where the backend reports them (GPUs, TPUs; not XLA's CPU client)."""
  import resource
  out = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
  try:
    out["rss_bytes"] = int(pathlib.Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()
    out["peak_rss_bytes"] = max(out["peak_rss_bytes"], out["rss_bytes"])     # the kernel's peak lags a little
  except (OSError, IndexError, ValueError):
    pass
  stats = jax.devices()[0].memory_stats() or {}
  out.update({f"device_{k}": int(stats[k]) for k in ("bytes_in_use", "peak_bytes_in_use") if k in stats})
  return out


class Timings(dict):
  """Wall-clock seconds by phase, flat: ``{"stage1": s, "stage1/train": s, "stage1/train/compile": s, …}``.

  ``with timings.phase(name)`` adds the time spent inside to ``name``, prefixed by the phases open around it
  (``"fip/eval_test"``), and the XLA compilation inside it to ``<name>/compile``; a phase's total includes the
  phases nested in it. ``memory[name]``: :func:`memory_now` when the phase last ended.
  """

  def __init__(self):
    super().__init__()
    self._open: list[str] = []
    self.memory: dict[str, dict[str, int]] = {}

  @contextlib.contextmanager
  def phase(self, name: str) -> Iterator[None]:
    key = "/".join([*self._open, name])
    self._open.append(name)
    t0, c0 = time.perf_counter(), compile_seconds()
    try:
      yield
    finally:
      self._open.pop()
      self[key] = self.get(key, 0.0) + time.perf_counter() - t0
      self[f"{key}/compile"] = self.get(f"{key}/compile", 0.0) + compile_seconds() - c0
      memory.release()
      self.memory[key] = memory_now()


def check_writable_dir(path: pathlib.Path, flag: str) -> None:
  """Raise a :class:`UsageError` now, before any work, if ``path`` could not be created or written."""
  path = pathlib.Path(path).absolute()
  if path.exists() and not path.is_dir():
    raise UsageError(f"{flag} {path} is a file, not a directory; pass a directory path.")
  probe_dir = path
  while not probe_dir.exists():
    probe_dir = probe_dir.parent
  if not probe_dir.is_dir():
    raise UsageError(f"{flag} {path} cannot be created: {probe_dir} is a file. Pass a path under a directory.")
  probe = probe_dir / f".fipjax-write-test-{uuid.uuid4().hex}"
  try:
    probe.write_bytes(b"")
    probe.unlink()
  except OSError as e:
    raise UsageError(f"{flag} {path} is not writable ({e.strerror} in {probe_dir}); pass a directory you can "
                     "write to.") from None


def os_error_message(e: OSError) -> RunError:
  """A file-system failure as one paragraph; a full disk or read-only file system is the machine's error."""
  where = f" ({e.filename})" if e.filename else ""
  if e.errno in (errno.ENOSPC, errno.EDQUOT):
    return MachineError(f"the disk is full{where}: {e.strerror}. Free space there, or point --out / --cache-dir "
                        "at another disk, then run the same command again to resume.")
  if e.errno == errno.EROFS:
    return MachineError(f"the file system is read-only{where}. Point --out / --cache-dir at a writable "
                        "directory.")
  return MachineError(f"a file-system operation failed{where}: {e.strerror or e}. Check the path and run the same "
                      "command again to resume.")


def cli_main(run: Callable[[], Any], *, user_errors: tuple[type[Exception], ...] = ()) -> int:
  """Run ``run()`` and turn its failures into one paragraph on stderr and an exit code: 0; 2 for the user's
  input (:class:`UsageError` and ``user_errors``); 1 for the machine's (a full disk…); 130 when interrupted."""
  try:
    run()
  except user_errors as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except RunError as e:
    print(f"error: {e}", file=sys.stderr)
    return e.exit_code
  except OSError as e:
    print(f"error: {os_error_message(e)}", file=sys.stderr)
    return 1
  except KeyboardInterrupt as e:
    print(f"interrupted ({e}); run the same command again to resume from the last checkpoint", file=sys.stderr)
    return 130
  return 0


# ---------------------------------------------------------------------------------------------------------------
# Run directories.


class RunDir:
  """A run's output directory, identified by ``run.json``.

  Layout: ``run.json`` (identity), ``checkpoints/<name>/`` (removed once finished), ``parts/<name>.json``
  (finished pieces, reused on resume), ``results.json`` (written last).
  """

  def __init__(self, path: pathlib.Path):
    self.path = pathlib.Path(path)
    self._lock = None

  @staticmethod
  def check(path: pathlib.Path | None, identity: dict) -> None:
    """Every check :meth:`open` makes, without writing anything."""
    if path is None:
      return
    check_writable_dir(path, "--out")
    if (path / "results.json").exists():
      raise UsageError(f"{path} already holds the results of a finished run; results are never overwritten. Pass "
                       "another --out (or omit it for a fresh runs/<timestamp> directory).")
    if path.exists() and any(path.iterdir()):
      run = path / "run.json"
      if not run.exists() or (_read(run).get("identity") != identity and RunDir(path).has_progress()):
        raise UsageError(f"{path} already holds files of another run (a different configuration or methods), "
                         "which would be overwritten. Pass another --out, or repeat that run's exact command to "
                         "resume it.")

  @classmethod
  def open(cls, path: pathlib.Path, identity: dict) -> tuple["RunDir", bool]:
    """(run directory, resuming?): creates it, or resumes the run with the same identity."""
    cls.check(path, identity)
    run = cls(path)
    run.path.mkdir(parents=True, exist_ok=True)
    run._lock = open(run.path / ".lock", "w")
    try:
      fcntl.flock(run._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise UsageError(f"another process is writing {path} right now; wait for it, or pass another --out.") from None
    resuming = (path / "run.json").exists() and _read(path / "run.json").get("identity") == identity
    if not resuming:
      write_json(path / "run.json", {"identity": identity, "started": time.time()})
    return run, resuming

  def has_progress(self) -> bool:
    return any((self.path / d).exists() and any((self.path / d).iterdir()) for d in ("parts", "checkpoints"))

  def checkpoints(self, name: str) -> pathlib.Path:
    return self.path / "checkpoints" / name

  def part(self, name: str) -> dict | None:
    path = self.path / "parts" / f"{name}.json"
    return _read(path) if path.exists() else None

  def save_part(self, name: str, obj: dict) -> None:
    (self.path / "parts").mkdir(exist_ok=True)
    write_json(self.path / "parts" / f"{name}.json", obj)
    shutil.rmtree(self.checkpoints(name), ignore_errors=True)

  def finish(self, results: dict) -> None:
    write_json(self.path / "results.json", results)
    shutil.rmtree(self.path / "checkpoints", ignore_errors=True)
    (self.path / ".lock").unlink(missing_ok=True)
    if self._lock is not None:
      self._lock.close()        # releases the lock
      self._lock = None


def _read(path: pathlib.Path) -> dict:
  try:
    return json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError):
    return {}


def default_out(root: pathlib.Path, identity: dict) -> pathlib.Path:
  """The unfinished run with this identity under ``root`` (to resume it), else a fresh ``<timestamp>`` dir."""
  for run in sorted(root.glob("*/run.json"), reverse=True):
    if _read(run).get("identity") == identity and not (run.parent / "results.json").exists():
      return run.parent
  return root / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


# ---------------------------------------------------------------------------------------------------------------
# Stage cache.


class StageCache:
  """Stage results keyed by a digest of everything that determines them.

  ``key(parts)`` hashes the parts (configuration sections, data digests, seed) with the fipjax version, so a
  change to any of them, to the data's contents, or to the package computes the stage anew.
  """

  def __init__(self, root: pathlib.Path):
    self.root = pathlib.Path(root)

  def key(self, name: str, parts: dict) -> str:
    return f"{name}-{digest({'parts': parts, 'version': VERSION})}"

  def path(self, key: str) -> pathlib.Path:
    return self.root / key

  @contextlib.contextmanager
  def lock(self, key: str) -> Iterator[pathlib.Path]:
    """Hold ``key``'s lock (waiting for another run computing it); yields the entry's directory."""
    self.root.mkdir(parents=True, exist_ok=True)
    with open(self.root / f"{key}.lock", "w") as f:
      try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        log(f"waiting for another run that is computing {self.root / key}")
        fcntl.flock(f, fcntl.LOCK_EX)
      yield self.path(key)

  @staticmethod
  def publish(tmp: pathlib.Path, final: pathlib.Path) -> None:
    """Move a complete entry into place atomically."""
    if final.exists():
      shutil.rmtree(final)
    tmp.rename(final)


def cached(cache: StageCache | None, name: str, parts: dict, compute: Callable[[pathlib.Path | None], tuple],
           *, template: PyTree = None, label: str | None = None) -> tuple[PyTree, dict]:
  """``compute(checkpoint dir) -> (arrays, meta)`` once per key of ``parts``: the cached entry's (arrays, meta)
  where one is complete, else computed (resuming from its step checkpoints), saved under a temporary name,
  published by an atomic rename, and its step checkpoints removed; all under the key's lock. Without a cache,
  ``compute(None)``. ``template``: the arrays' tree to restore into (None: the saved structure, as numpy)."""
  if cache is None:
    return compute(None)
  with cache.lock(cache.key(name, parts)) as path:
    final, steps = path / "final", path / "checkpoints"
    if checkpoint.is_complete(final):
      if label:
        log(f"{label}: reusing the cached result in {final}")
      tree = (jax.tree.map(np.asarray, checkpoint.restore_tree(final)) if template is None
              else checkpoint.restore(final, template))
      return tree, checkpoint.load_meta(final)
    tree, meta = compute(steps)
    checkpoint.save(path / "final.tmp", tree, {**meta, "key": parts}, keep_structure=template is None)
    StageCache.publish(path / "final.tmp", final)
    checkpoint.remove(steps)
  return tree, meta


# ---------------------------------------------------------------------------------------------------------------
# Resumable training.


SYNC_EVERY = 10
"""Steps between the host's reads of the training metrics in :func:`train`."""


class Observer:
  """Watches a training run after every step; its state rides in the checkpoints (see :class:`PathTracker`).
  ``observe`` receives the state at the steps where ``wants_state`` (every ``every`` steps and the last), else
  None."""
  every: int = 1

  def wants_state(self, step: int, last: bool) -> bool:
    return last or step % self.every == 0

  def observe(self, state: continual.HostState | None, row: dict, last: bool) -> None: ...
  def dump(self) -> Any: ...
  def restore(self, state: Any) -> None: ...


class StepBudget:
  """A kill simulated after ``n`` training steps of this process, whatever the stage (tests, ``--stop-after``)."""

  def __init__(self, n: int):
    self.left = n

  def spend(self, step: int) -> None:
    self.left -= 1
    if self.left <= 0:
      raise KeyboardInterrupt(f"stopped after step {step} (--stop-after)")


def train(method: continual.Method, params: PyTree, batches: Callable[[int], Iterator[dict]], steps: int, *,
          name: str, ckpt_dir: pathlib.Path | None, checkpoint_every: int, rng: jax.Array,
          observer: Observer | None = None, progress: bool = True, budget: StepBudget | None = None,
          log_every: int | None = None, sync_every: int = SYNC_EVERY,
          timings: Timings | None = None,
          on_compiled: Callable[[Any], None] | None = None) -> tuple[PyTree, list[dict], PyTree]:
  """:func:`continual.fit` with orbax checkpoints every ``checkpoint_every`` steps and exact resume.

  Checkpoints are written on a background thread (:class:`checkpoint.Writer`): the steps go on while one is
  written, and a kill leaves the previous one complete. Metrics reach the host every ``sync_every`` steps, and at
  checkpoint and observer steps: the progress bar lags by at most that.

  Args:
    batches: ``start_step -> iterator`` of batches (batch k a function of k alone, so a resumed run sees the
      batches an uninterrupted one would).
    ckpt_dir: where step checkpoints go (None: no checkpoints, no resume).
    budget: simulate a kill once it is spent (tests).
    log_every: without progress bars, log a line every this many steps (default: 10% of the run).
    timings: gets the phases ``train``, ``train/checkpoint`` and ``train/records`` (with their compilation).
    on_compiled: :func:`continual.fit`'s (the step's compiled program, once it has run).

  Returns:
    (final model parameters, per-step history, final optimiser state).
  Raises:
    RunError: a non-finite loss (the step, the last finite loss).
  """
  timings = Timings() if timings is None else timings
  state, history, start = None, [], 0
  latest = None if ckpt_dir is None else checkpoint.latest_step(ckpt_dir)
  if latest is not None:
    template, _ = continual.init_train_state(method, params)
    tree = checkpoint.restore(latest, {"train_params": template.train_params, "opt_state": template.opt_state})
    del template         # not held through training: a fresh optimiser state is as large as two parameter copies
    meta = checkpoint.load_meta(latest)
    start, history = meta["step"], meta["history"]
    if observer is not None:
      observer.restore(meta["observer"])
    state = continual.TrainState(start, tree["train_params"], tree["opt_state"])
    log(f"{name}: resuming from {latest} (step {start}/{steps})")
  bar = tqdm(total=steps, initial=start, desc=name, disable=not progress, leave=False, dynamic_ncols=True)
  log_every = log_every or max(1, steps // 10)
  t0 = time.perf_counter()
  checkpoint_at = lambda step: ckpt_dir is not None and step % checkpoint_every == 0 and step < steps
  keep_state = lambda step: checkpoint_at(step) or (observer is not None and observer.wants_state(step, step == steps))
  writer = checkpoint.Writer()

  def callback(st, row):
    step = row["step"]
    history.append(row)
    bar.update(1)
    bar.set_postfix(loss=f"{row['loss']:.3f}")
    if not progress and (step % log_every == 0 or step == steps):
      rate = (step - start) / (time.perf_counter() - t0)
      log(f"{name}: step {step}/{steps}, loss {row['loss']:.4f}, {rate:.2f} steps/s")
    if observer is not None:
      with timings.phase("records"):
        observer.observe(st, row, step == steps)
    if checkpoint_at(step):
      with timings.phase("checkpoint"):     # the host copy here; the write on the writer's thread
        writer.submit(ckpt_dir, step, {"train_params": st.train_params, "opt_state": st.opt_state},
                      {"history": history, "observer": None if observer is None else observer.dump()})
    if budget is not None:
      budget.spend(step)

  try:
    with timings.phase("train"), writer:       # the last write finishes inside the phase
      final, end, _ = continual.fit(method, params, batches(start), steps, state=state, callback=callback, rng=rng,
                                    sync_every=sync_every, keep_state=keep_state, on_compiled=on_compiled)
  except continual.NonFiniteLoss as e:
    last = next((r["loss"] for r in reversed(history) if math.isfinite(r["loss"])), None)
    raise UsageError(f"{name}: the loss became {e.loss} at step {e.step}"
                     f"{f' (last finite loss {last:.4g})' if last is not None else ' (at the first step)'}. "
                     "Nothing was cached or reported. Try a smaller learning rate (--optim.lr), a smaller penalty "
                     "weight, or float32 (--model.dtype float32); the run stops here rather than report NaN.") from None
  finally:
    bar.close()
  return final, history, end.opt_state
