"""FSDP: the rule tables' partition specs, and on 8 host devices the same training steps as on one (FIP on BERT's
logits, its geodesic form's G·v products, FIP-DPO on a Llama's token distributions, and LoRA-FIP-DPO) with each
device holding an eighth of the parameters and optimiser state."""

import json
import os
import subprocess
import sys

import pytest
from jax.sharding import PartitionSpec as P

from fipjax import sharding


@pytest.mark.parametrize("path, shape, spec", [
    ("model/embed_tokens/embedding", (49152, 128), P(None, "fsdp")),
    ("model/layers/0/mlp/down_proj/kernel", (512, 128), P("fsdp")),          # the MLP width comes first
    ("model/layers/0/self_attn/q_proj/kernel", (128, 128), P("fsdp")),
    ("model/layers/0/self_attn/o_proj/kernel", (128, 128), P(None, "fsdp")),  # heads stay whole
    ("model/layers/0/input_layernorm/weight", (128,), P()),                   # vectors are replicated
    ("model/layers/0/self_attn/k_proj/kernel", (36, 64), P()),                # 36 is not divisible by 8
    ("model/unknown/kernel", (128, 128), P()),                                # no rule: replicated
])
def test_llama_rules(path, shape, spec):
  assert sharding.partition_spec(path, shape, sharding.LLAMA_RULES, 8) == spec


def test_bert_rules():
  spec = lambda path, shape: sharding.partition_spec(path, shape, sharding.BERT_RULES, 4)
  assert spec("bert/encoder/layer/0/attention/self/query/kernel", (384, 384)) == P("fsdp")
  assert spec("bert/encoder/layer/0/intermediate/dense/kernel", (384, 1536)) == P("fsdp")
  assert spec("bert/encoder/layer/0/output/dense/kernel", (1536, 384)) == P("fsdp")
  assert spec("bert/embeddings/word_embeddings/embedding", (30522, 384)) == P(None, "fsdp")
  assert spec("bert/encoder/layer/0/output/dense/bias", (384,)) == P()
  assert spec("heads/yelp/kernel", (384, 5)) == P()


CHECK = r"""
import json, jax, jax.numpy as jnp, numpy as np, optax
from flax import nnx
from benchmarks import dpo as b
from fipjax import config as cf, continual, parallel, sharding
from fipjax.models import bert

assert jax.device_count() == 8
mesh = sharding.fsdp_mesh()
out = {}

def compare(name, method, params, batch, rules, steps=3):
  p1, s1, h1 = continual.fit(method, params, iter([batch] * steps), steps)
  p8, s8, h8 = continual.fit(method, sharding.shard_params(params, mesh, rules),
                             iter([parallel.shard_batch(batch, mesh)] * steps), steps)
  diff = lambda a, c: max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in
                          zip(jax.tree.leaves(a), jax.tree.leaves(c)))
  out[name] = {"loss_1": [h["loss"] for h in h1], "loss_8": [h["loss"] for h in h8], "param_diff": diff(p1, p8),
               "params": sharding.bytes_per_device(p8), "opt_state": sharding.bytes_per_device(s8.opt_state)}

# FIP (penalty) and fip-geodesic (adam form: CG on κG + D, G·v by linearize/transpose) on a 2-layer BERT's logits.
cfg = bert.BertConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=128, max_position_embeddings=32, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0)
graphdef, params = nnx.split(bert.BertClassifier(cfg, {"a": 3, "b": 2}, rngs=nnx.Rngs(0)), nnx.Param)
params = nnx.to_pure_dict(params)
apply = bert.make_apply(graphdef)
rng = np.random.default_rng(0)
inputs = lambda n: {"input_ids": jnp.asarray(rng.integers(1, 96, (n, 16)), jnp.int32),
                    "attention_mask": jnp.ones((n, 16), jnp.int32)}
x_new, y_new, x_old = inputs(16), jnp.asarray(rng.integers(0, 2, 16)), inputs(8)
loss = lambda p, batch, rng=None: optax.softmax_cross_entropy_with_integer_labels(
    apply(p, batch[0])["b"], batch[1]).mean()
old_logits = lambda p, x: apply(p, x)["a"]
old = continual.OldTask(old_logits, old_logits, None, lambda n: x_old)
ctx = continual.StageContext(loss, {"a": old}, params, None, r"^heads/b/", seed=0)
# Stored outputs of a slightly different network: at the stored network itself the penalty's gradient is rounding
# noise, which AdamW's normalisation turns into full steps that differ with the summation order.
moved = jax.tree.map(lambda w: w + 0.02 * jnp.asarray(rng.standard_normal(w.shape), w.dtype), params)
replay = {"a": {"inputs": x_old, "ref_outputs": old_logits(moved, x_old)}}
hp = cf.with_values(continual.MethodConfig(), {"fip.beta": 10.0, "geodesic.kappa": 10.0, "geodesic.cg_iters": 3})
for name in ("fip", "fip-geodesic"):
  method = continual.build(name, ctx, hp, continual.OptimConfig(lr=1e-3))
  compare(name, method, params, {"new": (x_new, y_new), "replay": replay}, sharding.BERT_RULES)

# FIP-DPO and LoRA-FIP-DPO on a 2-layer Llama (SmolLM2's vocabulary, width 128).
steps = b.DecoderSteps(pairs=8, old=8)
params, apply, vocab, new, replay = b.setup("random:2:128", 32, steps)
for name, method in b.methods(apply, steps).items():
  if "fip" in name:
    compare(name, method, params, b.step_batch(method, new, replay), sharding.LLAMA_RULES)
print("RESULT " + json.dumps(out))
"""


def test_eight_devices_train_as_one_with_an_eighth_of_the_state_each():
  env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=env,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert done.returncode == 0, done.stderr[-3000:]
  got = json.loads(done.stdout.split("RESULT ", 1)[1])
  assert set(got) == {"fip", "fip-geodesic", "fip-dpo", "lora-fip-dpo"}
  for name, r in got.items():
    assert r["loss_8"] == pytest.approx(r["loss_1"], rel=1e-5, abs=1e-6), name
    assert r["param_diff"] < 1e-5, name
  for name in ("fip", "fip-geodesic", "fip-dpo"):      # the full model's weights and AdamW moments
    for part in ("params", "opt_state"):
      b = got[name][part]
      assert b["max_per_device"] <= b["total"] / 8 * 1.05 + 4096, (name, part, b)


RESHARD = r"""
import sys, jax, numpy as np
from benchmarks import dpo as b
from fipjax import checkpoint, sharding
_, params = b.load("random:1:128")
mesh = sharding.fsdp_mesh()
placed = sharding.shard_params(params, mesh, sharding.LLAMA_RULES)
if sys.argv[1] == "save":
  checkpoint.save(sys.argv[2], placed)
else:
  got = checkpoint.restore(sys.argv[2], placed)
  for x, y, want in zip(jax.tree.leaves(got), jax.tree.leaves(params), jax.tree.leaves(placed)):
    assert x.sharding == want.sharding and np.array_equal(np.asarray(x), np.asarray(y))
  print("RESTORED", jax.device_count(), sharding.bytes_per_device(got)["max_per_device"])
"""


def test_a_checkpoint_written_on_8_devices_restores_on_1_and_on_4(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  run = lambda n, *args: subprocess.run(
      [sys.executable, "-c", RESHARD, *args], capture_output=True, text=True, cwd=root,
      env=dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}"))
  done = run(8, "save", str(tmp_path / "ckpt"))
  assert done.returncode == 0, done.stderr[-3000:]
  per_device = {}
  for n in (1, 4):
    done = run(n, "restore", str(tmp_path / "ckpt"))
    assert done.returncode == 0, done.stderr[-3000:]
    count, nbytes = map(int, done.stdout.split("RESTORED ", 1)[1].split())
    per_device[count] = nbytes
  assert per_device[4] < per_device[1] / 3        # split four ways (norms replicated)
