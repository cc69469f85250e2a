"""Peak memory of each method's training step as the training loop runs it (parameters and optimiser state
donated), from XLA's memory analysis of the compiled step: compiled from shapes, never run, so it takes seconds of
memory and measures models larger than the machine.

    python -m benchmarks.memory --json runs/memory.json         # MiniLM 16 + 16 × 128; SmolLM2 DPO 4 + 4 × 64
    python -m benchmarks.memory --model tiny --seq 16 --batch 2 --replay-batch 2 --dpo-model random:1:64 --dpo-seq 8

``fipjax.continual.peak_bytes`` counts arguments, outputs not aliased to them and temporaries (XLA's CPU peak leaves
the temporaries out). The BERT steps are benchmarks.run's, the decoder steps benchmarks.dpo's.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys

import jax

from benchmarks import common, dpo
from benchmarks.run import BertSteps, timed_steps
from fipjax import continual

RATIOS = {"fip_over_naive_peak_memory": ("fip", "naive"), "lorafip_over_lora_peak_memory": ("lora-fip", "lora"),
          "fip_over_naive_combined_peak_memory": ("fip", "naive_combined"),
          "fipdpo_over_dpo_peak_memory": ("fip-dpo", "dpo"),
          "lorafipdpo_over_loradpo_peak_memory": ("lora-fip-dpo", "lora-dpo")}


def step_peaks(steps) -> dict[str, int]:
  """``{name: peak bytes}`` of ``(name, method, params, batch)`` steps (:func:`fipjax.continual.step_peak_bytes`)."""
  return {name: continual.step_peak_bytes(method, params, batch) for name, method, params, batch in steps}


@dataclasses.dataclass(frozen=True)
class MemoryOptions(BertSteps, dpo.DecoderSteps):
  """``python -m benchmarks.memory``: benchmarks.run's BERT steps and benchmarks.dpo's decoder steps."""
  dpo_model: str = common.flag("smollm2", "decoder of the DPO steps (benchmarks.dpo): 'smollm2', 'random:L:H', ...; "
                               "'none' skips them")
  dpo_seq: int = common.flag(64, "tokens per DPO sequence")


def run(opts: MemoryOptions) -> dict:
  s = opts.setup()
  peaks = step_peaks((name, m, s.params, {**b, "rng": jax.random.PRNGKey(0)}) for name, m, b in timed_steps(s))
  config = {"model": opts.model, "batch": opts.batch, "replay_batch": opts.replay_batch, "seq": opts.seq,
            "dtype": opts.dtype, "device": jax.devices()[0].device_kind}
  if opts.dpo_model != "none":
    params, apply, _, new, replay = dpo.setup(opts.dpo_model, opts.dpo_seq, opts)
    peaks.update(step_peaks((name, m, params, dpo.step_batch(m, new, replay))
                            for name, m in dpo.methods(apply, opts).items()))
    config.update(dpo_model=opts.dpo_model, pairs=opts.pairs, old=opts.old, dpo_seq=opts.dpo_seq,
                  lora_targets=opts.lora_targets)
  return {"config": config, "peak_bytes": peaks,
          **{k: peaks[a] / peaks[b] for k, (a, b) in RATIOS.items() if a in peaks}}


def table(result: dict) -> str:
  rows = [f"{k:40s} {v:.3f}" for k, v in result.items() if k in RATIOS]
  return "\n".join(rows + [f"{n:40s} {b / 2**20:9.1f} MiB" for n, b in result["peak_bytes"].items()])


def parse_args(argv=None) -> tuple[MemoryOptions, pathlib.Path | None]:
  return common.parse_args(MemoryOptions, __doc__, "python -m benchmarks.memory", argv)


def main(argv=None) -> int:
  opts, out = parse_args(argv)
  return common.cli(lambda: run(opts), table, out)


if __name__ == "__main__":
  sys.exit(main())
