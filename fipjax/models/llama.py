"""A Llama-family decoder in Flax NNX: RMSNorm, rotary embeddings, SwiGLU, grouped-query attention, a KV cache.

Covers Llama 2/3 (with Llama 3's RoPE scaling), SmolLM, Qwen2 (bias on q/k/v), Qwen3 (RMSNorm on each head's query
and key, a ``head_dim`` of its own), Mistral, and Gemma 2 / Gemma 3's text model (GeGLU, RMSNorm by 1 + w around
attention and MLP, embeddings scaled by √hidden, soft-capped scores and logits, Gemma 3's linear RoPE scaling and
sliding layers' own base), with sliding-window attention (Mistral's ``sliding_window`` on every layer;
Qwen2/Qwen3's ``use_sliding_window`` on the layers ``layer_types`` or ``max_window_layers`` name; Gemma's
alternating layers) in the full forward pass and the KV cache alike. Parameter names mirror Hugging Face's (``model/layers/0/self_attn/q_proj/kernel``,
``model/norm/weight``, ``lm_head/kernel``) so that loading (:func:`hf_name`, :func:`from_checkpoint`; GGUF files
through :mod:`fipjax.models.gguf`) is a renaming plus kernel transposes. The rest of fipjax sees
``make_apply(graphdef)(params, batch) -> logits [B, T, V]`` over a plain parameter dict. The family surface of
:mod:`fipjax.models`: ``MODEL_TYPES``, ``Config``, ``hf_name``, ``DROPPED``, ``from_checkpoint``, ``make_apply``, and
for a causal LM ``generate`` and ``token_logprobs``.

Padding: a row's positions are counted over its unmasked tokens (``cumsum(mask) - 1``), so left-padded prompts
(generation) and right-padded sequences (scoring) give the same logits as the unpadded row.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fipjax.models.common import CheckpointError, Converted, convert_checkpoint, embed, linear, split_params, wide
from fipjax.models.common import param_count, token_logprobs  # noqa: F401  (re-exported: one API for all models)

PyTree = Any

MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text")
"""Hugging Face ``model_type`` values this family loads (GGUF files: ``general.architecture`` llama, qwen2)."""
DROPPED = (re.compile(r"rotary_emb\.inv_freq$"),)
"""Checkpoint buffers the model recomputes."""

LORA_TARGETS = (r"self_attn/(q_proj|v_proj)/kernel$",)
"""LoRA's usual targets in a decoder (query and value projections), for :class:`fipjax.lora.LoraConfig`."""


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int = 49152
  hidden_size: int = 576
  intermediate_size: int = 1536
  num_hidden_layers: int = 30
  num_attention_heads: int = 9
  num_key_value_heads: int = 3
  head_dim: int | None = None            # hidden_size // num_attention_heads when None
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: tuple | None = None      # Llama 3: (("factor", 32.0), ("low_freq_factor", 1.0), ...), hashable
  max_position_embeddings: int = 8192
  tie_word_embeddings: bool = False      # Hugging Face's default for Llama, Qwen2/3 and Mistral configs
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False                  # Qwen3: RMSNorm over each head's query and key, before RoPE
  sliding_window: int | None = None      # a query sees the keys of the last sliding_window slots (itself included)
  layer_types: tuple | None = None       # per layer "full_attention" / "sliding_attention"; None: all sliding
                                         # when sliding_window is set
  # Gemma 2 / 3 (all off for the others):
  hidden_act: str = "silu"               # the MLP's gate: silu (SwiGLU) or gelu_pytorch_tanh (GeGLU)
  norm_offset: float = 0.0               # RMSNorm scales by (offset + weight): Gemma's 1 + w
  embed_scale: bool = False              # embeddings times √hidden_size
  sandwich_norm: bool = False            # norms after attention and MLP too (post_attention, pre/post_feedforward)
  query_pre_attn_scalar: float | None = None     # attention scores scaled by its −½ power (None: head size's)
  attn_logit_softcapping: float | None = None    # scores → c · tanh(scores / c) before the mask
  final_logit_softcapping: float | None = None   # logits → c · tanh(logits / c)
  sliding_rope_theta: float | None = None        # Gemma 3: sliding layers' RoPE base, unscaled (None: as global)

  def __post_init__(self):
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(f"{self.num_attention_heads} attention heads cannot share {self.num_key_value_heads} "
                       "key-value heads evenly (grouped-query attention needs a divisor)")
    if self.sliding_window is not None and self.sliding_window < 1:
      raise ValueError(f"sliding_window {self.sliding_window} must be a positive number of tokens")
    if self.layer_types is not None:
      unknown = sorted(set(self.layer_types) - {"full_attention", "sliding_attention"})
      if unknown or len(self.layer_types) != self.num_hidden_layers:
        raise ValueError(f"layer_types must name full_attention or sliding_attention for each of the "
                         f"{self.num_hidden_layers} layers (got {len(self.layer_types)}; unknown: {unknown or 'none'})")
      if "sliding_attention" in self.layer_types and self.sliding_window is None:
        raise ValueError("layer_types has sliding_attention layers but no sliding_window is set")

  @property
  def head_size(self) -> int:
    return self.head_dim or self.hidden_size // self.num_attention_heads

  @property
  def attention_scale(self) -> float:
    """What attention scores are divided by: √query_pre_attn_scalar (Gemma), else √head_size."""
    return math.sqrt(self.query_pre_attn_scalar or self.head_size)

  @property
  def windows(self) -> tuple:
    """Each layer's sliding window (None: full causal attention)."""
    types = self.layer_types or ("sliding_attention",) * self.num_hidden_layers
    return tuple(self.sliding_window if t == "sliding_attention" else None for t in types)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "LlamaConfig":
    """From a Hugging Face ``config.json`` dict (``model_type`` llama, qwen2, qwen3 or mistral); unknown keys ignored.

    Windows as transformers reads them: Mistral's ``sliding_window`` applies to every layer (``layer_types``
    ignored); Qwen2/Qwen3's only with ``use_sliding_window``, on the layers ``layer_types`` marks
    ``sliding_attention`` or, without ``layer_types``, on layers ``i >= max_window_layers``; Llama has none.
    """
    kind = d.get("model_type", "llama")
    if kind not in MODEL_TYPES:
      raise ValueError(f"model_type {kind!r} is not a Llama-family decoder this port covers "
                       f"({', '.join(MODEL_TYPES)})")
    if kind.startswith("gemma"):
      return cls._gemma(d, kind)
    if d.get("hidden_act", "silu") != "silu":
      raise ValueError(f"hidden_act {d['hidden_act']!r}: only SwiGLU (silu) is supported")
    kw = cls._known(d)
    # transformers' defaults where config.json leaves a key out: sliding_window 4096, max_window_layers 28, Qwen3's
    # head_dim 128.
    if kind == "mistral":
      kw["sliding_window"] = d.get("sliding_window", 4096)
    elif kind in ("qwen2", "qwen3"):
      window = kw["sliding_window"] = d.get("sliding_window", 4096) if d.get("use_sliding_window") else None
      types = d.get("layer_types") or (None if window is None else [
          "sliding_attention" if i >= d.get("max_window_layers", 28) else "full_attention"
          for i in range(d.get("num_hidden_layers", cls.num_hidden_layers))])
      kw["layer_types"] = None if types is None else tuple(types)
    if kind == "qwen3":
      kw.setdefault("head_dim", 128)
    kw.setdefault("num_key_value_heads", d.get("num_attention_heads", cls.num_attention_heads))
    rope = d.get("rope_scaling") or d.get("rope_parameters")
    kw["rope_theta"], kw["rope_scaling"] = _rope(rope, kw.get("rope_theta", cls.rope_theta), ("llama3",))
    if kind == "qwen2":
      kw["qkv_bias"] = True
    elif d.get("attention_bias"):
      kw["qkv_bias"] = kw["o_bias"] = True
    kw["qk_norm"] = kind == "qwen3"
    return cls(**kw)

  @classmethod
  def _known(cls, d: Mapping[str, Any]) -> dict:
    names = {f.name for f in dataclasses.fields(cls)} - {"sliding_window", "layer_types", "qk_norm", "hidden_act"}
    return {k: v for k, v in d.items() if k in names and v is not None}

  @classmethod
  def _gemma(cls, d: Mapping[str, Any], kind: str) -> "LlamaConfig":
    """Gemma 2 (``gemma2``) and Gemma 3's text model (``gemma3_text``) with transformers' defaults: GeGLU, RMSNorm
    by 1 + w, embeddings scaled by √hidden, four norms a layer, alternating sliding and full layers (Gemma 2: every
    other; Gemma 3: five in six), soft-capped scores and logits (Gemma 2), RMSNorm on queries and keys and a RoPE
    base of their own for sliding layers (Gemma 3)."""
    act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ACTIVATIONS:
      raise ValueError(f"hidden_activation {act!r} is not supported ({', '.join(ACTIVATIONS)})")
    gemma3 = kind == "gemma3_text"
    kw = {"head_dim": 256, "num_key_value_heads": 4, "tie_word_embeddings": True, "query_pre_attn_scalar": 256,
          "attn_logit_softcapping": None if gemma3 else 50.0, "final_logit_softcapping": None if gemma3 else 30.0,
          "max_position_embeddings": 131072 if gemma3 else 8192, **cls._known(d)}
    for cap in ("attn_logit_softcapping", "final_logit_softcapping"):
      if cap in d:
        kw[cap] = d[cap]
    layers = d.get("num_hidden_layers", cls.num_hidden_layers)
    pattern = d.get("sliding_window_pattern", 6) if gemma3 else 2
    types = d.get("layer_types") or ["sliding_attention" if (i + 1) % pattern else "full_attention"
                                     for i in range(layers)]
    rope = d.get("rope_parameters") or {}
    full = rope.get("full_attention", rope) if gemma3 else rope
    theta = full.get("rope_theta", d.get("rope_theta", 1e6 if gemma3 else 10000.0))
    kw["rope_theta"], kw["rope_scaling"] = _rope(d.get("rope_scaling") or full, theta, ("linear",))
    local = rope.get("sliding_attention", {}) if gemma3 else {}
    if local.get("rope_type", "default") != "default":
      raise ValueError(f"sliding layers' rope type {local['rope_type']!r} is not supported (default)")
    return cls(**kw, hidden_act=act, norm_offset=1.0, embed_scale=True, sandwich_norm=True, qk_norm=gemma3,
               sliding_window=d.get("sliding_window", 4096), layer_types=tuple(types),
               qkv_bias=bool(d.get("attention_bias")), o_bias=bool(d.get("attention_bias")),
               sliding_rope_theta=local.get("rope_theta", d.get("rope_local_base_freq", 10000.0)) if gemma3 else None)


Config = LlamaConfig
"""The family's config (``Config.from_dict(config_json)``)."""

ACTIVATIONS = {"silu": jax.nn.silu, "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True)}


def _rope(rope: Mapping | None, theta: float, scalings: tuple[str, ...]) -> tuple[float, tuple | None]:
  """(RoPE base, scaling as a hashable tuple or None) from a config's ``rope_scaling`` / ``rope_parameters``;
  ``scalings``: the rope types the family may scale by besides ``default``."""
  if not isinstance(rope, Mapping):
    return theta, None
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind == "default":
    return rope.get("rope_theta", theta), None
  if kind not in scalings:
    raise ValueError(f"rope type {kind!r} is not supported (default, {', '.join(scalings)})")
  return rope.get("rope_theta", theta), tuple(sorted((k, v) for k, v in {**rope, "rope_type": kind}.items()
                                                     if k not in ("rope_theta", "type")))


def rope_frequencies(cfg: LlamaConfig, dtype=jnp.float32, sliding: bool = False) -> jax.Array:
  """Inverse frequencies ``[head_size / 2]`` in ``dtype`` (the parameters' wide dtype: float64 runs are exact), with
  Llama 3's long-context scaling or linear scaling when configured; ``sliding``: a sliding layer's, which Gemma 3
  gives a base of its own, unscaled."""
  d = cfg.head_size
  if sliding and cfg.sliding_rope_theta is not None:
    return 1.0 / (cfg.sliding_rope_theta ** (jnp.arange(0, d, 2, dtype=dtype) / d))
  inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, d, 2, dtype=dtype) / d))
  if cfg.rope_scaling is None:
    return inv
  s = dict(cfg.rope_scaling)
  if s.get("rope_type") == "linear":
    return inv / s["factor"]
  factor, lo, hi = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
  old = s["original_max_position_embeddings"]
  wavelength = 2 * math.pi / inv
  smooth = (old / wavelength - lo) / (hi - lo)
  mid = (1 - smooth) * inv / factor + smooth * inv
  return jnp.where(wavelength > old / lo, inv / factor, jnp.where(wavelength < old / hi, inv, mid))


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotate ``x [B, T, H, D]`` by ``positions [B, T]`` (Hugging Face's rotate-half convention)."""
  angles = positions[..., None].astype(inv_freq.dtype) * inv_freq       # [B, T, D/2]
  cos, sin = (jnp.concatenate([f(angles)] * 2, -1)[:, :, None] for f in (jnp.cos, jnp.sin))
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], -1)
  return (x * cos + rotated * sin).astype(x.dtype)


def layer_frequencies(cfg: LlamaConfig, dtype) -> list[jax.Array]:
  """Each layer's inverse frequencies (:func:`rope_frequencies`; sliding layers may have their own)."""
  made = {w is not None: rope_frequencies(cfg, dtype, sliding=w is not None) for w in set(cfg.windows)}
  return [made[w is not None] for w in cfg.windows]


class RMSNorm(nnx.Module):
  """``x / rms(x) · (offset + weight)`` in the wide dtype (Gemma: offset 1, the weight initialised at 0)."""

  def __init__(self, size: int, eps: float, dtype, offset: float = 0.0):
    self.weight = nnx.Param(jnp.full((size,), 1.0 - offset, wide(dtype)))
    self.eps, self.dtype, self.offset = eps, dtype, offset

  def __call__(self, x):
    x32 = x.astype(wide(self.dtype))
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + self.eps)
    return ((self.weight[...] + self.offset) * x32).astype(self.dtype)


class KVCache(NamedTuple):
  """Keys and values of every layer ``[L, B, S, KV, D]``, which slots hold a token ``[B, S]``, and the number of
  slots written so far (the same for every row: prompts are left-padded)."""
  k: jax.Array
  v: jax.Array
  mask: jax.Array
  length: jax.Array

  @classmethod
  def empty(cls, cfg: LlamaConfig, batch: int, size: int, dtype=jnp.float32) -> "KVCache":
    shape = (cfg.num_hidden_layers, batch, size, cfg.num_key_value_heads, cfg.head_size)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch, size), jnp.int32),
               jnp.zeros((), jnp.int32))


class Attention(nnx.Module):
  def __init__(self, cfg: LlamaConfig, dtype, rngs: nnx.Rngs):
    h, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size
    self.q_proj = linear(cfg.hidden_size, h * d, dtype, rngs, bias=cfg.qkv_bias)
    self.k_proj = linear(cfg.hidden_size, kv * d, dtype, rngs, bias=cfg.qkv_bias)
    self.v_proj = linear(cfg.hidden_size, kv * d, dtype, rngs, bias=cfg.qkv_bias)
    self.o_proj = linear(h * d, cfg.hidden_size, dtype, rngs, bias=cfg.o_bias)
    if cfg.qk_norm:
      self.q_norm = RMSNorm(d, cfg.rms_norm_eps, dtype, cfg.norm_offset)
      self.k_norm = RMSNorm(d, cfg.rms_norm_eps, dtype, cfg.norm_offset)
    self.heads, self.kv_heads, self.head_size, self.qk_norm = h, kv, d, cfg.qk_norm
    self.scale, self.softcap = cfg.attention_scale, cfg.attn_logit_softcapping

  def __call__(self, x, positions, inv_freq, bias, cache_kv=None, offset=None):
    """x ``[B, T, H]``; bias ``[B, 1, 1, T, S]`` over the S key slots; cache_kv ``([B, S, KV, D], ...)`` to write
    the T new keys into at ``offset``, or None (the keys are the T tokens themselves)."""
    b, t, _ = x.shape
    q = self.q_proj(x).reshape(b, t, self.heads, self.head_size)
    k = self.k_proj(x).reshape(b, t, self.kv_heads, self.head_size)
    if self.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
    v = self.v_proj(x).reshape(b, t, self.kv_heads, self.head_size)
    if cache_kv is not None:
      k = jax.lax.dynamic_update_slice_in_dim(cache_kv[0], k.astype(cache_kv[0].dtype), offset, axis=1)
      v = jax.lax.dynamic_update_slice_in_dim(cache_kv[1], v.astype(cache_kv[1].dtype), offset, axis=1)
    groups = self.heads // self.kv_heads
    q = q.reshape(b, t, self.kv_heads, groups, self.head_size)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k.astype(q.dtype)).astype(wide(x.dtype))
    probs = jax.nn.softmax(softcap(scores / self.scale, self.softcap) + bias, axis=-1).astype(x.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(x.dtype)).reshape(b, t, -1)
    return self.o_proj(out), (k, v)


class MLP(nnx.Module):
  def __init__(self, cfg: LlamaConfig, dtype, rngs: nnx.Rngs):
    self.gate_proj = linear(cfg.hidden_size, cfg.intermediate_size, dtype, rngs, bias=cfg.mlp_bias)
    self.up_proj = linear(cfg.hidden_size, cfg.intermediate_size, dtype, rngs, bias=cfg.mlp_bias)
    self.down_proj = linear(cfg.intermediate_size, cfg.hidden_size, dtype, rngs, bias=cfg.mlp_bias)
    self.act = ACTIVATIONS[cfg.hidden_act]

  def __call__(self, x):
    return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
  """Pre-norm attention and MLP, each added to the residual. Llama's ``post_attention_layernorm`` is the MLP's
  input norm; Gemma's (``sandwich_norm``) normalises the attention's output, and ``pre_feedforward_layernorm`` /
  ``post_feedforward_layernorm`` wrap the MLP."""

  def __init__(self, cfg: LlamaConfig, dtype, rngs: nnx.Rngs):
    norm = lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, cfg.norm_offset)
    self.input_layernorm = norm()
    self.self_attn = Attention(cfg, dtype, rngs)
    self.post_attention_layernorm = norm()
    self.mlp = MLP(cfg, dtype, rngs)
    if cfg.sandwich_norm:
      self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()
    self.sandwich = cfg.sandwich_norm

  def __call__(self, h, positions, inv_freq, bias, cache_kv=None, offset=None):
    a, kv = self.self_attn(self.input_layernorm(h), positions, inv_freq, bias, cache_kv, offset)
    if not self.sandwich:
      h = h + a
      return h + self.mlp(self.post_attention_layernorm(h)), kv
    h = h + self.post_attention_layernorm(a)
    return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h))), kv


class Body(nnx.Module):
  def __init__(self, cfg: LlamaConfig, dtype, rngs: nnx.Rngs):
    self.embed_tokens = embed(cfg.vocab_size, cfg.hidden_size, dtype, rngs)
    self.layers = nnx.List([DecoderLayer(cfg, dtype, rngs) for _ in range(cfg.num_hidden_layers)])
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, cfg.norm_offset)


class LlamaForCausalLM(nnx.Module):
  """``(input_ids [B, T], attention_mask [B, T]) -> logits [B, T, V]`` (``promote_types(dtype, float32)``).

  Args:
    cfg: architecture.
    dtype: compute dtype; parameters, norms, softmax and logits are float32 (float64 for float64).
    remat: rematerialise each decoder layer in the backward pass.
  """

  def __init__(self, cfg: LlamaConfig, *, dtype=jnp.float32, remat: bool = False, rngs: nnx.Rngs):
    self.model = Body(cfg, dtype, rngs)
    if not cfg.tie_word_embeddings:
      self.lm_head = linear(cfg.hidden_size, cfg.vocab_size, dtype, rngs, bias=False)
    self.cfg, self.remat = cfg, remat

  def _embed(self, input_ids):
    h = self.model.embed_tokens(input_ids)
    # Gemma: √hidden in the compute dtype, as transformers casts it to the weights' (55.4256 → 55.5 in bfloat16)
    return h * jnp.asarray(math.sqrt(self.cfg.hidden_size), h.dtype) if self.cfg.embed_scale else h

  def _logits(self, h):
    if self.cfg.tie_word_embeddings:
      logits = self.model.embed_tokens.attend(h).astype(wide(h.dtype))
    else:
      logits = self.lm_head(h).astype(wide(h.dtype))
    return softcap(logits, self.cfg.final_logit_softcapping)

  def __call__(self, input_ids, attention_mask=None):
    mask = jnp.ones_like(input_ids) if attention_mask is None else attention_mask
    positions = jnp.maximum(jnp.cumsum(mask, -1) - 1, 0)
    h = self._embed(input_ids)
    biases = _biases(self.cfg, jnp.arange(input_ids.shape[1]), mask, h.dtype)
    call = lambda layer, h, bias, inv_freq: layer(h, positions, inv_freq, bias)[0]
    if self.remat:
      call = nnx.remat(call)
    for layer, bias, inv_freq in zip(self.model.layers, biases, layer_frequencies(self.cfg, wide(h.dtype))):
      h = call(layer, h, bias, inv_freq)
    return self._logits(self.model.norm(h))

  def extend(self, input_ids, attention_mask, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Run ``input_ids [B, T]`` after the tokens in ``cache``: (logits ``[B, T, V]``, the cache with them added).

    A prompt is one call on an empty cache (left-padded, ``attention_mask`` 0 on the padding); each generated
    token is one more call with ``T = 1``. Equal to :meth:`__call__` on the concatenated tokens.
    """
    t = input_ids.shape[1]
    slot_mask = jax.lax.dynamic_update_slice_in_dim(cache.mask, attention_mask.astype(jnp.int32), cache.length, 1)
    positions = (jnp.sum(cache.mask, -1, keepdims=True) + jnp.cumsum(attention_mask, -1) - 1)
    positions = jnp.maximum(positions, 0)
    h = self._embed(input_ids)
    biases = _biases(self.cfg, cache.length + jnp.arange(t), slot_mask, h.dtype)
    ks, vs = [], []
    for i, (layer, bias, inv_freq) in enumerate(zip(self.model.layers, biases,
                                                      layer_frequencies(self.cfg, wide(h.dtype)))):
      h, (k, v) = layer(h, positions, inv_freq, bias, (cache.k[i], cache.v[i]), cache.length)
      ks.append(k)
      vs.append(v)
    new = KVCache(jnp.stack(ks), jnp.stack(vs), slot_mask, cache.length + t)
    return self._logits(self.model.norm(h)), new


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
  """``cap · tanh(x / cap)`` (Gemma 2's soft-capping), or ``x`` when ``cap`` is None."""
  return x if cap is None else jnp.tanh(x / cap) * cap


def _biases(cfg: LlamaConfig, query_slots: jax.Array, key_mask: jax.Array, dtype) -> list[jax.Array]:
  """Each layer's attention bias ``[B, 1, 1, T, S]``: query slot ``q`` (``query_slots [T]``) sees key slot ``s`` of
  ``key_mask [B, S]`` when ``0 <= q - s < window`` (transformers' ``kv_idx > q_idx - sliding_window``).

  Windows count slots, not positions, as transformers does; left padding precedes every token, so a row's window
  holds the same tokens either way."""
  behind = query_slots[:, None] - jnp.arange(key_mask.shape[1])[None, :]          # [T, S]
  allowed = lambda w: (behind >= 0) if w is None else (behind >= 0) & (behind < w)
  made = {w: _bias(allowed(w)[None] & (key_mask[:, None, :] > 0), dtype) for w in set(cfg.windows)}
  return [made[w] for w in cfg.windows]


def _bias(allowed: jax.Array, dtype) -> jax.Array:
  """Additive attention bias ``[B, 1, 1, T, S]`` from a boolean ``[B, T, S]`` (a row that may see nothing, a
  left-padding query, attends uniformly instead of producing NaN)."""
  dt = wide(dtype)
  return jnp.where(allowed, 0.0, jnp.finfo(dt).min).astype(dt)[:, None, None]


def make_apply(graphdef):
  """``apply(params, batch) -> logits [B, T, V]``, pure over the plain params dict; ``batch`` holds
  ``input_ids`` and optionally ``attention_mask`` ``[B, T]``."""

  def apply(params, batch: Mapping[str, jax.Array], **_):
    return nnx.merge(graphdef, params)(batch["input_ids"], batch.get("attention_mask"))

  return apply


def hf_name(name: str) -> str:
  """``model.layers.0.self_attn.q_proj.weight`` → ``model/layers/0/self_attn/q_proj/kernel``; norms keep
  ``weight``; ``model.embed_tokens.weight`` → ``model/embed_tokens/embedding``."""
  parts = name.split(".")
  module, leaf = parts[:-1], parts[-1]
  if leaf == "weight" and not module[-1].endswith("norm"):
    leaf = "embedding" if module[-1] == "embed_tokens" else "kernel"
  return "/".join(module + [leaf])


def from_checkpoint(cfg: LlamaConfig, tensors: Mapping[str, Any], *, dtype=jnp.float32,
                    remat: bool = False) -> Converted:
  """A :class:`LlamaForCausalLM` filled from Hugging Face-named ``tensors``; strict: every tensor lands in the
  model and every weight comes from the checkpoint (a tied model's stored copy of the embedding is dropped)."""
  dropped = DROPPED
  if cfg.tie_word_embeddings and "lm_head.weight" in tensors:
    # Some tied checkpoints store the head's copy of the embedding too; a different head is not a copy.
    if not np.array_equal(tensors["lm_head.weight"], tensors.get("model.embed_tokens.weight")):
      raise CheckpointError("the config ties the output head to the embedding, but the checkpoint's lm_head.weight "
                            "differs from model.embed_tokens.weight; set tie_word_embeddings to false in "
                            "config.json if the head is trained on its own.")
    dropped = dropped + (re.compile(r"^lm_head\.weight$"),)
  # Every weight comes from the file: an abstract template (shapes and dtypes) spares a random initialisation.
  abstract = nnx.eval_shape(lambda: LlamaForCausalLM(cfg, dtype=dtype, remat=remat, rngs=nnx.Rngs(0)))
  graphdef, template = split_params(abstract)
  params, initialised, dropped = convert_checkpoint(tensors, template, rename=hf_name, dropped_patterns=dropped)
  return Converted(graphdef, params, cfg, initialised, dropped)


class Generated(NamedTuple):
  tokens: jax.Array     # [B, N] new tokens (pad_id after a row's end token)
  mask: jax.Array       # [B, N] 1 for tokens up to and including the end token
  logprobs: jax.Array   # [B, N] log-probability of each sampled token under the sampling distribution


def generate(graphdef, params, input_ids, attention_mask, key, *, max_new_tokens: int, eos_id: int | None,
             pad_id: int = 0, temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False,
             cache_dtype=None) -> Generated:
  """Sample continuations of left-padded prompts ``[B, P]`` with a KV cache (jit-able; a row stops at
  ``eos_id``, the loop once every row has).

  ``greedy`` takes the argmax; otherwise tokens are drawn from softmax(logits / temperature) restricted to the
  smallest set of tokens whose probability reaches ``top_p`` (nucleus sampling). The KV cache is kept in
  ``cache_dtype`` (default: the model's compute dtype, bfloat16 halving it).
  """
  if not (0 < top_p <= 1 and temperature > 0):
    raise ValueError(f"generate needs 0 < top_p ≤ 1 and temperature > 0 (got top_p={top_p}, "
                     f"temperature={temperature}); for the most likely token pass greedy=True")
  model = nnx.merge(graphdef, params)
  b, p = input_ids.shape
  cache_dtype = model.model.embed_tokens.dtype if cache_dtype is None else cache_dtype
  cache = KVCache.empty(model.cfg, b, p + max_new_tokens, cache_dtype)
  logits, cache = model.extend(input_ids, attention_mask, cache)

  def pick(logits, key):
    scaled = logits / temperature
    if top_p < 1.0:
      order = jnp.sort(scaled, -1)[:, ::-1]
      probs = jax.nn.softmax(order, -1)
      keep = jnp.cumsum(probs, -1) - probs < top_p                          # always keeps the top token
      cutoff = jnp.min(jnp.where(keep, order, jnp.inf), -1, keepdims=True)
      scaled = jnp.where(scaled >= cutoff, scaled, -jnp.inf)
    token = jnp.argmax(scaled, -1) if greedy else jax.random.categorical(key, scaled)
    return token, jnp.take_along_axis(jax.nn.log_softmax(scaled, -1), token[:, None], -1)[:, 0]

  keys = jax.random.split(key, max_new_tokens)

  def step(carry):
    i, logits, cache, done, out = carry
    token, logprob = pick(logits, keys[i])
    token = jnp.where(done, pad_id, token)
    live = ~done
    done = done | (token == eos_id) if eos_id is not None else done
    logits, cache = model.extend(token[:, None], live[:, None].astype(jnp.int32), cache)
    out = Generated(out.tokens.at[:, i].set(token), out.mask.at[:, i].set(live.astype(jnp.int32)),
                    out.logprobs.at[:, i].set(jnp.where(live, logprob, 0.0)))
    return i + 1, logits[:, -1], cache, done, out

  # Stops once every row has produced eos_id: the slots left hold what later steps would write (pad, mask 0).
  out = Generated(jnp.full((b, max_new_tokens), pad_id, jnp.int32), jnp.zeros((b, max_new_tokens), jnp.int32),
                  jnp.zeros((b, max_new_tokens), wide(logits.dtype)))
  init = (jnp.zeros((), jnp.int32), logits[:, -1], cache, jnp.zeros((b,), bool), out)
  return jax.lax.while_loop(lambda c: (c[0] < max_new_tokens) & ~jnp.all(c[3]), step, init)[-1]


