"""One loader for every model family: ``models.load`` picks BERT or the Llama family from the checkpoint's config
and gives what the family's own loader gives; each module of fipjax.models imports alone."""

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from fipjax import models
from fipjax import tree as tu
from fipjax.models import bert, common, gguf, hub, llama

ROOT = pathlib.Path(__file__).parents[1]
TINY = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32)


def _assert_same(a, b):
  """Same parameter names, dtypes and values, bit for bit."""
  a, b = dict(tu.named_leaves(a)), dict(tu.named_leaves(b))
  assert a.keys() == b.keys()
  for name in a:
    assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name


def test_bert_dir_and_packaged_minilm_load_as_bert(small_bert):
  loaded = models.load(small_bert, heads={"yelp": 5}, seed=3)
  assert loaded.family is bert is models.FAMILIES["bert"]
  assert isinstance(loaded.config, bert.Config) and loaded.config.num_hidden_layers == 1
  graphdef, params, cfg, report = hub.load_bert(small_bert, {"yelp": 5}, seed=3)
  _assert_same(loaded.params, params)
  assert (loaded.config, loaded.report) == (cfg, report)
  assert loaded.report.initialised == ["heads/yelp/bias", "heads/yelp/kernel"]
  batch = {"input_ids": np.ones((2, 5), np.int32)}
  ours, old = loaded.apply(loaded.params, batch), bert.make_apply(graphdef)(params, batch)
  np.testing.assert_array_equal(ours["yelp"], old["yelp"])

  minilm = models.load("minilm", num_layers=1)
  assert minilm.family is bert and minilm.report.model_dir == hub.packaged_minilm_dir()
  _assert_same(minilm.params, hub.load_bert("minilm", num_layers=1)[1])


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "mistral"])
def test_llama_family_dirs_load_as_llama_and_match_transformers(tmp_path, kind):
  """Each ``model_type`` the Llama port covers maps to it, with its defaults (Mistral's 4096-token window, Qwen3's
  128-wide heads), and its logits are transformers' own."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  config_cls, model_cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
                           "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
                           "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[kind]
  torch.manual_seed(0)
  theirs = model_cls(config_cls(**TINY)).eval()
  theirs.save_pretrained(tmp_path, safe_serialization=True)
  assert json.loads((tmp_path / "config.json").read_text())["model_type"] == kind

  loaded = models.load(tmp_path)
  assert loaded.family is llama and isinstance(loaded.config, llama.Config)
  assert loaded.config.qkv_bias == (kind == "qwen2") and loaded.report.initialised == []
  assert loaded.config.sliding_window == (4096 if kind == "mistral" else None)
  assert loaded.config.head_size == (128 if kind == "qwen3" else 8)
  graphdef, params, cfg, report = hub.load_llama(tmp_path)
  _assert_same(loaded.params, params)
  assert (loaded.config, loaded.report) == (cfg, report)
  ids = np.random.default_rng(0).integers(0, TINY["vocab_size"], (2, 7))
  with torch.no_grad():
    ref = theirs(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(np.asarray(jax.jit(loaded.apply)(loaded.params, {"input_ids": ids})), ref, atol=1e-5)


def test_family_comes_from_model_type_or_is_named(small_bert, tmp_path):
  for f in small_bert.iterdir():
    (tmp_path / f.name).symlink_to(f)
  config = json.loads((small_bert / "config.json").read_text())
  (tmp_path / "config.json").unlink()
  (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
  with pytest.raises(models.CheckpointError, match=r"'gpt_neox' is not a model family.*bert: bert.*llama: llama"):
    models.load(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "model_type"}))
  with pytest.raises(models.CheckpointError, match="names no model_type; pass family="):
    models.load(tmp_path)
  assert models.load(tmp_path, family="bert").family is bert           # an old config: the caller says which
  _assert_same(hub.load_bert(tmp_path)[1], hub.load_bert(small_bert)[1])
  with pytest.raises(models.CheckpointError, match="unknown model family 'gpt'"):
    models.load(small_bert, family="gpt")
  with pytest.raises(models.CheckpointError, match=r"model_type 'bert' is not one of the llama family's"):
    hub.load_llama(small_bert)
  with pytest.raises(models.CheckpointError, match=r"model\.safetensors: num_layers=2, but the checkpoint has 1"):
    models.load(small_bert, num_layers=2)


@pytest.mark.slow
def test_gguf_loads_as_llama():
  """The packaged SmolLM2 GGUF (98 MB, Q4_1): by alias and by path, what ``load_llama`` gives."""
  try:
    path = gguf.packaged_smollm2()
  except gguf.GGUFError as e:
    pytest.skip(str(e))
  loaded = models.load("smollm2")
  assert loaded.family is llama and loaded.config.tie_word_embeddings
  assert loaded.report.model_dir / loaded.report.weights_file == path
  graphdef, params, cfg, report = hub.load_llama(path)
  _assert_same(loaded.params, params)
  assert (loaded.config, loaded.report) == (cfg, report)
  tokenizer = models.load_tokenizer("smollm2")
  assert tokenizer("Hello world")["input_ids"] == hub.load_llama_tokenizer(path)("Hello world")["input_ids"]


def test_shared_helpers_have_one_home():
  for name in ("split_params", "param_count"):
    assert getattr(bert, name) is getattr(llama, name) is getattr(common, name) is getattr(models, name)
  assert hub.CheckpointError is common.CheckpointError is models.CheckpointError
  assert hub.quiet_transformers is common.quiet_transformers
  assert not hasattr(gguf, "read_metadata")
  for family in models.FAMILIES.values():
    for name in ("MODEL_TYPES", "Config", "hf_name", "DROPPED", "from_checkpoint", "make_apply"):
      assert hasattr(family, name), (family.__name__, name)
  assert llama.hf_name("model.layers.0.self_attn.q_proj.weight") == "model/layers/0/self_attn/q_proj/kernel"
  assert bert.hf_name("bert.encoder.layer.0.output.LayerNorm.gamma") == "encoder/layer/0/output/LayerNorm/scale"


MODULES = sorted("fipjax.models" + ("" if p.stem == "__init__" else f".{p.stem}")
                 for p in (ROOT / "fipjax" / "models").glob("*.py"))


@pytest.mark.parametrize("module", MODULES)
def test_each_module_imports_alone(module):
  done = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-2000:]


def test_a_checkpoints_tokenizer_is_autotokenizers_without_importing_torch():
  """The class tokenizer_config.json names, loaded alone, encodes as AutoTokenizer does; loading it imports no
  torch (AutoTokenizer's import does wherever torch is installed: 0.2 GB resident)."""
  from transformers import AutoTokenizer
  d = hub.packaged_minilm_dir()
  ours, auto = hub.load_tokenizer(d), AutoTokenizer.from_pretrained(str(d))
  assert type(ours) is type(auto)
  texts = ["Hello World! This movie was GREAT, 10/10.", "Ünïcödé café naïve — résumé", "a " * 600]
  encode = lambda t: t(texts, padding="max_length", truncation=True, max_length=64, return_tensors="np")
  got, want = encode(ours), encode(auto)
  assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)
  code = ("import sys; from fipjax.models import hub; hub.load_tokenizer(hub.packaged_minilm_dir()); "
          "print('torch' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "False"
