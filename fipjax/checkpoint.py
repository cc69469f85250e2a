"""Orbax checkpoints of arbitrary pytrees (parameters, optimiser states with masked nodes), plus JSON metadata.

A pytree is stored as its flat list of leaves; restoring needs a template with the same structure (the state a
fresh run would build), which keeps optax's empty ``MaskedNode`` subtrees out of the file format.
"""

from __future__ import annotations

import errno
import json
import pathlib
import pickle
import shutil
import threading
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding

from fipjax import memory

PyTree = Any
_META = "meta.json"
_STRUCTURE = "structure.pkl"


def save(path: str | pathlib.Path, tree: PyTree, meta: dict | None = None, *, keep_structure: bool = False) -> None:
  """Write ``tree`` (and ``meta``) to the directory ``path``; complete once ``meta.json`` exists. With
  ``keep_structure`` the tree's nesting (dicts, lists, tuples) is stored too, for :func:`restore_tree`."""
  path = pathlib.Path(path).absolute()
  if path.exists():
    shutil.rmtree(path)
  leaves = {f"{i:06d}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(tree))}
  check_free_space(path.parent, sum(x.nbytes for x in leaves.values()))
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path / "tree", leaves)
  checkpointer.wait_until_finished()
  if keep_structure:
    skeleton = jax.tree.unflatten(jax.tree.structure(tree), range(len(leaves)))
    (path / _STRUCTURE).write_bytes(pickle.dumps(skeleton))
  tmp = path / (_META + ".tmp")
  tmp.write_text(json.dumps({"num_leaves": len(leaves), **(meta or {})}))
  tmp.rename(path / _META)   # the marker of a complete checkpoint


def check_free_space(directory: pathlib.Path, nbytes: int) -> None:
  """Raise ``OSError(ENOSPC)`` before writing ``nbytes`` (plus 10%) where the disk has less free: orbax's writer
  threads would otherwise fail one by one, each with its own traceback."""
  directory = pathlib.Path(directory)
  while not directory.exists():
    directory = directory.parent
  free = shutil.disk_usage(directory).free
  if free < 1.1 * nbytes + (1 << 20):
    raise OSError(errno.ENOSPC, f"No space left on device: a checkpoint of {nbytes / 2**20:.1f} MiB does not fit "
                  f"in the {free / 2**20:.1f} MiB free", str(directory))


def remove(path: str | pathlib.Path) -> None:
  """Delete a checkpoint directory, whole."""
  shutil.rmtree(path, ignore_errors=True)


def is_complete(path: str | pathlib.Path) -> bool:
  return (pathlib.Path(path) / _META).exists()


def load_meta(path: str | pathlib.Path) -> dict:
  return json.loads((pathlib.Path(path) / _META).read_text())


def restore(path: str | pathlib.Path, template: PyTree) -> PyTree:
  """The tree saved at ``path``, with the structure of ``template`` (dtypes and shapes checked), each leaf placed
  as the template's is where that is on a mesh (:mod:`fipjax.sharding`): a checkpoint written on any number of
  devices restores onto this process's mesh."""
  path = pathlib.Path(path).absolute()
  leaves, treedef = jax.tree.flatten(template)
  stored = ocp.StandardCheckpointer().restore(path / "tree")
  if len(stored) != len(leaves):
    raise ValueError(f"checkpoint {path} holds {len(stored)} arrays, the model expects {len(leaves)}: was it "
                     "written by a different configuration?")
  restored = []
  for i, like in enumerate(leaves):
    x = stored[f"{i:06d}"]
    if tuple(x.shape) != tuple(np.shape(like)):
      raise ValueError(f"checkpoint {path}: array {i} has shape {x.shape}, expected {np.shape(like)}")
    x = np.asarray(x, dtype=like.dtype if hasattr(like, "dtype") else jax.numpy.asarray(like).dtype)
    placed = isinstance(getattr(like, "sharding", None), NamedSharding)
    restored.append(jax.device_put(x, like.sharding) if placed else jax.numpy.asarray(x))
  return jax.tree.unflatten(treedef, restored)


def restore_tree(path: str | pathlib.Path) -> PyTree:
  """A tree saved with ``keep_structure=True``, without a template."""
  path = pathlib.Path(path).absolute()
  skeleton = pickle.loads((path / _STRUCTURE).read_bytes())
  stored = ocp.StandardCheckpointer().restore(path / "tree")
  return jax.tree.map(lambda i: jax.numpy.asarray(stored[f"{i:06d}"]), skeleton)


def latest_step(directory: str | pathlib.Path) -> pathlib.Path | None:
  """The complete ``step_<n>`` checkpoint with the largest n under ``directory``, or None."""
  directory = pathlib.Path(directory)
  if not directory.exists():
    return None
  steps = [p for p in directory.glob("step_*") if is_complete(p)]
  return max(steps, key=lambda p: int(p.name.split("_")[1]), default=None)


def save_step(directory: str | pathlib.Path, step: int, tree: PyTree, meta: dict | None = None,
              keep: int = 1) -> pathlib.Path:
  """Save ``step_<step>`` under ``directory`` and delete older steps beyond the newest ``keep``."""
  directory = pathlib.Path(directory)
  path = directory / f"step_{step:08d}"
  save(path, tree, {"step": step, **(meta or {})})
  complete = sorted((p for p in directory.glob("step_*") if is_complete(p)), key=lambda p: int(p.name[5:]))
  for old in complete[:-keep]:
    shutil.rmtree(old, ignore_errors=True)
  return path


class Writer:
  """:func:`save_step` on a background thread, one checkpoint at a time: ``submit`` returns at once (after the
  previous write has finished), so training goes on while a checkpoint is written. A write that fails raises at the
  next ``submit`` or ``wait``; leaving a ``with Writer() as w:`` block waits for the last write. A kill mid-write
  leaves an incomplete directory (no ``meta.json``) beside the previous complete checkpoint, which
  :func:`latest_step` returns."""

  def __init__(self):
    self._thread: threading.Thread | None = None
    self._error: BaseException | None = None

  def submit(self, directory: str | pathlib.Path, step: int, tree: PyTree, meta: dict | None = None,
             keep: int = 1) -> None:
    """Write ``tree`` and ``meta`` as ``step_<step>``, as they are now: the arrays are copied to the host, the
    metadata to JSON, before this returns (the caller may go on changing its lists and reusing device buffers)."""
    self.wait()
    held = [jax.device_get(tree)]      # popped by the write: freed once written
    meta = json.loads(json.dumps(meta or {}))

    def write():
      try:
        save_step(directory, step, held.pop(), meta, keep)
      except BaseException as e:       # raised in the caller's thread by wait()
        self._error = e
      finally:
        memory.release()               # the host copy and orbax's own, freed: not left resident for the run

    self._thread = threading.Thread(target=write, name=f"checkpoint-step-{step}")
    self._thread.start()

  def wait(self) -> None:
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    if self._error is not None:
      error, self._error = self._error, None
      raise error

  def __enter__(self) -> "Writer":
    return self

  def __exit__(self, *exc) -> None:
    self.wait()
