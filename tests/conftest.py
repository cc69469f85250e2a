import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# One persistent compilation cache for the session (subprocesses inherit it): the many runs of the same programs
# (kills and resumes, repeated experiments) compile once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", __import__("tempfile").mkdtemp(prefix="fipjax-test-xla-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
# The tests' models are tiny: XLA's CPU compile takes far longer than running them, so the suite compiles without
# LLVM's optimisation passes and with XLA's older (non-MLIR) fusion emitters, which compile a tiny BERT step 2× faster
# again at this level (test_benchmarks' JSON test: 108 s → 66 s). Benchmarks and experiments keep XLA's defaults:
# at full optimisation the older emitters compile MiniLM's step 2× slower and run it 18% slower.
os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), "--xla_backend_optimization_level=0",
                                                 "--xla_cpu_use_fusion_emitters=false"]))

import jax
import jax.numpy as jnp
import pytest


@pytest.fixture
def x64():
  """Run the test body with float64 enabled (exact comparisons against dense references)."""
  with jax.enable_x64(True):
    yield


def init_mlp(key, sizes, dtype=jnp.float64):
  params = {}
  for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
    key, k1, k2 = jax.random.split(key, 3)
    params[f"layer_{i}"] = {"kernel": jax.random.normal(k1, (a, b), dtype) / jnp.sqrt(a),
                            "bias": 0.1 * jax.random.normal(k2, (b,), dtype)}
  return params


def mlp(params, x):
  """x [N, D] -> logits [N, K]."""
  n = len(params)
  for i in range(n):
    x = x @ params[f"layer_{i}"]["kernel"] + params[f"layer_{i}"]["bias"]
    if i < n - 1:
      x = jnp.tanh(x)
  return x


def init_attention(key, d=4, k=3, dtype=jnp.float64):
  ks = jax.random.split(key, 5)
  w = lambda kk, shape: jax.random.normal(kk, shape, dtype) / jnp.sqrt(shape[0])
  return {"q": w(ks[0], (d, d)), "k": w(ks[1], (d, d)), "v": w(ks[2], (d, d)),
          "ln_scale": jnp.ones((d,), dtype) + 0.1 * jax.random.normal(ks[3], (d,), dtype),
          "head": w(ks[4], (d, k))}


def attention_block(params, x):
  """x [N, T, D] -> logits [N, K]: one self-attention head, residual, layer norm, mean-pool, linear head."""
  q, k, v = x @ params["q"], x @ params["k"], x @ params["v"]
  a = jax.nn.softmax(q @ jnp.swapaxes(k, -1, -2) / jnp.sqrt(x.shape[-1]), axis=-1)
  h = x + a @ v
  h = (h - h.mean(-1, keepdims=True)) / jnp.sqrt(h.var(-1, keepdims=True) + 1e-6) * params["ln_scale"]
  return h.mean(1) @ params["head"]


SHARED_DATA = __import__("pathlib").Path(os.environ.get(
    "FIPJAX_DATA_DIR", __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir():
  if not (SHARED_DATA / "yelp" / "train.jsonl").exists():
    pytest.fail(f"real data not found at {SHARED_DATA}; set FIPJAX_DATA_DIR to the folder holding yelp/ and imdb/")
  return SHARED_DATA


@pytest.fixture(scope="session")
def small_bert(tmp_path_factory):
  """The packaged MiniLM cut to its first layer, as a local checkpoint directory: a real BERT that compiles
  several times faster than six layers, for end-to-end runs."""
  import json
  import shutil
  from safetensors.numpy import load_file, save_file
  from fipjax.models import hub
  src, out = hub.packaged_minilm_dir(), tmp_path_factory.mktemp("small_bert")
  for f in src.iterdir():
    if f.name not in ("model.safetensors", "config.json") and f.is_file():
      shutil.copy(f, out / f.name)
  config = json.loads((src / "config.json").read_text())
  (out / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
  keep = lambda name: not any(f"layer.{i}." in name for i in range(1, config["num_hidden_layers"]))
  save_file({k: v for k, v in load_file(str(src / "model.safetensors")).items() if keep(k)},
            str(out / "model.safetensors"))
  return out


@pytest.fixture(scope="session")
def small_llama(tmp_path_factory):
  """A one-layer random Llama (width 64) with SmolLM2's tokenizer and vocabulary, as a Hugging Face directory:
  the causal LM of end-to-end runs."""
  torch = pytest.importorskip("torch")
  import transformers
  from fipjax.models import hub
  out = tmp_path_factory.mktemp("small_llama")
  tokenizer = hub.load_llama_tokenizer("smollm2")
  torch.manual_seed(0)
  config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                    max_position_embeddings=128, tie_word_embeddings=True,
                                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
  transformers.LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
  tokenizer.save_pretrained(out)
  return out


# The end-to-end files first: with `-n 2 --dist loadfile` a long file scheduled last leaves the other worker idle.
_LONG_FILES = ("test_yelp_imdb.py", "test_benchmarks.py", "test_align.py", "test_streams.py", "test_continual_dpo.py",
               "test_llama.py", "test_alignment.py", "test_families.py", "test_models.py", "test_benchmark_e2e.py",
               "test_split_digits.py", "test_export.py", "test_notebooks.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(_LONG_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
