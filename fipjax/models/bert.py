"""BERT in Flax NNX, seen by the rest of fipjax as a pure ``apply(params, batch)`` over a plain parameter dict.

Parameter names mirror Hugging Face's (``embeddings/word_embeddings/embedding``,
``encoder/layer/0/attention/self/query/kernel``, ``pooler/dense/kernel``, ``heads/<task>/kernel``) so that
checkpoint conversion (:func:`hf_name`, :func:`from_checkpoint`) is a renaming plus kernel transposes. The family
surface of :mod:`fipjax.models`: ``MODEL_TYPES``, ``Config``, ``hf_name``, ``DROPPED``, ``from_checkpoint``,
``make_apply``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from fipjax.models.common import (CheckpointError, Converted, convert_checkpoint, embed, linear, split_params,
                                  wide)
from fipjax.models.common import param_count  # noqa: F401  (re-exported: one API for all models)

PyTree = Any

MODEL_TYPES = ("bert",)
"""Hugging Face ``model_type`` values this family loads."""
DROPPED = (re.compile(r"^cls\."), re.compile(r"position_ids$"), re.compile(r"^classifier\."))
"""Checkpoint tensors a classifier never uses: pre-training heads, buffers, a checkpoint's own classifier."""

_ACTIVATIONS = {"gelu": lambda x: jax.nn.gelu(x, approximate=False), "gelu_new": jax.nn.gelu,
                "gelu_pytorch_tanh": jax.nn.gelu, "relu": jax.nn.relu, "silu": jax.nn.silu}


@dataclasses.dataclass(frozen=True)
class BertConfig:
  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  pad_token_id: int = 0

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "BertConfig":
    """From a Hugging Face ``config.json`` dict; unknown keys are ignored."""
    names = {f.name for f in dataclasses.fields(cls)}
    cfg = cls(**{k: v for k, v in d.items() if k in names})
    if cfg.hidden_act not in _ACTIVATIONS:
      raise ValueError(f"unsupported hidden_act {cfg.hidden_act!r}; supported: {sorted(_ACTIVATIONS)}")
    if d.get("position_embedding_type", "absolute") != "absolute":
      raise ValueError(f"only absolute position embeddings are supported, got {d['position_embedding_type']!r}")
    return cfg


Config = BertConfig
"""The family's config (``Config.from_dict(config_json)``)."""


def _layer_norm(size: int, eps: float, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(size, epsilon=eps, dtype=dtype, param_dtype=wide(dtype), rngs=rngs)


class Embeddings(nnx.Module):
  def __init__(self, cfg: BertConfig, dtype, rngs: nnx.Rngs):
    self.word_embeddings = embed(cfg.vocab_size, cfg.hidden_size, dtype, rngs)
    self.position_embeddings = embed(cfg.max_position_embeddings, cfg.hidden_size, dtype, rngs)
    self.token_type_embeddings = embed(cfg.type_vocab_size, cfg.hidden_size, dtype, rngs)
    self.LayerNorm = _layer_norm(cfg.hidden_size, cfg.layer_norm_eps, dtype, rngs)
    self.dropout = nnx.Dropout(cfg.hidden_dropout_prob)

  def __call__(self, input_ids, token_type_ids, deterministic, rng):
    positions = jnp.arange(input_ids.shape[-1])[None]
    h = (self.word_embeddings(input_ids) + self.position_embeddings(positions)
         + self.token_type_embeddings(token_type_ids))
    return self.dropout(self.LayerNorm(h), deterministic=deterministic, rngs=rng)


class SelfAttention(nnx.Module):
  def __init__(self, cfg: BertConfig, dtype, rngs: nnx.Rngs):
    self.num_heads = cfg.num_attention_heads
    self.query = linear(cfg.hidden_size, cfg.hidden_size, dtype, rngs)
    self.key = linear(cfg.hidden_size, cfg.hidden_size, dtype, rngs)
    self.value = linear(cfg.hidden_size, cfg.hidden_size, dtype, rngs)
    self.dropout = nnx.Dropout(cfg.attention_probs_dropout_prob)

  def __call__(self, h, bias, deterministic, rng):
    b, t, d = h.shape
    # Heads before tokens ([B, H, T, d/H]) once, so that both products are plain batched matmuls: with the
    # einsums over [B, T, H, d/H] XLA's CPU backend transposes around each, and a MiniLM forward pass on
    # 100 × 128 tokens took 5.1 s instead of 3.8 s.
    split = lambda x: x.reshape(b, t, self.num_heads, d // self.num_heads).transpose(0, 2, 1, 3)
    q, k, v = split(self.query(h)), split(self.key(h)), split(self.value(h))
    scores = (q @ k.swapaxes(-1, -2)).astype(wide(h.dtype)) / jnp.sqrt(d // self.num_heads)
    probs = jax.nn.softmax(scores + bias, axis=-1).astype(h.dtype)
    probs = self.dropout(probs, deterministic=deterministic, rngs=rng)
    return (probs @ v).transpose(0, 2, 1, 3).reshape(b, t, d)


class Output(nnx.Module):
  """Dense → dropout → residual → LayerNorm (HF's BertSelfOutput and BertOutput)."""

  def __init__(self, d_in: int, cfg: BertConfig, dtype, rngs: nnx.Rngs):
    self.dense = linear(d_in, cfg.hidden_size, dtype, rngs)
    self.LayerNorm = _layer_norm(cfg.hidden_size, cfg.layer_norm_eps, dtype, rngs)
    self.dropout = nnx.Dropout(cfg.hidden_dropout_prob)

  def __call__(self, x, residual, deterministic, rng):
    return self.LayerNorm(self.dropout(self.dense(x), deterministic=deterministic, rngs=rng) + residual)


class Attention(nnx.Module):
  def __init__(self, cfg: BertConfig, dtype, rngs: nnx.Rngs):
    self.self = SelfAttention(cfg, dtype, rngs)
    self.output = Output(cfg.hidden_size, cfg, dtype, rngs)


class Intermediate(nnx.Module):
  def __init__(self, cfg: BertConfig, dtype, rngs: nnx.Rngs):
    self.dense = linear(cfg.hidden_size, cfg.intermediate_size, dtype, rngs)
    self.act = cfg.hidden_act

  def __call__(self, h):
    return _ACTIVATIONS[self.act](self.dense(h))


class Layer(nnx.Module):
  def __init__(self, cfg: BertConfig, dtype, rngs: nnx.Rngs):
    self.attention = Attention(cfg, dtype, rngs)
    self.intermediate = Intermediate(cfg, dtype, rngs)
    self.output = Output(cfg.intermediate_size, cfg, dtype, rngs)

  def __call__(self, h, bias, deterministic, rng):
    rngs = [None] * 4 if rng is None else list(jax.random.split(rng, 4))
    a = self.attention.self(h, bias, deterministic, rngs[0])
    h = self.attention.output(a, h, deterministic, rngs[1])
    return self.output(self.intermediate(h), h, deterministic, rngs[2])


class Encoder(nnx.Module):
  def __init__(self, cfg: BertConfig, dtype, remat: bool, rngs: nnx.Rngs):
    self.layer = nnx.List([Layer(cfg, dtype, rngs) for _ in range(cfg.num_hidden_layers)])
    self.remat = remat

  def __call__(self, h, bias, deterministic, rng):
    call = lambda layer, h, bias, rng: layer(h, bias, deterministic, rng)
    if self.remat:
      call = nnx.remat(call)
    for i, layer in enumerate(self.layer):
      h = call(layer, h, bias, None if rng is None else jax.random.fold_in(rng, i))
    return h


class Pooler(nnx.Module):
  def __init__(self, cfg: BertConfig, dtype, rngs: nnx.Rngs):
    self.dense = linear(cfg.hidden_size, cfg.hidden_size, dtype, rngs)

  def __call__(self, h):
    return jnp.tanh(self.dense(h[:, 0]))


class BertModel(nnx.Module):
  """BERT encoder + pooler: ``(input_ids, attention_mask, token_type_ids) -> (last_hidden [B,T,H], pooled [B,H])``.

  Args:
    cfg: architecture.
    dtype: compute dtype (``jnp.bfloat16`` on GPU/TPU, ``jnp.float64`` under x64); parameters, attention softmax
      and head outputs use ``promote_types(dtype, float32)``: float32, or float64 for float64.
    remat: rematerialise each encoder layer in the backward pass (less activation memory, ≈ one more forward).
  """

  def __init__(self, cfg: BertConfig, *, dtype=jnp.float32, remat: bool = False, rngs: nnx.Rngs):
    self.embeddings = Embeddings(cfg, dtype, rngs)
    self.encoder = Encoder(cfg, dtype, remat, rngs)
    self.pooler = Pooler(cfg, dtype, rngs)

  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *, deterministic: bool = True,
               rng: jax.Array | None = None):
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    if not deterministic and rng is None:
      raise ValueError("dropout needs an rng key: pass rng=... or deterministic=True")
    rngs = [None, None] if rng is None else list(jax.random.split(rng))
    h = self.embeddings(input_ids, token_type_ids, deterministic, rngs[0])
    dt = wide(h.dtype)
    bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, jnp.finfo(dt).min).astype(dt)  # [B,1,1,T]
    h = self.encoder(h, bias, deterministic, rngs[1])
    return h, self.pooler(h)


class BertClassifier(nnx.Module):
  """BERT with classification heads on the pooled output.

  ``heads`` maps a head name to its number of labels: ``{"shared": 7}`` (one head over the union of labels, the
  authors' Yelp 0–4 + IMDB 5–6) or ``{"yelp": 5, "imdb": 2}`` (one head per task).
  """

  def __init__(self, cfg: BertConfig, heads: Mapping[str, int], *, dtype=jnp.float32, remat: bool = False,
               classifier_dropout: float | None = None, rngs: nnx.Rngs):
    self.bert = BertModel(cfg, dtype=dtype, remat=remat, rngs=rngs)
    self.dropout = nnx.Dropout(cfg.hidden_dropout_prob if classifier_dropout is None else classifier_dropout)
    self.heads = nnx.Dict({name: linear(cfg.hidden_size, n, dtype, rngs) for name, n in heads.items()})

  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *, deterministic: bool = True,
               rng: jax.Array | None = None) -> dict[str, jax.Array]:
    rngs = [None, None] if rng is None else list(jax.random.split(rng))
    _, pooled = self.bert(input_ids, attention_mask, token_type_ids, deterministic=deterministic, rng=rngs[0])
    pooled = self.dropout(pooled, deterministic=deterministic, rngs=rngs[1])
    return {name: head(pooled).astype(wide(pooled.dtype)) for name, head in self.heads.items()}

  def features(self, input_ids, attention_mask=None, token_type_ids=None, *, deterministic: bool = True,
               rng: jax.Array | None = None) -> jax.Array:
    """The last encoder layer's [CLS] vector ``[B, H]``: the input of the pooler (the split point of
    :func:`make_split`)."""
    rng = None if rng is None else jax.random.split(rng)[0]
    h, _ = self.bert(input_ids, attention_mask, token_type_ids, deterministic=deterministic, rng=rng)
    return h[:, 0]

  def readout(self, cls: jax.Array, *, deterministic: bool = True, rng: jax.Array | None = None):
    """Pooler, dropout and heads on [CLS] vectors ``[B, H]``: ``readout(features(x)) == self(x)``."""
    pooled = jnp.tanh(self.bert.pooler.dense(cls))
    pooled = self.dropout(pooled, deterministic=deterministic, rngs=None if rng is None else jax.random.split(rng)[1])
    return {name: head(pooled).astype(wide(pooled.dtype)) for name, head in self.heads.items()}


def make_apply(graphdef):
  """``apply(params, batch, *, deterministic=True, rng=None)``, pure over the plain params dict.

  ``batch`` is a dict with ``input_ids`` and optionally ``attention_mask``/``token_type_ids`` (``[B, T]``).
  """

  def apply(params, batch: Mapping[str, jax.Array], *, deterministic: bool = True, rng=None):
    model = nnx.merge(graphdef, params)
    return model(batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids"),
                 deterministic=deterministic, rng=rng)

  return apply


def make_split(graphdef):
  """(``features(params, batch, *, deterministic, rng) -> [B, H]``, ``readout(params, h, *, deterministic, rng)
  -> {head: logits}``, regex of the parameters below the split): the classifier cut between its encoder and its
  pooler; ``readout(p, features(p, x, rng=k), rng=k)`` equals ``apply(p, x, rng=k)``."""

  def features(params, batch, *, deterministic: bool = True, rng=None):
    return nnx.merge(graphdef, params).features(batch["input_ids"], batch.get("attention_mask"),
                                                batch.get("token_type_ids"), deterministic=deterministic, rng=rng)

  def readout(params, h, *, deterministic: bool = True, rng=None):
    return nnx.merge(graphdef, params).readout(h, deterministic=deterministic, rng=rng)

  return features, readout, r"^bert/(embeddings|encoder)/"


def hf_name(name: str) -> str:
  """``encoder.layer.0.attention.self.query.weight`` → ``encoder/layer/0/attention/self/query/kernel`` (an old
  ``bert.`` prefix and ``LayerNorm.gamma``/``beta`` are accepted)."""
  name = re.sub(r"^bert\.", "", name)
  name = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", name)
  name = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name)
  parts = name.split(".")
  module, leaf = parts[:-1], parts[-1]
  if leaf == "weight":
    if module[-1] == "LayerNorm":
      leaf = "scale"
    elif module[-1].endswith("_embeddings"):
      leaf = "embedding"
    else:
      leaf = "kernel"
  return "/".join(module + [leaf])


def from_checkpoint(cfg: BertConfig, tensors: Mapping[str, Any], *, heads: Mapping[str, int] | None = None,
                    dtype=jnp.float32, remat: bool = False, seed: int = 0, num_layers: int | None = None) -> Converted:
  """A :class:`BertClassifier` with fresh ``heads`` (or the bare :class:`BertModel` when None) filled from
  Hugging Face-named ``tensors``; strict (:func:`~fipjax.models.common.convert_checkpoint`).

  ``num_layers`` keeps only the first that many encoder layers (the later ones are reported as dropped): a real
  but cheaper network for notebooks and tests. ``seed`` initialises the heads.
  """
  if num_layers is not None:
    if not 1 <= num_layers <= cfg.num_hidden_layers:
      raise CheckpointError(f"num_layers={num_layers}, but the checkpoint has {cfg.num_hidden_layers} encoder "
                            f"layers; choose 1 to {cfg.num_hidden_layers} (or None for all).")
    cfg = dataclasses.replace(cfg, num_hidden_layers=num_layers)
  rngs = nnx.Rngs(seed)
  if heads is None:
    module, prefix, fresh = BertModel(cfg, dtype=dtype, remat=remat, rngs=rngs), "", None
  else:
    module, prefix, fresh = BertClassifier(cfg, heads, dtype=dtype, remat=remat, rngs=rngs), "bert/", r"^heads/"
  graphdef, template = split_params(module)
  later = {k for k in tensors if (m := re.search(r"encoder\.layer\.(\d+)\.", k))
           and int(m.group(1)) >= cfg.num_hidden_layers}
  params, initialised, dropped = convert_checkpoint({k: v for k, v in tensors.items() if k not in later}, template,
                                                   prefix=prefix, fresh=fresh, rename=hf_name, dropped_patterns=DROPPED)
  return Converted(graphdef, params, cfg, initialised, sorted(later) + dropped)
