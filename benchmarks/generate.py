"""Generation against transformers': the same weights, the same prompts, greedy, on this machine's CPU.

    python -m benchmarks.generate --json runs/bench-generate.json       # SmolLM2-135M, batch 16, 48 new tokens
    python -m benchmarks.generate --model DIR --batch 2 --new-tokens 4   # a Hugging Face directory (CI size)

Ours: :func:`fipjax.models.llama.generate` jitted once (KV cache, the loop on the device, compilation excluded).
Theirs: ``transformers``' ``generate`` (PyTorch, ``do_sample=False``, its KV cache, all the machine's threads).
Both produce exactly ``--new-tokens`` tokens (no end-of-sequence stop), so both do the same work; the figure is
``generate_ours_over_transformers_time`` (issue 31's target ≤ 1.0), with the share of generated tokens on which
the two agree (greedy decoding of float32 models: equal up to near-ties of the logits).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from fipjax import data
from fipjax.models import gguf, hub, llama

KEYS = ("generate_ours_over_transformers_time",)


@dataclasses.dataclass(frozen=True)
class GenerateOptions:
  model: str = common.flag("smollm2", "'smollm2', a .gguf file or a Hugging Face directory")
  batch: int = common.flag(16, "prompts generated together")
  prompt_tokens: int = common.flag(32, "tokens of each prompt (real reviews, cut to this length)")
  new_tokens: int = common.flag(48, "tokens generated per prompt")
  repeats: int = common.flag(3, "timed runs of each (the median is kept)")
  data_dir: str = common.flag(str(pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"),
                              "where imdb/test.jsonl is (the prompts)")


def torch_model(name: str):
  """transformers' LlamaForCausalLM with the weights fipjax loads (a GGUF file dequantised as transformers does)."""
  import torch
  import transformers
  if name == "smollm2" or name.endswith(".gguf"):
    config, tensors = gguf.read_gguf(gguf.packaged_smollm2() if name == "smollm2" else pathlib.Path(name))
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}, strict=False)
    model.tie_weights()
  else:
    model = transformers.AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
  return model.eval()


def prompts(tokenizer, batch: int, length: int, data_dir: str) -> np.ndarray:
  """``[batch, length]`` token ids: the openings of IMDB test reviews, no padding."""
  texts = data.load_task("imdb", "test", data_dir).texts[:4 * batch]
  rows = [ids[:length] for ids in (tokenizer(t)["input_ids"] for t in texts) if len(ids) >= length]
  if len(rows) < batch:
    raise common.OptionError(f"only {len(rows)} reviews have {length} tokens; lower --prompt-tokens or --batch")
  return np.asarray(rows[:batch], np.int32)


def run(opts: GenerateOptions) -> dict:
  import torch
  graphdef, params, cfg, _ = hub.load_llama(opts.model)
  tokenizer = hub.load_llama_tokenizer(opts.model)
  ids = prompts(tokenizer, opts.batch, opts.prompt_tokens, opts.data_dir)
  mask = np.ones_like(ids)
  ours = jax.jit(functools.partial(llama.generate, graphdef, max_new_tokens=opts.new_tokens, eos_id=None,
                                   greedy=True))
  call, _ = common.compiled_call(ours, params, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0))
  model = torch_model(opts.model)
  torch.set_num_threads(os.cpu_count())

  def theirs():
    with torch.no_grad():
      return model.generate(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                            max_new_tokens=opts.new_tokens, min_new_tokens=opts.new_tokens, do_sample=False,
                            pad_token_id=tokenizer.eos_token_id or 0)

  times = common.interleaved_times({"ours": call, "transformers": theirs}, opts.repeats)
  agree = float(np.mean(np.asarray(call().tokens) == theirs()[:, ids.shape[1]:].numpy()))
  return {"config": {"model": opts.model, "batch": opts.batch, "prompt_tokens": opts.prompt_tokens,
                     "new_tokens": opts.new_tokens, "repeats": opts.repeats, "threads": os.cpu_count(),
                     "device": f"{jax.devices()[0].device_kind} ×{jax.device_count()}", "layers":
                     cfg.num_hidden_layers, "hidden": cfg.hidden_size},
          "times_s": times, "tokens_per_s": {k: opts.batch * opts.new_tokens / v for k, v in times.items()},
          "greedy_token_agreement": agree,
          "generate_ours_over_transformers_time": times["ours"] / times["transformers"]}


def table(result: dict) -> str:
  rows = [f"{'generate_ours_over_transformers_time':40s} {result['generate_ours_over_transformers_time']:.3f}"]
  rows += [f"{k:40s} {v * 1e3:9.1f} ms  {result['tokens_per_s'][k]:8.1f} tokens/s" for k, v in
           result["times_s"].items()]
  rows.append(f"{'greedy tokens equal':40s} {result['greedy_token_agreement']:.3f}")
  return "\n".join(rows)


def parse_args(argv=None) -> tuple[GenerateOptions, pathlib.Path | None]:
  return common.parse_args(GenerateOptions, __doc__, "python -m benchmarks.generate", argv)


def main(argv=None) -> int:
  opts, out = parse_args(argv)
  return common.cli(lambda: run(opts), table, out)


if __name__ == "__main__":
  sys.exit(main())
