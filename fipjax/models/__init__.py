"""Models: Flax NNX families behind one loader.

``load(name_or_path, **kw) -> Loaded(family, graphdef, params, config, report)`` reads a packaged alias
(``'minilm'``, ``'smollm2'``), a ``.gguf`` file, a Hugging Face directory or a hub id, and picks the family from the
config's ``model_type`` (``FAMILIES``: ``bert`` ← bert; ``llama`` ← llama, qwen2, qwen3, mistral, gemma2, gemma3_text
and GGUF files);
``loaded.apply`` (``family.make_apply(graphdef)``) is the pure ``apply(params, batch)``. ``load_tokenizer`` is its
tokenizer counterpart.

A family is one module exposing:

- ``MODEL_TYPES``: the Hugging Face ``model_type`` values it loads;
- ``Config``: a frozen dataclass with ``Config.from_dict(config_json_dict)`` (``ValueError`` when unsupported);
- ``hf_name(name) -> path`` and ``DROPPED``: the checkpoint name map (``a.b.weight`` → ``a/b/kernel``) and the
  regexes of checkpoint tensors it does not use;
- ``from_checkpoint(config, tensors, *, dtype, remat, ...) -> common.Converted``: the module built and filled
  strictly (``common.convert_checkpoint``);
- ``make_apply(graphdef)``: ``apply(params, batch)`` over the plain params dict;
- causal LMs also ``generate(graphdef, params, ids, mask, key, ...)`` and ``token_logprobs(logits, ids)``.

Adding a family is that module plus one entry in ``hub.FAMILIES``. Shared helpers (``split_params``,
``param_count``, the conversion, ``CheckpointError``) live in :mod:`fipjax.models.common`; the earlier loaders
(``load_bert``, ``load_llama``, ``load_llama_tokenizer``) stay, each ``load`` held to one family. The
package-level ``make_apply`` is BERT's (``loaded.apply`` or ``llama.make_apply`` for a decoder).
"""

from fipjax.models import bert, common, gguf, hub, llama
from fipjax.models.bert import BertClassifier, BertConfig, BertModel, make_apply
from fipjax.models.common import CheckpointError, Converted, param_count, split_params
from fipjax.models.hub import (FAMILIES, Loaded, LoadReport, family_of, load, load_bert, load_llama,
                               load_llama_tokenizer, load_tokenizer, packaged_minilm_dir, resolve_model_dir)
from fipjax.models.llama import LlamaConfig, LlamaForCausalLM
