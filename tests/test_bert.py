"""Flax BERT against transformers' PyTorch BertModel, and strict checkpoint conversion."""

import json
import pathlib
import shutil
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fipjax.models import bert, hub

from conftest import SHARED_DATA as DATA
TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=64, type_vocab_size=2, hidden_act="gelu")


def _torch_outputs(model, ids, mask):
  model.eval()
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
  return out.last_hidden_state.numpy(), out.pooler_output.numpy()


def _ours(model_dir, ids, mask, **kw):
  graphdef, params, _, report = hub.load_bert(model_dir, **kw)
  hidden, pooled = jax.jit(bert.make_apply(graphdef))(params, {"input_ids": jnp.asarray(ids),
                                                               "attention_mask": jnp.asarray(mask)})
  return np.asarray(hidden), np.asarray(pooled), report


def _compare(theirs, ours, mask, atol):
  (h_t, p_t), (h_o, p_o) = theirs, ours
  valid = np.asarray(mask, bool)
  np.testing.assert_allclose(h_o[valid], h_t[valid], atol=atol, rtol=0)  # padded positions are don't-care
  np.testing.assert_allclose(p_o, p_t, atol=atol, rtol=0)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  torch.manual_seed(0)
  model = transformers.BertModel(transformers.BertConfig(**TINY))
  path = tmp_path_factory.mktemp("tiny")
  model.save_pretrained(path, safe_serialization=True)
  return path, model


def _ids_and_mask(seed=0, b=3, t=11, vocab=99):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, vocab, size=(b, t))
  mask = np.ones((b, t), np.int64)
  mask[1, 7:] = 0
  mask[2, 4:] = 0
  return ids * mask, mask


def test_tiny_parity(tiny_dir):
  path, model = tiny_dir
  ids, mask = _ids_and_mask()
  h, p, report = _ours(path, ids, mask)
  _compare(_torch_outputs(model, ids, mask), (h, p), mask, atol=1e-5)
  assert report.initialised == [] and report.dropped == []


def test_float64_parity(tmp_path, x64):
  """dtype=float64 gives float64 parameters and matches PyTorch in float64 far below float32 precision."""
  torch.manual_seed(0)
  model = transformers.BertModel(transformers.BertConfig(**TINY)).double()
  model.save_pretrained(tmp_path, safe_serialization=True)
  ids, mask = _ids_and_mask(2)
  graphdef, params, _, _ = hub.load_bert(tmp_path, dtype=jnp.float64)
  chex.assert_type(jax.tree.leaves(params), jnp.float64)
  hidden, pooled = jax.jit(bert.make_apply(graphdef))(params, {"input_ids": jnp.asarray(ids),
                                                               "attention_mask": jnp.asarray(mask)})
  chex.assert_type([hidden, pooled], jnp.float64)
  _compare(_torch_outputs(model, ids, mask), (np.asarray(hidden), np.asarray(pooled)), mask, atol=1e-10)
  graphdef_c, params_c, _, _ = hub.load_bert(tmp_path, {"shared": 7}, dtype=jnp.float64)
  chex.assert_type(bert.make_apply(graphdef_c)(params_c, {"input_ids": jnp.asarray(ids)})["shared"], jnp.float64)


def test_num_layers_keeps_the_first_layers(tiny_dir):
  """``num_layers=1`` of the 2-layer checkpoint is the PyTorch model with its second layer removed."""
  path, model = tiny_dir
  one = transformers.BertModel(transformers.BertConfig(**{**TINY, "num_hidden_layers": 1}))
  missing, unexpected = one.load_state_dict(model.state_dict(), strict=False)
  assert missing == [] and all(k.startswith("encoder.layer.1.") for k in unexpected)
  ids, mask = _ids_and_mask()
  h, p, report = _ours(path, ids, mask, num_layers=1)
  _compare(_torch_outputs(one, ids, mask), (h, p), mask, atol=1e-5)
  assert report.dropped == sorted(unexpected)
  for bad in (0, 3):
    with pytest.raises(hub.CheckpointError, match="has 2 encoder layers"):
      hub.load_bert(path, num_layers=bad)

def test_old_format_checkpoint_with_prefix_gamma_beta_and_pretraining_heads(tiny_dir, tmp_path):
  """bert-base-uncased's pytorch_model.bin layout: 'bert.' prefix, LayerNorm gamma/beta, cls.* heads."""
  path, model = tiny_dir
  state = {}
  for k, v in model.state_dict().items():
    k = "bert." + k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
    state[k] = v
  state["cls.predictions.bias"] = torch.zeros(TINY["vocab_size"])
  torch.save(state, tmp_path / "pytorch_model.bin")
  (tmp_path / "config.json").write_text((path / "config.json").read_text())
  ids, mask = _ids_and_mask(1)
  h, p, report = _ours(tmp_path, ids, mask)
  _compare(_torch_outputs(model, ids, mask), (h, p), mask, atol=1e-5)
  assert report.weights_file == "pytorch_model.bin" and report.dropped == ["cls.predictions.bias"]


def test_classifier_heads_are_fresh_and_reported(tiny_dir):
  path, _ = tiny_dir
  graphdef, params, _, report = hub.load_bert(path, {"yelp": 5, "imdb": 2})
  assert report.initialised == ["heads/imdb/bias", "heads/imdb/kernel", "heads/yelp/bias", "heads/yelp/kernel"]
  logits = bert.make_apply(graphdef)(params, {"input_ids": jnp.ones((2, 5), jnp.int32)})
  chex.assert_shape(logits["yelp"], (2, 5))
  chex.assert_shape(logits["imdb"], (2, 2))


def test_strict_conversion_errors(tiny_dir, tmp_path):
  path, model = tiny_dir
  from safetensors.numpy import save_file
  tensors, _ = hub.read_checkpoint(path)
  (tmp_path / "config.json").write_text((path / "config.json").read_text())
  extra = dict(tensors, **{"encoder.layer.0.surprise.weight": np.zeros((2, 2), np.float32)})
  save_file(extra, str(tmp_path / "model.safetensors"))
  with pytest.raises(hub.CheckpointError, match="unused checkpoint tensors.*surprise"):
    hub.load_bert(tmp_path)
  missing = {k: v for k, v in tensors.items() if "pooler" not in k}
  save_file(missing, str(tmp_path / "model.safetensors"))
  with pytest.raises(hub.CheckpointError, match="missing from the checkpoint.*pooler/dense"):
    hub.load_bert(tmp_path)
  cfg = json.loads((path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps(dict(cfg, intermediate_size=38)))
  save_file(tensors, str(tmp_path / "model.safetensors"))
  with pytest.raises(hub.CheckpointError, match="shape mismatches"):
    hub.load_bert(tmp_path)


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_weights_raise_checkpoint_error(tiny_dir, tmp_path, weights, damage):
  path, model = tiny_dir
  (tmp_path / "config.json").write_text((path / "config.json").read_text())
  if weights == "model.safetensors":
    data = (path / weights).read_bytes()
  else:
    torch.save(model.state_dict(), tmp_path / weights)
    data = (tmp_path / weights).read_bytes()
  bad = data[:len(data) // 2] if damage == "truncated" else np.random.default_rng(0).bytes(4096)
  (tmp_path / weights).write_bytes(bad)
  with pytest.raises(hub.CheckpointError, match=rf"{weights} is corrupt.*; re-download"):
    hub.load_bert(tmp_path)


@pytest.mark.parametrize("text", ["{\"hidden_size\": 32,", "[1, 2]", "\xff\xfe"])
def test_broken_config_raises_checkpoint_error(tiny_dir, tmp_path, text):
  path, _ = tiny_dir
  shutil.copy(path / "model.safetensors", tmp_path)
  (tmp_path / "config.json").write_bytes(text.encode("latin-1"))
  with pytest.raises(hub.CheckpointError, match=r"config\.json (is not valid JSON|holds a JSON list).*re-download"):
    hub.load_bert(tmp_path)


def test_broken_tokenizer_raises_checkpoint_error(tiny_dir, minilm, tmp_path):
  with pytest.raises(hub.CheckpointError, match="holds no tokenizer"):
    hub.load_tokenizer(tiny_dir[0])     # AutoTokenizer alone would build a vocabulary of special tokens only
  for f in ("config.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
    shutil.copy(minilm / f, tmp_path)
  (tmp_path / "tokenizer.json").write_text((minilm / "tokenizer.json").read_text()[:1000])
  with pytest.raises(hub.CheckpointError, match="tokenizer files that cannot be read.*; re-download"):
    hub.load_tokenizer(tmp_path)


def test_no_torch_advice_is_silenced(minilm):
  """Without torch, `import transformers` advises that models are unavailable; the tokenizer loader drops that."""
  def stderr(stmt):
    code = f"import sys; sys.modules['torch'] = None; {stmt}"   # a None entry makes find_spec('torch') None
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=pathlib.Path(__file__).parents[1]).stderr
  assert "PyTorch was not found" in stderr("import transformers")          # the simulation holds
  out = stderr("from fipjax.models import hub; print(hub.load_tokenizer('minilm')('hi')['input_ids'])")
  assert "PyTorch was not found" not in out, out


def test_missing_model_errors(tmp_path, monkeypatch):
  with pytest.raises(hub.CheckpointError, match="does not exist"):
    hub.resolve_model_dir("./no/such/dir")
  with pytest.raises(hub.CheckpointError, match="not a model directory"):
    hub.resolve_model_dir(tmp_path)
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(hub.CheckpointError, match="(?s)could not get model .* local directory"):
    hub.resolve_model_dir("some-org/some-model-that-is-not-cached")


def _real_sentences():
  rows = [json.loads(l) for l in (DATA / "yelp" / "test.jsonl").read_text().splitlines()[:3]]
  return [r["text"] for r in rows] + ["Short one.", "The movie was wonderful, and the acting even better!"]


@pytest.fixture(scope="module")
def minilm():
  return hub.packaged_minilm_dir()


def test_minilm_parity_on_real_sentences(minilm):
  tok = hub.load_tokenizer("minilm")
  enc = tok(_real_sentences(), padding=True, truncation=True, max_length=64, return_tensors="np")
  ids, mask = enc["input_ids"], enc["attention_mask"]
  assert (mask == 0).any() and (mask == 1).all(axis=0).any()    # some rows padded, some not
  theirs = _torch_outputs(transformers.BertModel.from_pretrained(str(minilm)), ids, mask)
  h, p, report = _ours("minilm", ids, mask)
  _compare(theirs, (h, p), mask, atol=1e-5)
  assert report.dropped == ["embeddings.position_ids"]
  # Padding does not change a sentence's representation.
  single = tok(_real_sentences()[3:4], return_tensors="np")
  h1, p1, _ = _ours("minilm", single["input_ids"], single["attention_mask"])
  np.testing.assert_allclose(p1[0], p[3], atol=1e-5)


def test_dropout_remat_and_bfloat16(tiny_dir):
  path, _ = tiny_dir
  ids, mask = _ids_and_mask()
  batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask)}
  graphdef, params, _, _ = hub.load_bert(path, {"shared": 7})
  apply = bert.make_apply(graphdef)
  det = jax.jit(apply)(params, batch)["shared"]
  dropped = jax.jit(lambda key: apply(params, batch, deterministic=False, rng=key)["shared"])
  a, b, c = dropped(jax.random.PRNGKey(0)), dropped(jax.random.PRNGKey(0)), dropped(jax.random.PRNGKey(1))
  chex.assert_trees_all_equal(a, b)
  assert not np.allclose(a, det) and not np.allclose(a, c)
  with pytest.raises(ValueError, match="rng"):
    apply(params, batch, deterministic=False)
  graphdef_r, params_r, _, _ = hub.load_bert(path, {"shared": 7}, remat=True)
  loss = lambda ap, p: jnp.sum(ap(p, batch)["shared"] ** 2)
  g = jax.jit(jax.grad(lambda p: loss(apply, p)))(params)
  g_r = jax.jit(jax.grad(lambda p: loss(bert.make_apply(graphdef_r), p)))(params_r)
  chex.assert_trees_all_close(g, g_r, rtol=1e-5, atol=1e-7)
  graphdef_h, params_h, _, _ = hub.load_bert(path, {"shared": 7}, dtype=jnp.bfloat16)
  chex.assert_trees_all_equal_dtypes(params_h, params)     # float32 parameters
  half = jax.jit(bert.make_apply(graphdef_h))(params_h, batch)["shared"]
  assert half.dtype == jnp.float32
  np.testing.assert_allclose(half, det, atol=5e-2)


def test_split_readout_of_features_is_the_classifier(tiny_dir):
  path, _ = tiny_dir
  ids, mask = _ids_and_mask()
  batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask)}
  graphdef, params, _, _ = hub.load_bert(path, {"yelp": 5, "imdb": 2})
  apply, (features, readout, below) = bert.make_apply(graphdef), bert.make_split(graphdef)
  h = features(params, batch)
  chex.assert_shape(h, (3, TINY["hidden_size"]))
  chex.assert_trees_all_equal(readout(params, h), apply(params, batch))
  key = jax.random.PRNGKey(3)                    # the same dropout masks when the key is shared
  split = readout(params, features(params, batch, deterministic=False, rng=key), deterministic=False, rng=key)
  chex.assert_trees_all_equal(split, apply(params, batch, deterministic=False, rng=key))
  above = [n for n, _ in jax.tree_util.tree_flatten_with_path(params)[0]
           if not __import__("re").search(below, "/".join(str(getattr(k, "key", k)) for k in n))]
  assert len(above) == 2 + 4      # the pooler's and the two heads' kernel and bias
