"""Pytree vector-space helpers: parameters and tangent vectors are plain pytrees of arrays."""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import jax
import jax.flatten_util
import jax.numpy as jnp
import optax

PyTree = Any


def tree_vdot(a: PyTree, b: PyTree) -> jax.Array:
  """Euclidean inner product ⟨a, b⟩ summed over all leaves (complex conjugation not applied)."""
  leaves = jax.tree.leaves(jax.tree.map(lambda x, y: jnp.sum(x * y), a, b))
  return sum(leaves, jnp.zeros((), jnp.result_type(*leaves) if leaves else jnp.float32))


def tree_norm(a: PyTree) -> jax.Array:
  """Frobenius norm of a pytree, ‖a‖ = √⟨a, a⟩."""
  return jnp.sqrt(tree_vdot(a, a))


def tree_bytes(a: PyTree) -> int:
  """The bytes of a pytree's arrays."""
  return sum(x.nbytes for x in jax.tree.leaves(a))


def tree_add(a: PyTree, b: PyTree) -> PyTree:
  return jax.tree.map(jnp.add, a, b)


def tree_sub(a: PyTree, b: PyTree) -> PyTree:
  return jax.tree.map(jnp.subtract, a, b)


def tree_scale(c, a: PyTree) -> PyTree:
  return jax.tree.map(lambda x: (c * x).astype(x.dtype), a)


def tree_axpy(c, x: PyTree, y: PyTree) -> PyTree:
  """c·x + y."""
  return jax.tree.map(lambda u, v: (c * u + v).astype(v.dtype), x, y)


def tree_zeros_like(a: PyTree) -> PyTree:
  return jax.tree.map(jnp.zeros_like, a)


def tree_after(tree: PyTree, dependency: PyTree) -> PyTree:
  """``tree``, each array leaf made to depend on every leaf of ``dependency``, so that XLA computes whatever
  consumes ``tree`` after ``dependency``: e.g. a second forward pass after the first one's backward pass, whose
  temporaries it can then reuse. ``jax.lax.optimization_barrier`` does not order them: XLA's CPU compiler removes
  barriers before it schedules.

  The values are unchanged unless ``dependency``'s entries sum to NaN (a NaN, or infinities of both signs: then
  numbers shift by one and booleans turn true; a step with such gradients has failed already). The cost is one
  reduction over ``dependency``."""
  probe = sum((jnp.sum(x, dtype=jnp.float32) for x in jax.tree.leaves(dependency)),
              jnp.zeros((), jnp.float32))
  failed = probe != probe                        # a comparison XLA cannot fold: it is true for NaN

  def gate(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(gate(jax.random.key_data(x)), impl=jax.random.key_impl(x))
    return x | failed if x.dtype == jnp.bool_ else x + failed.astype(x.dtype)

  return jax.tree.map(gate, tree)


def tree_size(a: PyTree) -> int:
  """Number of scalars in a pytree."""
  return sum(int(x.size) for x in jax.tree.leaves(a))


def path_str(path: Sequence[Any]) -> str:
  """'encoder/layer_0/attention/query/kernel' for a jax key path."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def named_leaves(tree: PyTree) -> list[tuple[str, jax.Array]]:
  """[(path string, leaf)] in tree-flatten order."""
  return [(path_str(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def regex_mask(tree: PyTree, patterns: str | Sequence[str], *, must_match: bool = True) -> PyTree:
  """Boolean pytree: True where the leaf's path ('a/b/kernel') matches any regex (``re.search``).

  Raises:
    ValueError: if ``must_match`` and some pattern matches no leaf (a typo must not silently train nothing).
  """
  patterns = [patterns] if isinstance(patterns, str) else list(patterns)
  compiled = [re.compile(p) for p in patterns]
  names = [n for n, _ in named_leaves(tree)]
  if must_match:
    unmatched = [p.pattern for p in compiled if not any(p.search(n) for n in names)]
    if unmatched:
      sample = ", ".join(names[:8]) + (", …" if len(names) > 8 else "")
      raise ValueError(f"pattern(s) {unmatched} match no parameter; parameter paths look like: {sample}")
  return jax.tree_util.tree_map_with_path(
      lambda p, _: any(c.search(path_str(p)) for c in compiled), tree)


def select(tree: PyTree, mask: PyTree) -> PyTree:
  """The leaves of ``tree`` where ``mask`` is True; the others become ``optax.MaskedNode()`` (an empty subtree)."""
  return jax.tree.map(lambda m, x: x if m else optax.MaskedNode(), mask, tree)


def embed(sub: PyTree, mask: PyTree, like: PyTree) -> PyTree:
  """Inverse of :func:`select`: leaves of ``sub`` where ``mask`` is True, zeros shaped like ``like`` elsewhere."""
  return jax.tree.map(
      lambda m, s, x: s if m else jnp.zeros_like(x), mask, sub, like,
      is_leaf=lambda n: isinstance(n, optax.MaskedNode))


def unmask(sub: PyTree, like: PyTree) -> PyTree:
  """:func:`embed` without the mask: ``sub``'s ``MaskedNode`` leaves (frozen) become zeros shaped like ``like``'s."""
  masked = lambda n: isinstance(n, optax.MaskedNode)
  return jax.tree.map(lambda s, x: jnp.zeros_like(x) if masked(s) else s, sub, like, is_leaf=masked)


def merge(sub: PyTree, mask: PyTree, full: PyTree) -> PyTree:
  """``full`` with the leaves where ``mask`` is True replaced by those of ``sub``."""
  return jax.tree.map(
      lambda m, s, x: s if m else x, mask, sub, full,
      is_leaf=lambda n: isinstance(n, optax.MaskedNode))


def check_same_structure(a: PyTree, b: PyTree, what: str) -> None:
  sa, sb = jax.tree.structure(a), jax.tree.structure(b)
  if sa != sb:
    raise ValueError(f"{what}: pytree structures differ:\n  {sa}\n  {sb}")


def ravel_fn(like: PyTree) -> tuple[Callable[[PyTree], jax.Array], Callable[[jax.Array], PyTree]]:
  """(ravel, unravel) between pytrees shaped like ``like`` and flat vectors."""
  flat, unravel = jax.flatten_util.ravel_pytree(like)
  del flat
  return (lambda t: jax.flatten_util.ravel_pytree(t)[0]), unravel
