"""LoRA as a transform on any parameter pytree: ``W' = W + s · A B`` on kernels chosen by path regex.

``A ∈ R^{d_in×r}`` (random), ``B ∈ R^{r×d_out}`` (zeros, so the adapted model starts identical), ``s = α/r``
(or ``α/√r``, rank-stabilised). A kernel with more than two axes is treated as ``[d_in, prod(rest)]``.
Adapters are a pytree shaped like the parameters: ``{"a": A, "b": B}`` at each target leaf and
``optax.MaskedNode()`` elsewhere.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax

from fipjax import tree as tu

PyTree = Any
DEFAULT_TARGETS = (r"(^|/)query/kernel$", r"(^|/)value/kernel$")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """LoRA hyper-parameters (defaults as commonly used: r = 8, α = 16, attention query and value)."""
  targets: Sequence[str] = DEFAULT_TARGETS
  rank: int = 8
  alpha: float = 16.0
  rslora: bool = False
  dropout: float = 0.0

  @property
  def scale(self) -> float:
    return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


def target_mask(params: PyTree, config: LoraConfig) -> PyTree:
  """Boolean pytree of the kernels LoRA adapts; an error if a pattern matches nothing or a non-matrix."""
  mask = tu.regex_mask(params, config.targets)
  bad = [n for (n, x), (_, m) in zip(tu.named_leaves(params), tu.named_leaves(mask)) if m and x.ndim < 2]
  if bad:
    raise ValueError(f"LoRA targets must be kernels with ≥ 2 axes; these matched but are not: {bad}")
  return mask


def init(params: PyTree, key: jax.Array, config: LoraConfig = LoraConfig()) -> PyTree:
  """Adapters for ``params``: A ~ N(0, 1/d_in) (Kaiming-uniform-like scale), B = 0; float32 on a bfloat16 base
  (PEFT's ``autocast_adapter_dtype``), the base's dtype otherwise."""
  mask = target_mask(params, config)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.tree.unflatten(treedef, list(jax.random.split(key, len(leaves))))

  def make(m, w, k):
    if not m:
      return optax.MaskedNode()
    d_in, d_out = w.shape[0], math.prod(w.shape[1:])
    a = jax.random.normal(k, (d_in, config.rank), jnp.float32) / math.sqrt(d_in)
    dtype = jnp.promote_types(w.dtype, jnp.float32)
    return {"a": a.astype(dtype), "b": jnp.zeros((config.rank, d_out), dtype)}

  return jax.tree.map(make, mask, params, keys)


def _is_adapter(node) -> bool:
  return isinstance(node, optax.MaskedNode) or (isinstance(node, dict) and set(node) == {"a", "b"})


def _delta(adapter, w, scale, feature_mask=None):
  """``s·A·B`` shaped like ``w``, in the adapters' dtype: a float32 delta added to a bfloat16 kernel gives a
  float32 kernel (rounding the merged kernel to bfloat16 would drop most of a small delta)."""
  a = adapter["a"] if feature_mask is None else adapter["a"] * feature_mask[:, None]
  return (scale * (a @ adapter["b"])).reshape(w.shape).astype(jnp.promote_types(w.dtype, a.dtype))


def merge(params: PyTree, adapters: PyTree, config: LoraConfig = LoraConfig(), *,
          rng: jax.Array | None = None) -> PyTree:
  """Plain parameters ``W + s·A·B`` (differentiable in both arguments).

  With ``rng`` and ``config.dropout > 0``, adapter-input dropout: each target's input features are dropped
  (and the rest rescaled by 1/(1−p)) in ``A``'s rows, one mask per call shared across the batch, which keeps
  the adapted model a plain set of weights.
  """
  leaves = jax.tree.leaves(adapters, is_leaf=_is_adapter)
  keys = iter(jax.random.split(rng, max(len(leaves), 1))) if rng is not None and config.dropout > 0 else None

  def one(ad, w):
    if isinstance(ad, optax.MaskedNode):
      return w
    fm = None
    if keys is not None:
      keep = jax.random.bernoulli(next(keys), 1.0 - config.dropout, (w.shape[0],))
      fm = keep.astype(ad["a"].dtype) / (1.0 - config.dropout)
    return w + _delta(ad, w, config.scale, fm)

  return jax.tree.map(one, adapters, params, is_leaf=_is_adapter)


def unmerge(merged: PyTree, adapters: PyTree, config: LoraConfig = LoraConfig()) -> PyTree:
  """Inverse of :func:`merge` (up to rounding): ``W' − s·A·B``."""
  return jax.tree.map(lambda ad, w: w if isinstance(ad, optax.MaskedNode) else w - _delta(ad, w, config.scale),
                      adapters, merged, is_leaf=_is_adapter)


def trainable_count(params: PyTree, adapters: PyTree, extra_mask: PyTree | None = None) -> tuple[int, float]:
  """(number of trainable scalars, % of the base model): adapters plus the leaves of ``extra_mask``."""
  n = tu.tree_size(adapters)
  if extra_mask is not None:
    n += sum(int(x.size) for x, m in zip(jax.tree.leaves(params), jax.tree.leaves(extra_mask)) if m)
  return n, 100.0 * n / tu.tree_size(params)


# Train parameters for a LoRA run: {"base": model params (frozen except `extra`), "lora": adapters}.


def train_params(params: PyTree, key: jax.Array, config: LoraConfig = LoraConfig()) -> dict:
  return {"base": params, "lora": init(params, key, config)}


def train_mask(tp: dict, extra: str | Sequence[str] = ()) -> dict:
  """Trainable mask over :func:`train_params`: all adapters, plus base leaves matching the ``extra`` regexes."""
  extra = [extra] if isinstance(extra, str) else list(extra)
  base = tu.regex_mask(tp["base"], extra) if extra else jax.tree.map(lambda _: False, tp["base"])
  return {"base": base, "lora": jax.tree.map(lambda _: True, tp["lora"])}


def to_model(tp: dict, config: LoraConfig = LoraConfig(), rng: jax.Array | None = None) -> PyTree:
  return merge(tp["base"], tp["lora"], config, rng=rng)
