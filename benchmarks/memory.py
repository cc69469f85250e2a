"""Peak memory of each method's training step as the training loop runs it (parameters and optimiser state
donated), from XLA's memory analysis of the compiled step: compiled from shapes, never run, so it takes seconds of
memory and measures models larger than the machine.

    python -m benchmarks.memory --json runs/memory.json                  # MiniLM 16 + 16 × 128; SmolLM2 DPO 4 + 4 × 64
    python -m benchmarks.memory --model tiny --seq 16 --batch 2 --replay-batch 2 --dpo-model random:1:64 --dpo-seq 8

``fipjax.continual.peak_bytes`` counts arguments, outputs not aliased to them and temporaries (XLA's CPU peak leaves
the temporaries out). The BERT steps are benchmarks.run's, the decoder steps benchmarks.dpo's.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax

from benchmarks import dpo as dpo_bench
from benchmarks.run import DTYPES, Setup, cli, timed_steps
from fipjax import continual

RATIOS = {"fip_over_naive_peak_memory": ("fip", "naive"), "lorafip_over_lora_peak_memory": ("lora-fip", "lora"),
          "fip_over_naive_combined_peak_memory": ("fip", "naive_combined"),
          "fipdpo_over_dpo_peak_memory": ("fip-dpo", "dpo"),
          "lorafipdpo_over_loradpo_peak_memory": ("lora-fip-dpo", "lora-dpo")}


def step_peaks(steps) -> dict[str, int]:
  """``{name: peak bytes}`` of ``(name, method, params, batch)`` steps (:func:`fipjax.continual.step_peak_bytes`)."""
  return {name: continual.step_peak_bytes(method, params, batch) for name, method, params, batch in steps}


def run(args) -> dict:
  s = Setup(args.model, args.batch, args.replay_batch, args.seq, DTYPES[args.dtype])
  peaks = step_peaks((name, m, s.params, {**b, "rng": jax.random.PRNGKey(0)}) for name, m, b in timed_steps(s))
  config = {"model": args.model, "batch": args.batch, "replay_batch": args.replay_batch, "seq": args.seq,
            "dtype": args.dtype, "device": jax.devices()[0].device_kind}
  if args.dpo_model != "none":
    params, apply, _, new, replay = dpo_bench.setup(args.dpo_model, args.pairs, args.old, args.dpo_seq, args.top_k)
    peaks.update(step_peaks((name, m, params, dpo_bench.step_batch(m, new, replay))
                            for name, m in dpo_bench.methods(apply, beta=0.1, lora_targets=args.lora_targets).items()))
    config.update(dpo_model=args.dpo_model, pairs=args.pairs, old=args.old, dpo_seq=args.dpo_seq,
                  lora_targets=args.lora_targets)
  return {"config": config, "peak_bytes": peaks,
          **{k: peaks[a] / peaks[b] for k, (a, b) in RATIOS.items() if a in peaks}}


def table(result: dict) -> str:
  rows = [f"{k:40s} {v:.3f}" for k, v in result.items() if k in RATIOS]
  return "\n".join(rows + [f"{n:40s} {b / 2**20:9.1f} MiB" for n, b in result["peak_bytes"].items()])


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="minilm", help="BERT: 'tiny', 'random:L:H', 'minilm', a directory or hub id")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--replay-batch", type=int, default=16)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--dpo-model", default="smollm2",
                 help="decoder of the DPO steps (benchmarks.dpo): 'smollm2', 'random:L:H', ...; 'none' skips them")
  p.add_argument("--dpo-seq", type=int, default=64, help="tokens per DPO sequence")
  p.add_argument("--pairs", type=int, default=4, help="preference pairs per DPO step")
  p.add_argument("--old", type=int, default=4, help="earlier rounds' sequences per FIP-DPO step")
  p.add_argument("--top-k", type=int, default=32, help="stored reference tokens per position")
  dpo_bench.add_lora_targets(p)
  p.add_argument("--json", type=pathlib.Path, default=None)
  return cli(p, run, table, argv)


if __name__ == "__main__":
  sys.exit(main())
