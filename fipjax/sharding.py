"""Fully sharded data parallelism (FSDP): parameters, gradients and optimiser state split over a ``fsdp`` mesh axis.

After MaxText: each family names its parameters' dimensions by *logical axes* through a rule table on parameter
paths (``LLAMA_RULES``, ``BERT_RULES``), and ``AXIS_RULES`` maps logical axes to mesh axes. Under FSDP the model
width (``embed``) and the MLP width (``mlp``) are split over ``fsdp`` (the first of a leaf's dimensions that maps to
it and divides evenly); vectors (norms, biases) and anything no rule names stay replicated. Batches are split over
the same axis. XLA's SPMD partitioner then inserts the all-gathers of each layer's weights and the
reduce-scatters of their gradients; the training step is unchanged, its arguments' shardings are the whole change.

    mesh = sharding.fsdp_mesh()
    params = sharding.shard_params(params, mesh, sharding.LLAMA_RULES)
    batch = parallel.shard_batch(batch, mesh)

The runners do this with ``--run.fsdp`` (:class:`fipjax.stages.StageLoop`); docs/scaling.md.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fipjax import tree as tu

PyTree = Any
Rules = Sequence[tuple[str, tuple[str | None, ...]]]
"""``(regex on a parameter's path, its dimensions' logical axes)``, the first match wins."""

FSDP = "fsdp"

LLAMA_RULES: Rules = (
    (r"embed_tokens/embedding$", ("vocab", "embed")),
    (r"lm_head/kernel$", ("embed", "vocab")),
    (r"self_attn/[qkv]_proj/kernel$", ("embed", "heads")),
    (r"self_attn/o_proj/kernel$", ("heads", "embed")),
    (r"mlp/(gate|up)_proj/kernel$", ("embed", "mlp")),
    (r"mlp/down_proj/kernel$", ("mlp", "embed")),
)
"""The Llama family's parameters (Llama, Qwen2, Mistral, SmolLM2): norms and Qwen2's biases are vectors."""

BERT_RULES: Rules = (
    (r"embeddings/(word|position|token_type)_embeddings/embedding$", (None, "embed")),
    (r"attention/self/(query|key|value)/kernel$", ("embed", "heads")),
    (r"attention/output/dense/kernel$", ("heads", "embed")),
    (r"intermediate/dense/kernel$", ("embed", "mlp")),
    (r"output/dense/kernel$", ("mlp", "embed")),
    (r"pooler/dense/kernel$", ("embed", None)),
)
"""BERT's encoder (the classification heads, small, stay replicated)."""

RULES: Rules = LLAMA_RULES + BERT_RULES
"""Every family's rules (their paths do not overlap): what the runners' ``--run.fsdp`` uses."""

AXIS_RULES: Mapping[str, str | None] = {"embed": FSDP, "mlp": FSDP, "heads": None, "vocab": None}
"""Logical axis → mesh axis under FSDP (MaxText's ``logical_axis_rules``): a leaf is split over ``fsdp`` along the
first of its dimensions whose logical axis maps there and whose size the device count divides."""


def fsdp_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over ``devices`` (default: every device of every process) on the ``fsdp`` axis."""
  return Mesh(np.asarray(jax.devices() if devices is None else devices), (FSDP,))


def logical_axes(path: str, rules: Rules) -> tuple[str | None, ...] | None:
  """The logical axes the first matching rule gives ``path``, or None."""
  return next((axes for pattern, axes in rules if re.search(pattern, path)), None)


def partition_spec(path: str, shape: tuple[int, ...], rules: Rules, n: int,
                   axis_rules: Mapping[str, str | None] = AXIS_RULES) -> P:
  """The leaf's ``PartitionSpec`` on a mesh of ``n`` devices along ``fsdp`` (see :data:`AXIS_RULES`)."""
  axes = logical_axes(path, rules)
  if axes is None or len(axes) != len(shape):
    return P()
  for dim, (name, size) in enumerate(zip(axes, shape)):
    if axis_rules.get(name) == FSDP and size % n == 0:
      return P(*([None] * dim), FSDP)
  return P()


def param_specs(params: PyTree, rules: Rules, mesh: Mesh) -> PyTree:
  """Every leaf's ``PartitionSpec`` (the tree of ``params``)."""
  n = mesh.shape[FSDP]
  return jax.tree_util.tree_map_with_path(lambda path, x: partition_spec(tu.path_str(path), np.shape(x), rules, n),
                                          params)


def shard_params(params: PyTree, mesh: Mesh, rules: Rules) -> PyTree:
  """``params`` placed on ``mesh``, split by :func:`param_specs`."""
  specs = param_specs(params, rules, mesh)
  return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params, specs)


def bytes_per_device(tree: PyTree) -> dict[str, int]:
  """``{"total": logical bytes, "max_per_device": the most any one device holds}`` of a placed tree."""
  total, per = 0, {}
  for x in jax.tree.leaves(tree):
    total += x.size * x.dtype.itemsize
    for shard in x.addressable_shards:
      per[shard.device] = per.get(shard.device, 0) + shard.data.size * shard.data.dtype.itemsize
  return {"total": total, "max_per_device": max(per.values(), default=0)}
