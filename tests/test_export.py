"""Export for serving: two months of LoRA on a one-layer random Llama, the full policy as a Hugging Face directory
(transformers' logits equal fipjax's) and the change as a PEFT adapter (PEFT's merge equals fipjax's merge)."""

import json
import zlib

import jax
import numpy as np
import pytest

from fipjax import export, lora, models
from fipjax import tree as tu

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TARGETS = r"(q_proj|v_proj)/kernel$"
IDS = np.array([[1, 5, 9, 300, 7000, 12, 44, 2], [3, 17, 250, 4000, 8, 90, 6, 11]], np.int32)


def two_months(params, key):
  """The policy after two months of LoRA (r = 2, α = 16) with random non-zero adapters, each merged at its end."""
  cfg = lora.LoraConfig(targets=(TARGETS,), rank=2)
  for month, scale in enumerate((1e-2, 1e-3)):
    k_init, k_b = jax.random.split(jax.random.fold_in(key, month))
    tp = lora.train_params(params, k_init, cfg)
    noise = lambda p, x: scale * jax.random.normal(jax.random.fold_in(k_b, zlib.crc32(p.encode())), x.shape, x.dtype)
    tp["lora"] = jax.tree_util.tree_map_with_path(
        lambda p, x: noise(tu.path_str(p), x) if tu.path_str(p).endswith("/b") else x, tp["lora"])
    params = lora.to_model(tp, cfg)
  return jax.tree.map(np.asarray, params)


@pytest.fixture(scope="module")
def months(small_llama):
  model = models.load(small_llama)
  return model, jax.tree.map(np.asarray, model.params), two_months(model.params, jax.random.key(0))


@pytest.fixture(scope="module")
def exported(months, small_llama, tmp_path_factory):
  model, _, policy = months
  tokenizer = models.load_llama_tokenizer(small_llama)
  exporter = export.Exporter(tmp_path_factory.mktemp("export"), model, tokenizer, lora_targets=TARGETS,
                             base_model_path=str(small_llama))
  return exporter("m2", policy)


def fipjax_logits(model, params):
  return np.asarray(model.apply(params, {"input_ids": IDS, "attention_mask": np.ones_like(IDS)}))


def torch_logits(hf_model):
  with torch.no_grad():
    return hf_model(torch.tensor(IDS, dtype=torch.long)).logits.numpy()


def test_the_export_loads_in_transformers_with_the_policys_logits(months, exported):
  model, _, policy = months
  assert {"adapter", "config.json", "model.safetensors"} <= {p.name for p in exported.iterdir()}
  hf = transformers.AutoModelForCausalLM.from_pretrained(exported, attn_implementation="eager")
  assert type(hf).__name__ == "LlamaForCausalLM"       # the full policy, not the adapter in its subfolder
  np.testing.assert_allclose(torch_logits(hf), fipjax_logits(model, policy), atol=1e-5, rtol=0)


def test_peft_merges_the_adapter_into_the_policys_weights(months, exported, small_llama):
  peft = pytest.importorskip("peft")
  model, base, policy = months
  config = json.loads((exported / "adapter" / "adapter_config.json").read_text())
  assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (4, 4, ["q_proj", "v_proj"])
  adapter = export.peft_adapter(base, policy, TARGETS)
  assert set(adapter["ranks"].values()) == {4}          # two months × r = 2, exactly
  base_hf = transformers.AutoModelForCausalLM.from_pretrained(small_llama, attn_implementation="eager")
  merged = peft.PeftModel.from_pretrained(base_hf, exported / "adapter").merge_and_unload()
  theirs = {k: v.numpy() for k, v in merged.state_dict().items()}
  ours = export.hf_tensors(policy)
  for name, w in ours.items():
    np.testing.assert_allclose(theirs[name], w, atol=1e-5, rtol=0, err_msg=name)
  base_hf_names = export.hf_tensors(base)
  changed = [n for n in ours if not np.array_equal(ours[n], base_hf_names[n])]
  assert sorted(changed) == ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight"]
  np.testing.assert_allclose(torch_logits(merged), fipjax_logits(model, policy), atol=1e-4, rtol=0)


def test_without_a_base_directory_the_base_is_exported_once_and_named(months, small_llama, tmp_path):
  peft = pytest.importorskip("peft")
  model, _, policy = months
  root = tmp_path / "export"
  exporter = export.Exporter(root, model, models.load_llama_tokenizer(small_llama), lora_targets=TARGETS)
  out = exporter("m2", policy)
  assert sorted(p.name for p in root.iterdir()) == ["base", "m2"]
  config = json.loads((out / "adapter" / "adapter_config.json").read_text())
  assert config["base_model_name_or_path"] == str((root / "base").resolve())
  hf = peft.AutoPeftModelForCausalLM.from_pretrained(out / "adapter", attn_implementation="eager").merge_and_unload()
  np.testing.assert_allclose(torch_logits(hf), fipjax_logits(model, policy), atol=1e-4, rtol=0)


def test_a_changed_non_target_weight_is_refused(months, tmp_path):
  _, base, policy = months
  bad = jax.tree_util.tree_map_with_path(
      lambda p, x: x + np.float32(1e-3) if tu.path_str(p).endswith("mlp/up_proj/kernel") else x, policy)
  with pytest.raises(ValueError, match="mlp/up_proj/kernel differs"):
    export.export_peft(tmp_path / "adapter", base, bad, targets=TARGETS, base_model_path="base")
  assert not (tmp_path / "adapter").exists()
  model, _, _ = months
  tokenizer = models.load_llama_tokenizer(model.report.model_dir)
  exporter = export.Exporter(tmp_path / "export", model, tokenizer, lora_targets=TARGETS, base_model_path="base")
  with pytest.raises(ValueError, match="mlp/up_proj/kernel differs"):
    exporter("m1", bad)
  assert sorted(p.name for p in (tmp_path / "export").iterdir()) == []     # no half-written month


def test_a_subset_of_layers_names_its_modules_in_full():
  base = {"model": {"layers": {str(i): {"self_attn": {"q_proj": {"kernel": np.eye(4, dtype=np.float32)}}}
                               for i in range(2)}}}
  policy = jax.tree.map(lambda x: x, base)
  policy["model"]["layers"]["1"]["self_attn"]["q_proj"]["kernel"] = np.eye(4, dtype=np.float32) + np.outer(
      np.arange(4), np.ones(4)).astype(np.float32)
  adapter = export.peft_adapter(base, policy, r"layers/1/.*q_proj/kernel$")
  assert adapter["target_modules"] == ["model.layers.1.self_attn.q_proj"] and adapter["r"] == 1
  a = adapter["tensors"]["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"]
  b = adapter["tensors"]["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]
  np.testing.assert_allclose(b @ a, np.outer(np.arange(4), np.ones(4)).T, atol=1e-6)


def test_bfloat16_weights_are_written_in_bfloat16_and_merged_kernels_in_float32():
  import ml_dtypes
  bf16 = lambda x: np.asarray(x, ml_dtypes.bfloat16)
  base = {"model": {"embed_tokens": {"embedding": bf16(np.ones((3, 4)))},
                    "q_proj": {"kernel": bf16(np.eye(4))}}, "steps": np.int32(3)}
  assert export.export_dtype(base) == ml_dtypes.bfloat16
  assert export.hf_tensors(base)["model.q_proj.weight"].dtype == ml_dtypes.bfloat16
  a, b = np.full((1, 4), 1e-3), np.full((4, 1), 1.0)                    # a change under bfloat16's resolution at 1
  merged = export.apply_deltas(base, {"model/q_proj/kernel": (a, b)})
  assert merged["model"]["q_proj"]["kernel"].dtype == np.float32 and export.export_dtype(merged) == np.float32
  np.testing.assert_allclose(merged["model"]["q_proj"]["kernel"], np.eye(4) + 1e-3, rtol=1e-6)
  assert export.export_dtype({"w": np.ones(2, np.float64)}) == np.float32
