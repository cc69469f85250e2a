"""The Llama family's other members against transformers (eager attention), loaded through ``models.load``:
Mistral with a sliding window shorter than the sequence, Qwen2 with ``use_sliding_window`` on some layers only,
Qwen3 (RMSNorm on queries and keys, a ``head_dim`` of its own, windowed by ``layer_types``), Gemma 2 (GeGLU, norms by
1 + w around attention and MLP, scaled embeddings, soft-capped scores and logits, every other layer windowed) and
Gemma 3's text model (RMSNorm on queries and keys, linear RoPE scaling on full layers, a base of their own for
sliding ones); every norm's weight is randomised, so that each norm's scale is tested. float32: logits within
1e-5 of transformers', in one pass and through the KV cache, and identical greedy tokens for a prompt longer than
the window, generating past it. float64: within 1e-12 of transformers run in float64 throughout."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fipjax import export, models
from fipjax.models import llama

from test_llama import _left_padded, _torch_logits     # 3 rows [B, T], rows 1 and 2 left-padded by 3 and 6

WINDOW = 4
TINY = dict(vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rope_theta=500.0, bos_token_id=None,
            eos_token_id=None, pad_token_id=None)
FAMILIES = {   # model_type: (transformers config class, config overrides, each layer's window in our config)
    "mistral": ("MistralConfig", dict(sliding_window=WINDOW), (WINDOW, WINDOW)),
    "qwen2": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
              (None, WINDOW)),
    "qwen3": ("Qwen3Config", dict(head_dim=16, attention_bias=True, use_sliding_window=True, sliding_window=WINDOW,
                                  layer_types=["sliding_attention", "full_attention"]), (WINDOW, None)),
    # Caps small enough that the tanh bends the scores and logits of a random model.
    "gemma2": ("Gemma2Config", dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW,
                                    attn_logit_softcapping=2.0, final_logit_softcapping=0.5), (WINDOW, None)),
    "gemma3_text": ("Gemma3TextConfig", dict(
        head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW, layer_types=["sliding_attention",
                                                                                   "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 50.0},
                         "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}}),
        (WINDOW, None)),
}


def _theirs(kind, path, dtype=torch.float32):
  """A random transformers model of family ``kind``, saved (safetensors) to ``path``."""
  config_cls, overrides, _ = FAMILIES[kind]
  torch.manual_seed(0)
  config = getattr(transformers, config_cls)(**TINY, **overrides)
  model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").to(dtype).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.3 * torch.randn_like(p))
  model.save_pretrained(path, safe_serialization=True)
  return model


@pytest.mark.parametrize("kind", FAMILIES)
def test_float32_logits_cache_and_greedy_tokens_match_transformers(tmp_path, kind):
  theirs = _theirs(kind, tmp_path)
  loaded = models.load(tmp_path)
  assert loaded.family is llama and loaded.report.initialised == []
  assert loaded.config.windows == FAMILIES[kind][2] and loaded.config.qk_norm == (kind in ("qwen3", "gemma3_text"))
  ids, mask = _left_padded(t=12)
  valid = mask.astype(bool)
  ours = np.asarray(jax.jit(loaded.apply)(loaded.params, {"input_ids": ids, "attention_mask": mask}))
  np.testing.assert_allclose(ours[valid], _torch_logits(theirs, ids, mask)[valid], atol=1e-5, rtol=0)

  model = nnx.merge(loaded.graphdef, loaded.params)
  # The KV cache: a prompt, one token, then five (the window crosses every boundary) = one full pass.
  cache, parts = llama.KVCache.empty(loaded.config, 3, 12), []
  for lo, hi in ((0, 6), (6, 7), (7, 12)):
    logits, cache = model.extend(jnp.asarray(ids[:, lo:hi]), jnp.asarray(mask[:, lo:hi]), cache)
    parts.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(parts, 1)[valid], ours[valid], atol=1e-5, rtol=0)
  # The window matters here: without it the logits move far beyond the tolerance.
  model.cfg = dataclasses.replace(loaded.config, sliding_window=None, layer_types=None)
  assert np.abs(np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))[valid] - ours[valid]).max() > 1e-3

  new = 10                                                   # 12-token prompts, 22 tokens in all: past the window
  out = jax.jit(lambda p: llama.generate(loaded.graphdef, p, ids, mask, jax.random.key(0), max_new_tokens=new,
                                         eos_id=None, greedy=True))(loaded.params)
  with torch.no_grad():
    ref = theirs.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=new,
                          do_sample=False, pad_token_id=0)[:, ids.shape[1]:].numpy()
  np.testing.assert_array_equal(np.asarray(out.tokens), ref)


def _float64_throughout(monkeypatch, model):
  """transformers' model with its float32 steps in float64: RMSNorm's upcast, RoPE's ``inv_freq`` and angles,
  eager attention's softmax (all keep float32 precision in a ``.double()`` model), and Gemma's embedding scale
  (a buffer rounded to float32 when it was made)."""
  softmax = torch.nn.functional.softmax
  monkeypatch.setattr(torch.nn.functional, "softmax", lambda x, dim, dtype=None: softmax(
      x, dim=dim, dtype=torch.float64 if x.dtype == torch.float64 else dtype))
  norm, rope = type(model.model.norm), type(model.model.rotary_emb)

  gemma = "Gemma" in norm.__name__
  if gemma:
    scale = model.model.embed_tokens.embed_scale
    model.model.embed_tokens.embed_scale = torch.tensor(model.config.hidden_size ** 0.5, dtype=scale.dtype)

  def norm_forward(self, x):
    scale = 1 + self.weight if gemma else self.weight
    return scale * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + (self.eps if gemma else self.variance_epsilon)))

  def rope_forward(self, x, position_ids, layer_type=None):
    config = self.config
    params = config.rope_parameters if layer_type is None else config.rope_parameters[layer_type]
    d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    inv_freq = 1.0 / params["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    inv_freq = inv_freq / params["factor"] if params.get("rope_type") == "linear" else inv_freq
    angles = torch.cat([position_ids[..., None].double() * inv_freq] * 2, -1)
    return angles.cos().to(x.dtype), angles.sin().to(x.dtype)

  monkeypatch.setattr(norm, "forward", norm_forward)
  monkeypatch.setattr(rope, "forward", rope_forward)


@pytest.mark.parametrize("kind", FAMILIES)
def test_float64_logits_are_exact(tmp_path, kind, x64, monkeypatch):
  theirs = _theirs(kind, tmp_path, torch.float64)
  _float64_throughout(monkeypatch, theirs)
  loaded = models.load(tmp_path, dtype=jnp.float64)
  ids, mask = _left_padded(t=12)
  valid = mask.astype(bool)
  ours = np.asarray(jax.jit(loaded.apply)(loaded.params, {"input_ids": ids, "attention_mask": mask}))
  assert ours.dtype == np.float64
  np.testing.assert_allclose(ours[valid], _torch_logits(theirs, ids, mask)[valid], atol=1e-12, rtol=0)


def test_window_rules_follow_transformers_configs():
  """Which layers use a window, from the configs transformers writes (with ``layer_types``) and from older ones
  (``max_window_layers`` only), and transformers' defaults for the keys a config leaves out."""
  cases = [("Qwen2Config", dict(use_sliding_window=True, sliding_window=3, max_window_layers=2)),
           ("Qwen2Config", dict(use_sliding_window=False, sliding_window=3, max_window_layers=0)),
           ("Qwen3Config", dict(use_sliding_window=True, sliding_window=5, max_window_layers=0)),
           ("Qwen3Config", dict(use_sliding_window=True, sliding_window=5,
                                layer_types=["full_attention", "sliding_attention"] * 4)),
           ("MistralConfig", dict(sliding_window=6)), ("MistralConfig", dict(sliding_window=None)),
           ("Gemma2Config", dict(sliding_window=3)), ("Gemma3TextConfig", dict(sliding_window=3)),
           ("Gemma3TextConfig", dict(sliding_window=3, sliding_window_pattern=2))]
  for config_cls, overrides in cases:
    theirs = getattr(transformers, config_cls)(**{**TINY, "num_hidden_layers": 8}, **overrides)
    want = tuple(theirs.sliding_window if t == "sliding_attention" else None
                 for t in getattr(theirs, "layer_types", ["sliding_attention"] * 8))
    d = theirs.to_dict()
    assert llama.Config.from_dict(d).windows == want, (config_cls, overrides)
    if "layer_types" in d and "layer_types" not in overrides:      # as an older config.json has it
      older = {k: v for k, v in d.items() if k != "layer_types"}
      older.update({"sliding_window_pattern": overrides["sliding_window_pattern"]}
                   if "sliding_window_pattern" in overrides else {})
      assert llama.Config.from_dict(older).windows == want, (config_cls, overrides)
  mistral = llama.Config.from_dict({**TINY, "model_type": "mistral"})
  assert mistral.sliding_window == 4096 and mistral.windows == (4096, 4096)
  qwen2 = llama.Config.from_dict({**TINY, "model_type": "qwen2", "num_hidden_layers": 30, "use_sliding_window": True})
  assert qwen2.windows == (None,) * 28 + (4096, 4096)
  qwen3 = llama.Config.from_dict({**TINY, "model_type": "qwen3"})
  assert (qwen3.head_size, qwen3.qk_norm, qwen3.qkv_bias, qwen3.windows) == (128, True, False, (None, None))
  assert llama.Config.from_dict({**TINY, "model_type": "llama", "sliding_window": 3}).windows == (None, None)
  with pytest.raises(ValueError, match="layer_types must name"):
    llama.Config.from_dict({**TINY, "model_type": "qwen2", "use_sliding_window": True, "sliding_window": 3,
                            "layer_types": ["sliding_attention", "chunked_attention"]})
  with pytest.raises(ValueError, match="no sliding_window"):
    llama.Config.from_dict({**TINY, "model_type": "qwen3", "layer_types": ["sliding_attention"] * 2})


class _NoTokenizer:
  bos_token_id = eos_token_id = pad_token_id = None

  def save_pretrained(self, path):
    pass


@pytest.mark.parametrize("kind", FAMILIES)
def test_the_export_reloads_as_the_same_family_in_transformers_and_fipjax(tmp_path, kind):
  _theirs(kind, tmp_path / "theirs")
  loaded = models.load(tmp_path / "theirs")
  out = export.save_pretrained(tmp_path / "export", loaded.params, export.llama_config(loaded.config, _NoTokenizer()),
                               _NoTokenizer())
  same = lambda c: dataclasses.replace(c, head_dim=c.head_size)       # head_dim None: hidden / heads
  assert same(llama.Config.from_dict(json.loads((out / "config.json").read_text()))) == same(loaded.config)
  hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
  assert type(hf).__name__ == export.ARCHITECTURES[kind]
  ids, mask = _left_padded(t=12)
  valid = mask.astype(bool)
  ours = np.asarray(jax.jit(loaded.apply)(loaded.params, {"input_ids": ids, "attention_mask": mask}))
  np.testing.assert_allclose(_torch_logits(hf, ids, mask)[valid], ours[valid], atol=1e-5, rtol=0)
