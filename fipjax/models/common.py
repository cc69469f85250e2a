"""What every model family shares: parameter splitting and counting, dtypes, layer initialisers, and the strict
conversion of Hugging Face-named checkpoint tensors into a plain parameter dict."""

from __future__ import annotations

import contextlib
import logging
import re
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fipjax import tree as tu

PyTree = Any


class CheckpointError(ValueError):
  """A checkpoint that cannot be found or does not match the model."""


class Converted(NamedTuple):
  """What a family's ``from_checkpoint`` returns."""
  graphdef: Any
  params: PyTree            # plain nested dict
  config: Any               # the family's Config (as built: e.g. BERT's ``num_layers`` cut applied)
  initialised: list[str]    # model paths not in the checkpoint (fresh heads)
  dropped: list[str]        # checkpoint tensors the model does not use


def split_params(module: nnx.Module):
  """(graphdef, plain nested-dict params) of an NNX module."""
  graphdef, state = nnx.split(module, nnx.Param)
  return graphdef, nnx.to_pure_dict(state)


def param_count(params: PyTree) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))


def wide(dtype):
  """Parameter, softmax and output dtype for compute ``dtype``: float32 for float32/bfloat16, float64 for float64."""
  return jnp.promote_types(dtype, jnp.float32)


def linear(d_in: int, d_out: int, dtype, rngs: nnx.Rngs, *, bias: bool = True) -> nnx.Linear:
  """A dense layer with Hugging Face's N(0, 0.02²) kernel initialisation and ``wide(dtype)`` parameters."""
  return nnx.Linear(d_in, d_out, use_bias=bias, dtype=dtype, param_dtype=wide(dtype),
                    kernel_init=nnx.initializers.normal(0.02), rngs=rngs)


def embed(n: int, d: int, dtype, rngs: nnx.Rngs) -> nnx.Embed:
  """An ``[n, d]`` embedding table, N(0, 0.02²) initialised, ``wide(dtype)`` parameters."""
  return nnx.Embed(n, d, dtype=dtype, param_dtype=wide(dtype), embedding_init=nnx.initializers.normal(0.02),
                   rngs=rngs)


def convert_checkpoint(tensors: Mapping[str, np.ndarray], params: Any, *, prefix: str = "",
                       fresh: str | None = None, rename: Callable[[str], str],
                       dropped_patterns: Sequence[re.Pattern] = ()) -> tuple[Any, list[str], list[str]]:
  """Fill the plain params dict ``params`` (a template) from Hugging Face tensors.

  Args:
    tensors: HF name → array (torch layout: Linear weights ``[out, in]``, transposed here for ``*/kernel``).
    params: template params (concrete or ``jax.ShapeDtypeStruct``; kept only where ``fresh`` allows).
    prefix: path prefix of the converted body inside ``params`` (``'bert/'`` for :class:`bert.BertClassifier`).
    fresh: regex of model paths that may stay freshly initialised (the heads).
    rename: HF tensor name → model path (without ``prefix``): the family's ``hf_name``.
    dropped_patterns: compiled regexes of checkpoint names the model does not use (reported, not an error).

  Returns:
    (params, initialised model paths, dropped checkpoint names).

  Raises:
    CheckpointError: on any unused checkpoint tensor, missing model weight, or shape mismatch.
  """
  converted, dropped = {}, []
  for name, value in tensors.items():
    if any(p.search(name) for p in dropped_patterns):
      dropped.append(name)
      continue
    path = prefix + rename(name)
    value = np.asarray(value)
    if path.endswith("/kernel"):
      value = value.T          # torch Linear [out, in] → Flax kernel [in, out]
    converted[path] = value
  names = dict(tu.named_leaves(params))
  unused = sorted(set(converted) - set(names))
  fresh_re = re.compile(fresh) if fresh else None
  missing = sorted(n for n in names if n not in converted and not (fresh_re and fresh_re.search(n)))
  mismatched = sorted(f"{n}: checkpoint {converted[n].shape} vs model {names[n].shape}"
                      for n in names if n in converted and converted[n].shape != names[n].shape)
  if unused or missing or mismatched:
    msg = ["checkpoint does not match the model:"]
    for what, items in (("unused checkpoint tensors", unused), ("model weights missing from the checkpoint",
                                                                 missing), ("shape mismatches", mismatched)):
      if items:
        msg.append(f"  {what} ({len(items)}): " + ", ".join(items[:20]) + (" …" if len(items) > 20 else ""))
    raise CheckpointError("\n".join(msg))
  initialised = sorted(n for n in names if n not in converted)

  def fill(path, template):
    name = tu.path_str(path)
    return jnp.asarray(converted[name], template.dtype) if name in converted else template

  return jax.tree_util.tree_map_with_path(fill, params), initialised, sorted(dropped)


_NO_TORCH_ADVICE = "PyTorch was not found."


class _DropNoTorchAdvice(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(_NO_TORCH_ADVICE)


@contextlib.contextmanager
def quiet_transformers():
  """Import transformers without its "PyTorch was not found" advice (we only use its tokenizers)."""
  # Without torch, `import transformers` runs `logger.warning_advice("PyTorch was not found. Models won't be
  # available ...")` (transformers/__init__.py) on its "transformers" logger. A filter on that logger drops this
  # one record during the import; all other records pass. (TRANSFORMERS_NO_ADVISORY_WARNINGS would hide every
  # advisory, a lower TRANSFORMERS_VERBOSITY real warnings too.)
  logger, drop = logging.getLogger("transformers"), _DropNoTorchAdvice()
  logger.addFilter(drop)
  try:
    yield
  finally:
    logger.removeFilter(drop)


def token_logprobs(logits: jax.Array, input_ids: jax.Array) -> jax.Array:
  """``log p(x_{t+1} | x_{≤t})`` ``[B, T-1]`` from logits ``[B, T, V]``: the token's logit less the log-normaliser,
  so that no second ``[B, T-1, V]`` array (a full log-softmax) is built beside the logits."""
  logits = logits[:, :-1].astype(wide(logits.dtype))
  picked = jnp.take_along_axis(logits, input_ids[:, 1:, None], -1)[..., 0]
  return picked - jax.nn.logsumexp(logits, -1)
