"""Scale figures without the hardware: one FIP-DPO training step of a Llama-3.2-1B- and a Llama-3.1-8B-shaped
decoder compiled (not run) on 1 and on 8 devices under FSDP, with each device's bytes from XLA's memory analysis.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m benchmarks.scale --json runs/scale.json
    python -m benchmarks.scale --shape tiny --json /tmp/scale.json        # CI size (it sets the 8 devices itself)

The parameters are shapes only (``jax.ShapeDtypeStruct`` with their ``NamedSharding``: :mod:`fipjax.sharding`'s
rules), so an 8B model's step compiles on a laptop. The step is the training loop's (:func:`fipjax.continual.
train_step`, its state donated): AdamW on every weight, the DPO loss on preference pairs with stored reference
log-probabilities, and FIP's penalty on an earlier round's sequences against their stored top-k distributions. Its
per-device bytes count the arguments (weights, AdamW's moments, the batch), the outputs not aliased to them, and
XLA's temporaries (:func:`fipjax.continual.peak_bytes`), each decoder layer rematerialised in the backward pass
(``--no-remat``: not); on 8 devices the ratio to one device is the figure
``fsdp8_step_bytes_per_device_over_one_device`` (issue 31's target ≤ 0.2: an eighth of the state, plus the layer
weights gathered one at a time and the activations of an eighth of the batch).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import sys
import time

if __name__ == "__main__" and "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from benchmarks import common, dpo as dpo_bench
from fipjax import continual, precision, sharding
from fipjax import tree as tu
from fipjax.models import llama

SHAPES = {
    # huggingface.co/meta-llama/Llama-3.2-1B/config.json
    "llama-3.2-1b": llama.LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                                      num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                                      head_dim=64, rope_theta=500000.0, tie_word_embeddings=True),
    # huggingface.co/meta-llama/Llama-3.1-8B/config.json
    "llama-3.1-8b": llama.LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                      head_dim=128, rope_theta=500000.0, tie_word_embeddings=False),
    # huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct/config.json: the model the CPU runs align
    "smollm2-135m": llama.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                      num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0,
                                      tie_word_embeddings=True),
    "tiny": llama.LlamaConfig(vocab_size=49152, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True),
}
KEYS = ("fsdp8_step_bytes_per_device_over_one_device",)


@dataclasses.dataclass(frozen=True)
class ScaleOptions(dpo_bench.DecoderSteps):
  """``python -m benchmarks.scale``: which shapes, and the step's batch (pairs and old sequences: multiples of 8)."""
  shape: str = common.flag("llama-3.2-1b,llama-3.1-8b", f"comma-separated: {', '.join(SHAPES)}")
  seq: int = common.flag(256, "tokens per sequence (the second half is the response)")
  pairs: int = common.flag(8, "preference pairs per step")
  old: int = common.flag(8, "earlier rounds' sequences per step (FIP's replay)")
  no_remat: bool = common.flag(False, "keep every layer's activations for the backward pass (default: each decoder "
                               "layer rematerialised, as large-model FSDP runs do)")
  param_dtype: str = common.flag("float32", "float32, or bfloat16: the weights stored in bfloat16 with float32 master "
                                 "weights and moments in the optimiser (fipjax.precision)")
  dtype: str = common.flag("float32", "compute dtype: float32 or bfloat16")


def abstract_params(cfg: llama.LlamaConfig, dtype=jnp.float32) -> dict:
  """The decoder's parameters as shapes of ``dtype`` (nothing allocated)."""
  module = nnx.eval_shape(lambda: llama.LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)))
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype),
                      nnx.to_pure_dict(nnx.state(module, nnx.Param)))


def abstract_batch(cfg: llama.LlamaConfig, opts: ScaleOptions) -> dict:
  """The FIP-DPO step's batch as shapes: the structure :func:`benchmarks.dpo.batches` builds, from a one-layer
  decoder of the same vocabulary."""
  small = dataclasses.replace(cfg, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1,
                              num_key_value_heads=1, head_dim=64)
  graphdef, params = llama.split_params(llama.LlamaForCausalLM(small, rngs=nnx.Rngs(0)))
  new, replay = dpo_bench.batches(llama.make_apply(graphdef), params, cfg.vocab_size, opts.pairs, opts.old,
                                  opts.seq, opts.top_k)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), {"new": new, "replay": replay})


def step_bytes(cfg: llama.LlamaConfig, batch: dict, opts: ScaleOptions, devices) -> dict:
  """Compile one FIP-DPO step on an FSDP mesh over ``devices``: per-device bytes (XLA's memory analysis) and the
  logical and per-device bytes of the weights and AdamW's state."""
  mesh = sharding.fsdp_mesh(devices)
  module = nnx.eval_shape(lambda: llama.LlamaForCausalLM(cfg, dtype=jnp.dtype(opts.dtype), remat=not opts.no_remat,
                                                          rngs=nnx.Rngs(0)))
  graphdef = nnx.graphdef(module)
  method = dpo_bench.methods(llama.make_apply(graphdef), opts)["fip-dpo"]
  step, trainable, frozen, opt_state = continual.train_step(
      method, abstract_params(cfg, precision.PARAM_DTYPES[opts.param_dtype]), abstract=True)
  placed = lambda tree: jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, s)), tree,
      sharding.param_specs(tree, sharding.RULES, mesh))        # AdamW's moments: the rules match their path ends
  state = placed((trainable, frozen, opt_state))
  n = len(devices)
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=NamedSharding(mesh, P(sharding.FSDP) if x.ndim and x.shape[0] % n == 0 else P())),
      batch)
  start = time.perf_counter()
  compiled = step.lower(*state, batch).compile()
  seconds = time.perf_counter() - start
  stats = compiled.memory_analysis()
  total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  per_device = sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize for x in jax.tree.leaves(state))
  return {"devices": n, "step_bytes_per_device": continual.peak_bytes(compiled),
          "temp_bytes_per_device": int(stats.temp_size_in_bytes), "state_bytes": total,
          "state_bytes_per_device": per_device, "compile_s": seconds}


def run(opts: ScaleOptions) -> dict:
  for flag, value in (("--param-dtype", opts.param_dtype), ("--dtype", opts.dtype)):
    if value not in ("float32", "bfloat16"):
      raise common.OptionError(f"{flag} {value}: float32 or bfloat16.")
  if jax.device_count() < 8:
    raise common.OptionError(f"benchmarks.scale needs 8 devices, this process has {jax.device_count()}: run it as "
                     "XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m benchmarks.scale (as a module it "
                     "sets the flag itself).")
  out = {"config": {"remat": not opts.no_remat, "seq": opts.seq, "pairs": opts.pairs, "old_sequences": opts.old,
                    "top_k": opts.top_k, "device": f"{jax.devices()[0].device_kind} ×{jax.device_count()}",
                    "param_dtype": opts.param_dtype, "dtype": opts.dtype,
                    "optimizer": "adamw (float32 moments" + (
                        ", float32 master weights)" if opts.param_dtype != "float32" else ")")}, "shapes": {}}
  for name in opts.shape.split(","):
    if name not in SHAPES:
      raise common.OptionError(f"--shape {name}: not one of {', '.join(SHAPES)}.")
    cfg = SHAPES[name]
    batch = abstract_batch(cfg, opts)
    one, eight = (step_bytes(cfg, batch, opts, jax.devices()[:k]) for k in (1, 8))
    out["shapes"][name] = {"params": tu.tree_size(abstract_params(cfg)), "one_device": one, "eight_devices": eight,
                           "ratio": eight["step_bytes_per_device"] / one["step_bytes_per_device"]}
  # The figure benchmarks.run reports: the largest shape measured.
  out["fsdp8_step_bytes_per_device_over_one_device"] = max(s["ratio"] for s in out["shapes"].values())
  return out


def table(result: dict) -> str:
  rows = ["| shape | parameters | step bytes / device, 1 device | 8 devices | ratio | weights + AdamW / device, 8 "
          "devices (of total) | compile s (1 / 8) |", "|---|---|---|---|---|---|---|"]
  gib = lambda b: f"{b / 2**30:.2f} GiB"
  for name, s in result["shapes"].items():
    one, eight = s["one_device"], s["eight_devices"]
    rows.append(f"| {name} | {s['params'] / 1e9:.2f} B | {gib(one['step_bytes_per_device'])} | "
                f"{gib(eight['step_bytes_per_device'])} | {s['ratio']:.3f} | {gib(eight['state_bytes_per_device'])} "
                f"({gib(eight['state_bytes'])}) | {one['compile_s']:.0f} / {eight['compile_s']:.0f} |")
  return "\n".join(rows)


def parse_args(argv=None) -> tuple[ScaleOptions, pathlib.Path | None]:
  return common.parse_args(ScaleOptions, __doc__, "python -m benchmarks.scale", argv)


def main(argv=None) -> int:
  opts, out = parse_args(argv)
  return common.cli(lambda: run(opts), table, out)


if __name__ == "__main__":
  sys.exit(main())
