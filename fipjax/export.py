"""Export for serving: a decoder's parameters as a Hugging Face directory that transformers' ``AutoModelForCausalLM``
loads (``config.json``, ``model.safetensors``, the tokenizer's files with its chat template).

Weights are written under Hugging Face's names (the family's ``hf_name`` map inverted: ``a/b/kernel`` →
``a.b.weight``, kernels transposed back to torch's ``[out, in]``), in float32; a tied output head is not written
twice. The directory appears whole: it is written under a temporary name and renamed.
"""

from __future__ import annotations

import json
import pathlib
import shutil
from typing import Any, Mapping

import numpy as np

from fipjax import tree as tu
from fipjax.models.hub import Loaded


def hf_tensors(params: Mapping) -> dict[str, np.ndarray]:
  """Flax parameter paths → Hugging Face tensor names and torch layouts (float32)."""
  out = {}
  for path, value in tu.named_leaves(params):
    parts = path.split("/")
    value = np.asarray(value, np.float32)
    if parts[-1] == "kernel":
      value = value.T
    if parts[-1] in ("kernel", "embedding"):
      parts[-1] = "weight"
    out[".".join(parts)] = np.ascontiguousarray(value)
  return out


def llama_config(cfg, tokenizer) -> dict[str, Any]:
  """A transformers ``config.json`` for a Llama-family :class:`fipjax.models.llama.LlamaConfig`: Qwen3 where the
  heads' queries and keys are normalised, Qwen2 where q/k/v carry biases, Mistral where a window is set, else Llama."""
  model_type = ("qwen3" if cfg.qk_norm else "qwen2" if cfg.qkv_bias and not cfg.o_bias else
                "mistral" if cfg.sliding_window is not None else "llama")
  arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
          "qwen3": "Qwen3ForCausalLM"}[model_type]
  out = {"architectures": [arch], "model_type": model_type, "vocab_size": cfg.vocab_size,
         "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
         "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
         "num_key_value_heads": cfg.num_key_value_heads,
         "head_dim": cfg.head_dim or cfg.hidden_size // cfg.num_attention_heads, "rms_norm_eps": cfg.rms_norm_eps,
         "rope_theta": cfg.rope_theta, "max_position_embeddings": cfg.max_position_embeddings,
         "tie_word_embeddings": cfg.tie_word_embeddings, "hidden_act": "silu", "torch_dtype": "float32",
         "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
         "pad_token_id": tokenizer.pad_token_id}
  if cfg.rope_scaling is not None:
    out["rope_scaling"] = {"rope_type": "llama3", **dict(cfg.rope_scaling)}
  if model_type in ("llama", "qwen3"):
    out["attention_bias"] = cfg.qkv_bias
  if model_type == "llama":
    out["mlp_bias"] = cfg.mlp_bias
  if cfg.sliding_window is not None:
    out["sliding_window"] = cfg.sliding_window
    if model_type != "mistral":
      out["use_sliding_window"] = True
      if cfg.layer_types is not None:
        out["layer_types"] = list(cfg.layer_types)
  return out


def save_pretrained(out: pathlib.Path, params: Mapping, config: Mapping[str, Any], tokenizer) -> pathlib.Path:
  """Write ``out`` whole (``config.json``, ``model.safetensors``, the tokenizer's files); replaces an earlier
  export of the same name (a resumed run writes the same month again)."""
  from safetensors.numpy import save_file
  out = pathlib.Path(out)
  tmp = out.with_name(out.name + ".tmp")
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  tensors = hf_tensors(params)
  if config.get("tie_word_embeddings"):
    tensors.pop("lm_head.weight", None)
  save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
  (tmp / "config.json").write_text(json.dumps(dict(config), indent=2))
  tokenizer.save_pretrained(str(tmp))
  shutil.rmtree(out, ignore_errors=True)
  tmp.rename(out)
  return out


class Exporter:
  """``exporter(name, params)`` writes ``root/<name>/`` for ``model``'s family (a causal LM) and ``tokenizer``."""

  def __init__(self, root: pathlib.Path, model: Loaded, tokenizer):
    self.root, self.tokenizer = pathlib.Path(root), tokenizer
    self.config = llama_config(model.config, tokenizer)

  def __call__(self, name: str, params: Mapping) -> pathlib.Path:
    return save_pretrained(self.root / name, params, self.config, self.tokenizer)
