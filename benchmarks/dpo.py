"""Continual DPO's costs: FIP-DPO against DPO, in full and inside LoRA, on a Llama decoder (#12 §5).

    python -m benchmarks.dpo --json runs/bench-dpo.json                 # the packaged SmolLM2-135M
    python -m benchmarks.dpo --model random:2:64 --pairs 2 --seq 16     # a random 2-layer decoder (CI size)

One training step of each method, compiled once: peak memory from XLA's memory analysis, median step time
(interleaved rounds). DPO uses stored reference log-probabilities (no reference model); FIP-DPO adds the penalty on
an earlier round's sequences with the reference distributions stored as top-k (``--top-k``), differentiated in a
second pass after the DPO backward pass (so it adds time, not peak memory).
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from benchmarks import common
from fipjax import continual, dpo, lora, sequences
from fipjax import tree as tu
from fipjax.models import hub, llama

KEYS = ("fipdpo_over_dpo_peak_memory", "lorafipdpo_over_loradpo_peak_memory", "fipdpo_over_dpo_step_time",
        "lorafipdpo_over_loradpo_step_time", "stored_reference_bytes_per_token", "stored_reference_fraction")
"""The figures of a run (``benchmarks.run`` copies them into its own result)."""


@dataclasses.dataclass(frozen=True)
class DecoderSteps:
  """The DPO steps measured: the batch of each and where LoRA goes (also ``benchmarks.memory``'s)."""
  pairs: int = common.flag(4, "preference pairs per step")
  old: int = common.flag(4, "earlier rounds' sequences per step (FIP's replay)")
  top_k: int = common.flag(32, "stored reference tokens per position")
  beta: float = common.flag(0.1, "DPO's β")
  lora_targets: str = common.flag(llama.LORA_TARGETS[0], "regex of the decoder kernels LoRA adapts (default: q/v)")


@dataclasses.dataclass(frozen=True)
class DpoOptions(DecoderSteps):
  """``python -m benchmarks.dpo``: the decoder, its sequences, and the timing repeats."""
  model: str = common.flag("smollm2", "'smollm2', 'random:L:H', a .gguf file, a directory or hub id")
  seq: int = common.flag(64, "tokens per sequence (the second half is the response)")
  repeats: int = common.flag(3, "timed runs of each step (the median is kept)")


def load(model: str):
  """(graphdef, params) of ``'smollm2'``, a checkpoint, or ``'random:L:H'`` (L layers of width H, 64-wide heads,
  at most a third as many key-value heads, SmolLM2's vocabulary and tied embeddings)."""
  if not model.startswith("random:"):
    graphdef, params, _, _ = hub.load_llama(model)
    return graphdef, params
  layers, hidden = common.random_spec(model)
  heads = hidden // 64
  kv = max(d for d in range(1, heads + 1) if heads % d == 0 and d <= max(1, heads // 3))   # SmolLM2's 3:1 or less
  cfg = llama.LlamaConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=True)
  return llama.split_params(llama.LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)))


def batches(apply, params, vocab: int, pairs: int, old: int, seq: int, k: int, seed: int = 0):
  """A preference batch with stored reference log-probabilities, and an earlier round's sequences with their
  stored top-k reference distributions."""
  rng = np.random.default_rng(seed)
  seqs = lambda n: {"input_ids": jnp.asarray(rng.integers(0, vocab, (n, seq)), jnp.int32),
                    "attention_mask": jnp.ones((n, seq), jnp.int32),
                    "response_mask": jnp.asarray(np.arange(seq) >= seq // 2, jnp.int32)[None].repeat(n, 0)}
  new = {"chosen": seqs(pairs), "rejected": seqs(pairs)}
  new.update(jax.jit(lambda p, b: dpo.reference_logprobs(apply, p, b))(params, new))
  replay = seqs(old)
  replay["ref"] = tuple(jax.jit(lambda p, b: sequences.reference_topk(apply, p, b, k))(params, replay))
  return new, replay


def methods(apply, steps: DecoderSteps) -> dict[str, continual.Method]:
  """DPO and FIP-DPO (the penalty at weight 1), in full and inside LoRA (r 8 on the kernels ``steps.lora_targets``
  matches)."""
  task, optimizer = dpo.task_loss(apply, beta=steps.beta), optax.adamw(1e-5)
  out = {"dpo": continual.naive(task, optimizer),
         "fip-dpo": continual.penalised("fip-dpo", task, sequences.fip_penalty(apply, beta=1.0), optimizer)}
  config = lora.LoraConfig(targets=(steps.lora_targets,), rank=8, alpha=16)
  return {**out, **{f"lora-{n}": continual.with_lora(m, config, jax.random.key(0)) for n, m in out.items()}}


def setup(model: str, seq: int, steps: DecoderSteps):
  """(params, apply, vocabulary size, preference batch, earlier round's sequences) of :func:`load` and
  :func:`batches`."""
  graphdef, params = load(model)
  apply = llama.make_apply(graphdef)
  vocab = params["model"]["embed_tokens"]["embedding"].shape[0]
  return (params, apply, vocab, *batches(apply, params, vocab, steps.pairs, steps.old, seq, steps.top_k))


def step_batch(method: continual.Method, new: dict, replay: dict) -> dict:
  """A step's batch: the preference pairs, and the earlier round's sequences where ``method`` replays them."""
  return {"new": new, **({"replay": replay} if method.needs_replay else {})}


def run(opts: DpoOptions) -> dict:
  params, apply, vocab, new, replay = setup(opts.model, opts.seq, opts)
  calls, peaks = {}, {}
  for name, method in methods(apply, opts).items():
    step, *state = continual.train_step(method, params, donate=False)
    calls[name], compiled = common.compiled_call(step, *state, step_batch(method, new, replay))
    peaks[name] = continual.peak_bytes(compiled)
  times = common.interleaved_times(calls, opts.repeats)
  stored = sequences.TopK(*replay["ref"]).bytes_per_token()
  return {
      "config": {"model": opts.model, "params": tu.tree_size(params), "vocab": vocab, "pairs": opts.pairs,
                 "old_sequences": opts.old, "seq": opts.seq, "top_k": opts.top_k, "lora_targets": opts.lora_targets,
                 "device": f"{jax.devices()[0].device_kind} ×{jax.device_count()}", "repeats": opts.repeats},
      "times_s": times, "peak_bytes": peaks,
      "fipdpo_over_dpo_peak_memory": peaks["fip-dpo"] / peaks["dpo"],
      "lorafipdpo_over_loradpo_peak_memory": peaks["lora-fip-dpo"] / peaks["lora-dpo"],
      "fipdpo_over_dpo_step_time": times["fip-dpo"] / times["dpo"],
      "lorafipdpo_over_loradpo_step_time": times["lora-fip-dpo"] / times["lora-dpo"],
      "stored_reference_bytes_per_token": stored,
      "stored_reference_fraction": stored / (4 * vocab),
  }


def table(result: dict) -> str:
  rows = [f"{k:40s} {result[k]:.4g}" for k in KEYS]
  rows += [f"{n:40s} {result['times_s'][n] * 1e3:9.1f} ms  {result['peak_bytes'][n] / 2**20:9.1f} MiB"
           for n in result["times_s"]]
  return "\n".join(rows)


def parse_args(argv=None) -> tuple[DpoOptions, pathlib.Path | None]:
  return common.parse_args(DpoOptions, __doc__, "python -m benchmarks.dpo", argv)


def main(argv=None) -> int:
  opts, out = parse_args(argv)
  return common.cli(lambda: run(opts), table, out)

if __name__ == "__main__":
  sys.exit(main())
