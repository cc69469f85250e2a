"""Data parallelism: a 1-D ``Mesh`` over every device on the batch axis, parameters replicated (FSDP, parameters
split over the same kind of mesh: :mod:`fipjax.sharding`).

Multi-host ready: call :func:`initialize_distributed` first on each host. Every host builds the same global batch
(batches are a function of seed and step) and :func:`shard_batch` keeps this host's slice of it.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

PyTree = Any


def initialize_distributed() -> None:
  """``jax.distributed.initialize()`` (coordinator discovered from the cluster environment: TPU pods, SLURM…)."""
  jax.distributed.initialize()


def data_mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()), ("data",))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  n = mesh.devices.size
  if batch_size % n:
    raise ValueError(f"batch size {batch_size} is not divisible by the {n} devices of the data mesh; choose a "
                     f"multiple of {n}")


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_batch(batch: PyTree, mesh: Mesh) -> PyTree:
  """Place the global host batch along the mesh's (one) axis (on several hosts, each contributes its own slice);
  an array whose first dimension the device count does not divide (a small replay batch), or a scalar, is
  replicated."""
  sharding = NamedSharding(mesh, P(mesh.axis_names[0]))
  n_proc, idx = jax.process_count(), jax.process_index()

  def place(x):
    x = np.asarray(x)
    if x.ndim == 0 or x.shape[0] % mesh.devices.size:
      return jax.make_array_from_process_local_data(NamedSharding(mesh, P()), x)
    if n_proc > 1:
      per = x.shape[0] // n_proc
      x = x[idx * per:(idx + 1) * per]
    return jax.make_array_from_process_local_data(sharding, x)

  return jax.tree.map(place, batch)
