"""Export for serving: a decoder's parameters as a Hugging Face directory that transformers' ``AutoModelForCausalLM``
loads (``config.json``, ``model.safetensors``, the tokenizer's files with its chat template).

Weights are written under Hugging Face's names (the family's ``hf_name`` map inverted: ``a/b/kernel`` →
``a.b.weight``, kernels transposed back to torch's ``[out, in]``), in float32, or in bfloat16 where every floating
parameter is bfloat16 (``--param-dtype bfloat16``: the policy that was evaluated, at half the size); a tied output
head is not written twice. The directory appears whole: it is written under a temporary name and renamed.

For LoRA methods the policy is ``W_base + Σ_k ΔW_k`` on the adapted kernels only; :func:`export_peft` writes that
difference as a PEFT LoRA adapter (``adapter_config.json``, ``adapter_model.safetensors``) that
``PeftModel.from_pretrained(base, dir)`` loads onto the base model: each kernel's ``ΔW`` factored exactly by SVD at
its numerical rank (≤ months × r). :class:`Exporter` puts it in ``<name>/adapter/``: transformers would load a
directory with ``adapter_config.json`` at its top as an adapter, not as the full model.
"""

from __future__ import annotations

import json
import pathlib
import re
import shutil
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from fipjax import tree as tu
from fipjax.models.hub import Loaded


def export_dtype(params: Mapping) -> np.dtype:
  """The dtype the weights are written in: a narrow dtype (bfloat16) where every floating parameter has it, else
  float32 (a LoRA policy's merged kernels on a bfloat16 base are float32)."""
  dtypes = {np.dtype(x.dtype) for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.floating)}
  return dtypes.pop() if len(dtypes) == 1 and next(iter(dtypes)).itemsize < 4 else np.dtype(np.float32)


def hf_tensors(params: Mapping) -> dict[str, np.ndarray]:
  """Flax parameter paths → Hugging Face tensor names and torch layouts (in :func:`export_dtype`)."""
  out, dtype = {}, export_dtype(params)
  for path, value in tu.named_leaves(params):
    parts = path.split("/")
    value = np.asarray(value, dtype)
    if parts[-1] == "kernel":
      value = value.T
    if parts[-1] in ("kernel", "embedding"):
      parts[-1] = "weight"
    out[".".join(parts)] = np.ascontiguousarray(value)
  return out


ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}


def model_type(cfg) -> str:
  """The transformers ``model_type`` of a Llama-family config: Gemma 3 / Gemma 2 where norms wrap attention and MLP
  (with / without normalised queries and keys), Qwen3 where the heads' queries and keys are normalised, Qwen2 where
  q/k/v carry biases, Mistral where a window is set, else Llama."""
  if cfg.sandwich_norm:
    return "gemma3_text" if cfg.qk_norm else "gemma2"
  return ("qwen3" if cfg.qk_norm else "qwen2" if cfg.qkv_bias and not cfg.o_bias else
          "mistral" if cfg.sliding_window is not None else "llama")


def llama_config(cfg, tokenizer) -> dict[str, Any]:
  """A transformers ``config.json`` for a Llama-family :class:`fipjax.models.llama.LlamaConfig` (:func:`model_type`),
  which ``LlamaConfig.from_dict`` reads back to ``cfg``."""
  kind = model_type(cfg)
  out = {"architectures": [ARCHITECTURES[kind]], "model_type": kind, "vocab_size": cfg.vocab_size,
         "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
         "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
         "num_key_value_heads": cfg.num_key_value_heads,
         "head_dim": cfg.head_dim or cfg.hidden_size // cfg.num_attention_heads, "rms_norm_eps": cfg.rms_norm_eps,
         "rope_theta": cfg.rope_theta, "max_position_embeddings": cfg.max_position_embeddings,
         "tie_word_embeddings": cfg.tie_word_embeddings, "hidden_act": cfg.hidden_act, "torch_dtype": "float32",
         "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
         "pad_token_id": tokenizer.pad_token_id}
  if kind.startswith("gemma"):
    return {**out, **_gemma_config(cfg, kind)}
  if cfg.rope_scaling is not None:
    out["rope_scaling"] = {"rope_type": "llama3", **dict(cfg.rope_scaling)}
  if kind in ("llama", "qwen3"):
    out["attention_bias"] = cfg.qkv_bias
  if kind == "llama":
    out["mlp_bias"] = cfg.mlp_bias
  if cfg.sliding_window is not None:
    out["sliding_window"] = cfg.sliding_window
    if kind != "mistral":
      out["use_sliding_window"] = True
      if cfg.layer_types is not None:
        out["layer_types"] = list(cfg.layer_types)
  return out


def _gemma_config(cfg, kind: str) -> dict[str, Any]:
  full = {"rope_type": "default", "rope_theta": cfg.rope_theta, **dict(cfg.rope_scaling or ())}
  rope = full if kind == "gemma2" else {
      "full_attention": full, "sliding_attention": {"rope_type": "default", "rope_theta": cfg.sliding_rope_theta}}
  return {"hidden_activation": cfg.hidden_act, "query_pre_attn_scalar": cfg.query_pre_attn_scalar,
          "attn_logit_softcapping": cfg.attn_logit_softcapping,
          "final_logit_softcapping": cfg.final_logit_softcapping, "sliding_window": cfg.sliding_window,
          "layer_types": list(cfg.layer_types), "attention_bias": cfg.qkv_bias, "rope_parameters": rope}


def _write_whole(out: pathlib.Path, write: Callable[[pathlib.Path], None]) -> pathlib.Path:
  """``write(tmp)`` fills ``out.tmp``, which then replaces ``out`` (an earlier export of the same name); where
  ``write`` fails, ``out`` is left as it was and ``out.tmp`` removed."""
  out = pathlib.Path(out)
  tmp = out.with_name(out.name + ".tmp")
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  try:
    write(tmp)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  shutil.rmtree(out, ignore_errors=True)
  tmp.rename(out)
  return out


def save_pretrained(out: pathlib.Path, params: Mapping, config: Mapping[str, Any], tokenizer, *,
                    also: Callable[[pathlib.Path], Any] | None = None) -> pathlib.Path:
  """Write ``out`` whole (``config.json``, ``model.safetensors``, the tokenizer's files, and whatever ``also(dir)``
  adds); replaces an earlier export of the same name (a resumed run writes the same month again)."""
  from safetensors.numpy import save_file

  def write(tmp):
    tensors = hf_tensors(params)
    if config.get("tie_word_embeddings"):
      tensors.pop("lm_head.weight", None)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    dtype = {"torch_dtype": str(export_dtype(params))} if "torch_dtype" in config else {}
    (tmp / "config.json").write_text(json.dumps({**config, **dtype}, indent=2))
    tokenizer.save_pretrained(str(tmp))
    if also is not None:
      also(tmp)

  return _write_whole(out, write)


# ---------------------------------------------------------------------------------------------------------------
# PEFT adapters.

PEFT_PREFIX = "base_model.model."     # PeftModelForCausalLM's names: base_model (LoraModel) . model (the LM) . …


def low_rank(delta: np.ndarray, floor: float = 0.0) -> tuple[np.ndarray, np.ndarray, float]:
  """``delta`` [in, out] (a Flax kernel's change) = ``(B A)ᵀ`` exactly at its numerical rank k: (A [k, in],
  B [out, k], the largest singular value dropped). SVD in float64; kept are the singular values above
  ``max(floor, σ_max · max(in, out) · eps64)`` (numpy's ``matrix_rank`` tolerance), split √σ to each factor."""
  u, s, vt = np.linalg.svd(np.asarray(delta, np.float64), full_matrices=False)
  tol = max(floor, (s[0] if s.size else 0.0) * max(delta.shape) * np.finfo(np.float64).eps)
  k = int(np.sum(s > tol))
  root = np.sqrt(s[:k])
  return root[:, None] * u[:, :k].T, vt[:k].T * root[None, :], float(s[k]) if k < s.size else 0.0


def kernel_deltas(base_params: Mapping, params: Mapping, targets: str) -> tuple[dict[str, tuple], float]:
  """``({path: (A [k, in], B [out, k])}, the largest singular value left out)``: each kernel matching ``targets`` (a
  regex over paths like ``model/layers/0/self_attn/q_proj/kernel``) as ``W_base + (B A)ᵀ`` (:func:`low_rank` of
  ``ΔW = W − W_base``; singular values below ``eps(dtype) · ‖W‖_F`` left out: each month's merge rounds ``W`` to its
  dtype, a full-rank change of spectral norm under the weights' own resolution). Raises ``ValueError`` where a
  non-target parameter differs (no low-rank change would reproduce the policy), the trees differ, or a target is
  not a 2-D kernel."""
  base, new = dict(tu.named_leaves(base_params)), dict(tu.named_leaves(params))
  if set(base) != set(new):
    raise ValueError(f"the policy's parameters are not the base model's: {sorted(set(base) ^ set(new))[0]} is in "
                     "only one of them")
  pattern = re.compile(targets)
  factors, dropped = {}, 0.0
  for path, w in new.items():
    w, w0 = np.asarray(w), np.asarray(base[path])
    if w.shape != w0.shape:
      raise ValueError(f"{path} has shape {w.shape} in the policy but {w0.shape} in the base model")
    if not pattern.search(path):
      if not np.array_equal(w, w0):
        raise ValueError(f"{path} differs between the base model and the policy but is not a LoRA target "
                         f"({targets!r}): a PEFT adapter on the base would not reproduce the policy")
      continue
    if not path.endswith("/kernel") or w.ndim != 2:
      raise ValueError(f"{path} matches the LoRA targets {targets!r} but is not a 2-D kernel; PEFT's LoRA adapts "
                       "linear layers only")
    floor = float(np.finfo(w.dtype).eps * np.linalg.norm(w.astype(np.float64)))
    a, b, left = low_rank(w.astype(np.float64) - w0.astype(np.float64), floor)
    factors[path], dropped = (a, b), max(dropped, left)
  if not factors:
    raise ValueError(f"the LoRA targets {targets!r} match no parameter")
  return factors, dropped


def apply_deltas(base_params: Mapping, factors: Mapping[str, tuple]) -> dict:
  """``base_params`` with each kernel of ``factors`` moved by ``(B A)ᵀ`` (summed in float64, then in its dtype or
  float32 where that is wider: a bfloat16 base's merged kernels are float32, as LoRA's merge makes them)."""
  def move(path, w):
    if path not in factors:
      return w
    a, b = (np.asarray(x, np.float64) for x in factors[path])
    return (np.asarray(w, np.float64) + a.T @ b.T).astype(np.promote_types(np.asarray(w).dtype, np.float32))
  leaves, treedef = jax.tree_util.tree_flatten_with_path(base_params)
  return jax.tree_util.tree_unflatten(treedef, [move(tu.path_str(p), w) for p, w in leaves])


def peft_adapter(base_params: Mapping, params: Mapping, targets: str) -> dict[str, Any]:
  """The PEFT LoRA adapter taking ``base_params`` to ``params`` (:func:`kernel_deltas`): ``{"tensors": {PEFT name:
  float32 array}, "r", "target_modules", "ranks": {module: rank}, "dropped": largest singular value left out}``,
  ``lora_A.weight`` [r, in] and ``lora_B.weight`` [out, r] with ``B A = ΔWᵀ`` (torch's [out, in]), one ``r`` (the
  largest rank, the others zero-padded) and scaling α / r = 1."""
  deltas, dropped = kernel_deltas(base_params, params, targets)
  new = dict(tu.named_leaves(params))
  factors = {".".join(path.split("/")[:-1]): ab for path, ab in deltas.items()}
  ranks = {module: a.shape[0] for module, (a, _) in factors.items()}
  r = max(1, max(ranks.values()))
  tensors = {}
  for module, (a, b) in factors.items():
    k = a.shape[0]
    # C order: safetensors writes an array's memory as it lies (B = V√σ is Fortran-ordered).
    for name, x, pad in (("lora_A", a, ((0, r - k), (0, 0))), ("lora_B", b, ((0, 0), (0, r - k)))):
      tensors[f"{PEFT_PREFIX}{module}.{name}.weight"] = np.ascontiguousarray(np.pad(x, pad), np.float32)
  # PEFT adapts every module whose name ends in a listed name: plain names where they cover every such kernel,
  # else the full module names (PEFT also matches a name exactly).
  names = sorted({m.rsplit(".", 1)[-1] for m in factors})
  every = {".".join(p.split("/")[:-1]) for p in new if p.endswith("/kernel") and p.split("/")[-2] in names}
  target_modules = names if every == set(factors) else sorted(factors)
  return {"tensors": tensors, "r": r, "target_modules": target_modules, "ranks": ranks, "dropped": dropped}


def peft_config(r: int, target_modules: list[str], base_model_path: str) -> dict[str, Any]:
  """PEFT's ``adapter_config.json`` for a causal LM's LoRA adapter of rank ``r`` scaled by α / r = 1."""
  return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": r, "use_rslora": False,
          "target_modules": list(target_modules), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
          "inference_mode": True, "init_lora_weights": True, "use_dora": False, "modules_to_save": None,
          "base_model_name_or_path": base_model_path}


def export_peft(out_dir: pathlib.Path, base_params: Mapping, params: Mapping, *, targets: str,
                base_model_path: str) -> pathlib.Path:
  """Write ``out_dir`` whole as the PEFT LoRA adapter (:func:`peft_adapter`) that
  ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model_path), out_dir)`` turns into
  ``params``; replaces an earlier adapter of the same name."""
  from safetensors.numpy import save_file
  adapter = peft_adapter(base_params, params, targets)

  def write(tmp):
    save_file(adapter["tensors"], str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = peft_config(adapter["r"], adapter["target_modules"], str(base_model_path))
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))

  return _write_whole(out_dir, write)


BASE = "base"
"""The export folder of the base model, written once where PEFT has no other base to load (a GGUF model)."""


class Exporter:
  """``exporter(name, params)`` writes ``root/<name>/`` for ``model``'s family (a causal LM) and ``tokenizer``.

  With ``lora_targets`` (LoRA methods) also ``root/<name>/adapter/``, the PEFT adapter from ``model``'s parameters
  (the base) to the policy, on ``base_model_path`` (a Hugging Face directory or hub id holding exactly those
  weights); without one (a GGUF base), or where the base is stored narrower than float32 (``--param-dtype
  bfloat16``: the checkpoint's weights rounded), the base is exported once, with the first month, as ``root/base/``
  and the adapters name it."""

  def __init__(self, root: pathlib.Path, model: Loaded, tokenizer, *, lora_targets: str | None = None,
               base_model_path: str | None = None):
    self.root, self.tokenizer = pathlib.Path(root), tokenizer
    self.config = llama_config(model.config, tokenizer)
    self.base, self.targets, self.base_model_path = model.params, lora_targets, base_model_path
    if export_dtype(model.params).itemsize < 4:       # the adapters were trained on the rounded weights
      self.base_model_path = None

  def __call__(self, name: str, params: Mapping) -> pathlib.Path:
    if self.targets is not None and self.base_model_path is None:      # written with the first export, not before
      self.base_model_path = str(save_pretrained(self.root / BASE, self.base, self.config, self.tokenizer).resolve())
    also = None if self.targets is None else lambda d: export_peft(
        d / "adapter", self.base, params, targets=self.targets, base_model_path=self.base_model_path)
    return save_pretrained(self.root / name, params, self.config, self.tokenizer, also=also)
