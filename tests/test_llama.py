"""The Flax Llama decoder against transformers' PyTorch LlamaForCausalLM; GGUF weights and tokenizer against
transformers' own GGUF loader on the packaged SmolLM2."""

import json
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fipjax import tree as tu
from fipjax.models import gguf, hub, llama

from conftest import SHARED_DATA as DATA

TINY = dict(vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6,
            num_key_value_heads=2, max_position_embeddings=64, rope_theta=500.0)


def _tiny_dir(tmp_path, **overrides):
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY, **overrides})).eval()
  model.save_pretrained(tmp_path, safe_serialization=True)
  return model


def _left_padded(seed=0, b=3, t=10, vocab=97):
  ids = np.random.default_rng(seed).integers(0, vocab, (b, t))
  mask = np.ones_like(ids)
  mask[1, :3] = 0
  mask[2, :6] = 0
  return ids, mask


def _torch_logits(model, ids, mask):
  positions = np.maximum(mask.cumsum(-1) - 1, 0)          # what transformers' generate() passes
  with torch.no_grad():
    return model(torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(positions)).logits.numpy()


@pytest.mark.parametrize("overrides", [
    dict(tie_word_embeddings=False),
    dict(tie_word_embeddings=True, attention_bias=True,
         rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                           original_max_position_embeddings=16)),
], ids=["untied", "tied-bias-llama3rope"])
def test_logits_match_transformers_with_padding_and_cache(tmp_path, overrides):
  theirs = _tiny_dir(tmp_path, **overrides)
  graphdef, params, cfg, report = hub.load_llama(tmp_path)
  assert report.initialised == []
  ids, mask = _left_padded()
  ref = _torch_logits(theirs, ids, mask)
  full = np.asarray(jax.jit(llama.make_apply(graphdef))(params, {"input_ids": ids, "attention_mask": mask}))
  valid = mask.astype(bool)
  np.testing.assert_allclose(full[valid], ref[valid], atol=1e-5, rtol=0)
  # Cached decoding: a prompt, then one token, then the rest = one full pass.
  model, cache = nnx.merge(graphdef, params), llama.KVCache.empty(cfg, 3, 10)
  parts = []
  for lo, hi in ((0, 7), (7, 8), (8, 10)):
    logits, cache = model.extend(jnp.asarray(ids[:, lo:hi]), jnp.asarray(mask[:, lo:hi]), cache)
    parts.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(parts, 1)[valid], full[valid], atol=1e-5, rtol=0)


def test_greedy_generation_matches_transformers(tmp_path):
  theirs = _tiny_dir(tmp_path, tie_word_embeddings=False)
  graphdef, params, _, _ = hub.load_llama(tmp_path)
  ids, mask = _left_padded()
  ours = llama.generate(graphdef, params, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0),
                        max_new_tokens=6, eos_id=None, greedy=True)
  with torch.no_grad():
    ref = theirs.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=6,
                          do_sample=False)[:, ids.shape[1]:].numpy()
  np.testing.assert_array_equal(np.asarray(ours.tokens), ref)
  chex.assert_trees_all_equal(np.asarray(ours.mask), np.ones_like(ref, np.int32))


def test_sampling_stops_at_eos_and_respects_top_p(tmp_path):
  _tiny_dir(tmp_path, tie_word_embeddings=False)
  graphdef, params, _, _ = hub.load_llama(tmp_path)
  ids, mask = _left_padded()
  greedy = llama.generate(graphdef, params, ids, mask, jax.random.key(0), max_new_tokens=4, eos_id=None,
                          greedy=True)
  eos = int(greedy.tokens[0, 1])        # row 0 ends at its second token
  out = jax.jit(lambda k: llama.generate(graphdef, params, ids, mask, k, max_new_tokens=4, eos_id=eos,
                                         pad_id=-1, top_p=1e-6))(jax.random.key(3))
  # top_p → 0 keeps only the most likely token: sampling equals greedy up to the end token.
  np.testing.assert_array_equal(out.tokens[0], [greedy.tokens[0, 0], eos, -1, -1])
  np.testing.assert_array_equal(out.mask[0], [1, 1, 0, 0])
  np.testing.assert_allclose(out.logprobs[0, :2], 0.0, atol=1e-6)   # a one-token nucleus has probability 1
  samples = llama.generate(graphdef, params, np.repeat(ids[:1], 64, 0), np.repeat(mask[:1], 64, 0),
                           jax.random.key(1), max_new_tokens=1, eos_id=None).tokens
  assert len(np.unique(np.asarray(samples))) > 5        # temperature-1 sampling over a random model is diverse
  with pytest.raises(ValueError, match="top_p"):
    llama.generate(graphdef, params, ids, mask, jax.random.key(0), max_new_tokens=1, eos_id=None, top_p=0.0)


def _generate_every_step(graphdef, params, ids, mask, key, *, max_new_tokens, eos_id, pad_id):
  """The reference: temperature-1 sampling for all ``max_new_tokens`` steps (``lax.scan``, no early stop)."""
  model = nnx.merge(graphdef, params)
  cache = llama.KVCache.empty(model.cfg, ids.shape[0], ids.shape[1] + max_new_tokens)
  logits, cache = model.extend(ids, mask, cache)

  def step(carry, key):
    logits, cache, done = carry
    token = jax.random.categorical(key, logits)
    logprob = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), token[:, None], -1)[:, 0]
    token, live = jnp.where(done, pad_id, token), ~done
    done = done | (token == eos_id)
    logits, cache = model.extend(token[:, None], live[:, None].astype(jnp.int32), cache)
    return (logits[:, -1], cache, done), (token, live, jnp.where(live, logprob, 0.0))

  init = (logits[:, -1], cache, jnp.zeros((ids.shape[0],), bool))
  _, (tokens, live, logprobs) = jax.lax.scan(step, init, jax.random.split(key, max_new_tokens))
  return tokens.T, live.T.astype(jnp.int32), logprobs.T


def test_generation_stops_when_every_row_has_ended_with_the_tokens_of_every_step(tmp_path):
  _tiny_dir(tmp_path, tie_word_embeddings=False)
  graphdef, params, _, _ = hub.load_llama(tmp_path)
  ids, mask = _left_padded()
  for row, eos in ((slice(None), 7), (slice(0, 1), None)):        # rows ending at different steps; one row early
    r_ids, r_mask = jnp.asarray(ids[row]), jnp.asarray(mask[row])
    first = llama.generate(graphdef, params, r_ids, r_mask, jax.random.key(2), max_new_tokens=12, eos_id=None)
    eos = int(first.tokens[0, 2]) if eos is None else eos           # the single row ends at its third token
    ours = jax.jit(lambda k: llama.generate(graphdef, params, r_ids, r_mask, k, max_new_tokens=12, eos_id=eos,
                                            pad_id=-1))(jax.random.key(2))
    ref = _generate_every_step(graphdef, params, r_ids, r_mask, jax.random.key(2), max_new_tokens=12, eos_id=eos,
                               pad_id=-1)
    for a, b in zip((ours.tokens, ours.mask, ours.logprobs), ref):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)
  np.testing.assert_array_equal(np.asarray(ours.mask[0]), [1, 1, 1] + [0] * 9)


def test_strict_loading_names_the_problem(tmp_path):
  _tiny_dir(tmp_path, tie_word_embeddings=False)
  from safetensors.numpy import load_file, save_file
  tensors = load_file(str(tmp_path / "model.safetensors"))
  tensors["model.layers.0.mlp.extra.weight"] = np.zeros((2, 2), np.float32)
  del tensors["model.norm.weight"]
  save_file(tensors, str(tmp_path / "model.safetensors"))
  with pytest.raises(hub.CheckpointError, match=r"(?s)unused.*mlp/extra.*missing.*model/norm/weight"):
    hub.load_llama(tmp_path)
  tensors["model.norm.weight"] = np.ones(48, np.float32)
  del tensors["model.layers.0.mlp.extra.weight"]
  save_file(tensors, str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text(json.dumps({**TINY, "tie_word_embeddings": True}))
  with pytest.raises(hub.CheckpointError, match="lm_head.weight differs"):      # a trained head is not a copy
    hub.load_llama(tmp_path)
  with pytest.raises(ValueError, match="6 attention heads cannot share 4"):
    llama.LlamaConfig(num_attention_heads=6, num_key_value_heads=4)
  (tmp_path / "config.json").write_text(json.dumps({**TINY, "model_type": "gpt_neox"}))
  with pytest.raises(hub.CheckpointError, match="gpt_neox"):
    hub.load_llama(tmp_path)
  with pytest.raises(hub.CheckpointError, match="does not exist"):
    hub.load_llama(tmp_path / "nothing.gguf")


def test_unpermute_inverts_llama_cpp_permutation():
  w = np.arange(6 * 8 * 5, dtype=np.float32).reshape(48, 5)
  heads = 6
  # llama.cpp's convert_hf_to_gguf.py permute
  permuted = w.reshape(heads, 2, w.shape[0] // heads // 2, 5).swapaxes(1, 2).reshape(w.shape)
  np.testing.assert_array_equal(gguf.unpermute(permuted, heads), w)


@pytest.fixture(scope="module")
def smollm2():
  try:
    path = gguf.packaged_smollm2()
  except gguf.GGUFError as e:
    pytest.skip(str(e))
  return path


@pytest.mark.slow
def test_gguf_weights_logits_and_tokenizer_match_transformers(smollm2):
  """The packaged SmolLM2 (Q4_1): our dequantised weights are bit-identical to transformers' GGUF loader's, the
  logits agree, and the tokenizer built from the file's metadata agrees on real reviews."""
  from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
  config, tensors = gguf.read_gguf(smollm2)
  theirs = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
  # transformers' own GGUF conversion (what from_pretrained(gguf_file=...) runs, minus its accelerate requirement)
  state = load_gguf_checkpoint(str(smollm2), return_tensors=True, model_to_load=theirs)["tensors"]
  assert set(tensors) == set(state) == set(theirs.state_dict()) - {"lm_head.weight"}   # tied head
  for name, value in tensors.items():
    np.testing.assert_array_equal(value, state[name].numpy(), err_msg=name)
  theirs.load_state_dict(state, strict=False)
  theirs.tie_weights()

  tokenizer = hub.load_llama_tokenizer("smollm2")
  reference = transformers.AutoTokenizer.from_pretrained(str(smollm2.parent), gguf_file=smollm2.name)
  texts = [json.loads(line)["text"] for task in ("yelp", "imdb")
           for line in (DATA / task / "test.jsonl").open(encoding="utf-8").readlines()[:100]]
  # transformers maps llama.cpp's "smollm" pre-tokenizer to GPT-2's split; SmolLM's own tokenizer.json (and
  # llama.cpp) isolate each numeral first (" 5" is then two tokens, not one). Texts without numerals must agree.
  plain = [t for t in texts if not any(c.isnumeric() for c in t)]
  assert len(plain) > 80
  for text in plain:
    assert tokenizer(text)["input_ids"] == reference(text)["input_ids"], text
  assert tokenizer.convert_ids_to_tokens(tokenizer("in 2019")["input_ids"]) == ["in", "Ġ", "2", "0", "1", "9"]
  assert tokenizer.decode(tokenizer(texts[0])["input_ids"]) == texts[0]
  chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                       add_generation_prompt=True)
  assert chat.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
  assert tokenizer.convert_tokens_to_ids("<|im_end|>") in tokenizer(chat)["input_ids"]   # one special token

  graphdef, params, cfg, _ = hub.load_llama("smollm2")
  assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_key_value_heads) == (30, 576, 3)
  ids = np.asarray([tokenizer(plain[0])["input_ids"][:24]])
  with torch.no_grad():
    ref = theirs(torch.tensor(ids)).logits.numpy()
  ours = np.asarray(jax.jit(llama.make_apply(graphdef))(params, {"input_ids": ids}))
  np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=0)


def test_lora_dpo_trains_adapters_only():
  from fipjax import dpo, lora
  cfg = llama.LlamaConfig(**{k: v for k, v in TINY.items() if k != "max_position_embeddings"})
  graphdef, params = llama.split_params(llama.LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)))
  apply = llama.make_apply(graphdef)
  lcfg = lora.LoraConfig(targets=llama.LORA_TARGETS, rank=4, alpha=8)
  tp = lora.train_params(params, jax.random.key(1), lcfg)
  ids = jnp.asarray(_left_padded()[0][:2])
  seq = lambda ids: {"input_ids": ids, "attention_mask": jnp.ones_like(ids),
                     "response_mask": (jnp.arange(10) >= 4).astype(jnp.int32)[None].repeat(2, 0)}
  batch = {"chosen": seq(ids), "rejected": seq(ids[::-1])}
  batch.update(dpo.reference_logprobs(apply, params, batch))
  loss = lambda adapters: dpo.task_loss(apply, beta=0.1)(lora.to_model({**tp, "lora": adapters}, lcfg), batch)[0]
  np.testing.assert_allclose(jax.jit(loss)(tp["lora"]), np.log(2.0), rtol=1e-6)   # B = 0: policy = reference
  grads = dict(tu.named_leaves(jax.jit(jax.grad(loss))(tp["lora"])))
  assert len(grads) == 2 * 2 * cfg.num_hidden_layers                      # A and B of q and v in each layer
  assert all(re.search(r"self_attn/(q_proj|v_proj)/kernel/", n) for n in grads), sorted(grads)
  assert max(float(jnp.abs(g).max()) for n, g in grads.items()) > 0


def test_remat_gives_the_same_dpo_loss_and_gradients(tmp_path):
  """``remat`` (continual_dpo's --model.remat, fipjax.align's --gradient-checkpointing) recomputes each layer in the
  backward pass: the same loss and gradients."""
  from fipjax import dpo
  _tiny_dir(tmp_path)
  ids, mask = _left_padded()
  seq = lambda ids: {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask),
                     "response_mask": jnp.asarray((np.arange(10) >= 6)[None].repeat(3, 0), jnp.int32)}
  batch = {"chosen": seq(ids), "rejected": seq(ids[::-1])}
  out = []
  for remat in (False, True):
    graphdef, params, _, _ = hub.load_llama(tmp_path, remat=remat)
    apply = llama.make_apply(graphdef)
    b = {**batch, "ref_chosen": jnp.zeros(3), "ref_rejected": jnp.zeros(3)}
    out.append(jax.jit(jax.value_and_grad(lambda p: dpo.task_loss(apply, beta=0.1)(p, b)[0]))(params))
  chex.assert_trees_all_close(out[0], out[1], rtol=1e-6, atol=1e-7)
