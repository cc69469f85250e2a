"""Speed and memory of FIP, as ratios measured in one process on one machine.

    python -m benchmarks.run --json runs/bench.json                 # MiniLM, batch 16 + replay 16, 128 tokens
    python -m benchmarks.run --model tiny --seq 32 --batch 4 --replay-batch 4 --repeats 2 --no-torch   # CI size

Every time is the median of ``--repeats`` runs after a warm-up (compilation excluded). Peak memory is the
compiled step's ``memory_analysis().peak_memory_in_bytes`` where XLA reports it (CPU, GPU), else the device's
``peak_bytes_in_use``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fipjax import continual, geometry, lora
from fipjax import tree as tu
from fipjax.models import bert, hub

TARGETS = {"gv_over_grad_time": 1.3, "fip_overhead_time": 1.05, "fip_over_naive_peak_memory": 1.05,
           "lorafip_over_lora_peak_memory": 1.05, "ours_fip_over_authors_fip_time": 0.67,
           "ours_over_torch_step_time": 1.0}
TINY = dict(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)


# Dense bf16 datasheet peaks (FLOP/s) for model-FLOPs utilisation; other devices report the measured matmul peak.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12, "TPU v5 lite": 197e12,
              "TPU v5p": 459e12}


def training_flops(cfg: bert.BertConfig, batch: int, seq: int) -> float:
  """Model FLOPs of one training step (forward + backward ≈ 3 × forward): 6·N·tokens for the dense layers plus
  the attention score and mix products, 12·L·T·d per token."""
  d, ff, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
  dense_params = layers * (4 * d * d + 2 * d * ff) + d * d
  tokens = batch * seq
  return 6.0 * dense_params * tokens + 12.0 * layers * seq * d * tokens


def matmul_peak(dtype, n: int = 2048, repeats: int = 5) -> float:
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  return 2.0 * n**3 / median_time(f, a, repeats=repeats)


def median_time(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))          # warm-up: compile
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def peak_bytes(jitted, *args) -> int:
  stats = jitted.lower(*args).compile().memory_analysis()
  peak = getattr(stats, "peak_memory_in_bytes", 0) if stats is not None else 0
  if peak:
    return int(peak)
  return int(stats.temp_size_in_bytes + stats.argument_size_in_bytes + stats.output_size_in_bytes)


class Setup:
  def __init__(self, model: str, batch: int, replay_batch: int, seq: int, dtype, seed: int = 0):
    if model == "tiny":
      cfg = bert.BertConfig(**TINY)
      from flax import nnx
      graphdef, params = bert.split_params(bert.BertClassifier(cfg, {"shared": 7}, dtype=dtype, rngs=nnx.Rngs(0)))
      self.model_dir = None
    else:
      graphdef, params, cfg, _ = hub.load_bert(model, {"shared": 7}, dtype=dtype)
      self.model_dir = hub.resolve_model_dir(model)
    self.cfg, self.params, self.apply = cfg, params, bert.make_apply(graphdef)
    rng = np.random.default_rng(seed)
    make = lambda n: {"input_ids": jnp.asarray(rng.integers(1000, 20000, (n, seq)), jnp.int32),
                      "attention_mask": jnp.ones((n, seq), jnp.int32)}
    self.new = {"inputs": make(batch), "labels": jnp.asarray(rng.integers(5, 7, batch), jnp.int32)}
    self.combined = {"inputs": make(batch + replay_batch),
                     "labels": jnp.asarray(rng.integers(0, 7, batch + replay_batch), jnp.int32)}
    replay_inputs = make(replay_batch)
    ref = self.logits(params, replay_inputs)
    self.replay = {"inputs": replay_inputs, "labels": jnp.asarray(rng.integers(0, 5, replay_batch), jnp.int32),
                   "ref_outputs": ref}

  def logits(self, params, inputs):
    return self.apply(params, inputs)["shared"]

  def task_loss(self, params, batch, rng=None):
    """Cross-entropy with dropout (as the PyTorch baseline in train mode) when the batch carries an rng."""
    logits = self.apply(params, batch["inputs"], deterministic=rng is None, rng=rng)["shared"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()

  def step(self, method: continual.Method):
    """(jitted step, its arguments) for one training step of ``method`` — the library's own step."""
    method = continual.dataclasses.replace(method, optimizer=optax.with_extra_args_support(method.optimizer))
    state, mask = continual.init_train_state(method, self.params)
    trainable = state.train_params if mask is None else tu.select(state.train_params, mask)
    frozen = None if mask is None else tu.select(state.train_params, jax.tree.map(lambda m: not m, mask))
    step = continual.make_train_step(method, mask, donate=False)   # repeats reuse the same buffers
    return step, trainable, frozen, state.opt_state

  def time_step(self, method, batch, repeats) -> tuple[float, int]:
    step, *args = self.step(method)
    batch = {**batch, "rng": jax.random.PRNGKey(0)}
    return median_time(step, *args, batch, repeats=repeats), peak_bytes(step, *args, batch)


def methods(s: Setup, beta: float = 8.0):
  adamw = optax.adamw(2e-5, weight_decay=0.01)
  lcfg = lora.LoraConfig()
  lora_kw = {"init": lambda p: lora.train_params(p, jax.random.PRNGKey(1), lcfg),
             "to_model": lambda tp: lora.to_model(tp, lcfg),
             "trainable": lambda tp: lora.train_mask(tp, r"^heads/")}
  return {"naive": continual.naive(s.task_loss, adamw),
          "fip": continual.fip(s.task_loss, s.logits, adamw, beta=beta),
          "lora": continual.naive(s.task_loss, adamw, **lora_kw),
          "lora-fip": continual.fip(s.task_loss, s.logits, adamw, beta=beta, **lora_kw)}


def geometry_times(s: Setup, repeats: int, batch=None) -> dict[str, float]:
  batch = s.new if batch is None else batch
  grad = jax.jit(jax.grad(lambda p: s.task_loss(p, batch)))
  gv = jax.jit(lambda p, v: geometry.pullback_metric(s.logits, p, batch["inputs"], "fisher_rao")(v))
  return {"grad": median_time(grad, s.params, repeats=repeats),
          "gv": median_time(gv, s.params, s.params, repeats=repeats)}


def torch_times(s: Setup, repeats: int, threads: int) -> dict[str, float]:
  """transformers' PyTorch BertForSequenceClassification: naive step, and the authors' FIP step (a frozen copy,
  three forward passes, Bhattacharyya on softmax outputs summed over the replay batch)."""
  import copy
  import torch
  import transformers
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  if s.model_dir is None:
    model = transformers.BertForSequenceClassification(transformers.BertConfig(**TINY, num_labels=7))
  else:
    model = transformers.BertForSequenceClassification.from_pretrained(str(s.model_dir), num_labels=7)
  model.train()
  frozen = copy.deepcopy(model).eval()
  opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.01)
  t = lambda a: torch.tensor(np.array(a), dtype=torch.long)
  new_ids, new_mask, new_y = t(s.new["inputs"]["input_ids"]), t(s.new["inputs"]["attention_mask"]), t(s.new["labels"])
  rep_ids, rep_mask = t(s.replay["inputs"]["input_ids"]), t(s.replay["inputs"]["attention_mask"])

  def naive():
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(input_ids=new_ids, attention_mask=new_mask).logits, new_y)
    loss.backward()
    opt.step()

  def fip():
    opt.zero_grad()
    ce = torch.nn.functional.cross_entropy(model(input_ids=new_ids, attention_mask=new_mask).logits, new_y)
    p = torch.softmax(model(input_ids=rep_ids, attention_mask=rep_mask).logits, -1)
    with torch.no_grad():
      q = torch.softmax(frozen(input_ids=rep_ids, attention_mask=rep_mask).logits, -1)
    bd = -torch.log(torch.sum(torch.sqrt(p * q + 1e-12), -1)).sum()
    (ce + bd).backward()
    opt.step()

  def timed(fn):
    fn()
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      fn()
      times.append(time.perf_counter() - t0)
    return statistics.median(times)

  return {"naive": timed(naive), "fip": timed(fip)}


def run(args) -> dict:
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
  s = Setup(args.model, args.batch, args.replay_batch, args.seq, dtype)
  config = {"model": args.model, "params": tu.tree_size(s.params), "batch": args.batch,
            "replay_batch": args.replay_batch, "seq": args.seq, "dtype": args.dtype,
            "device": f"{jax.devices()[0].device_kind} ×{jax.device_count()}", "threads": os.cpu_count(),
            "repeats": args.repeats}
  ms = methods(s)
  times, peaks = {}, {}
  times["naive"], peaks["naive"] = s.time_step(ms["naive"], {"new": s.new}, args.repeats)
  times["naive_combined"], _ = s.time_step(ms["naive"], {"new": s.combined}, args.repeats)
  fip_batch = {"new": s.new, "replay": s.replay}
  times["fip"], peaks["fip"] = s.time_step(ms["fip"], fip_batch, args.repeats)
  times["lora"], peaks["lora"] = s.time_step(ms["lora"], {"new": s.new}, args.repeats)
  times["lora-fip"], peaks["lora-fip"] = s.time_step(ms["lora-fip"], fip_batch, args.repeats)
  geo = geometry_times(s, args.repeats)
  result = {"config": config, "times_s": times, "peak_bytes": peaks, "geometry_times_s": geo,
            "gv_over_grad_time": geo["gv"] / geo["grad"],
            "fip_overhead_time": times["fip"] / times["naive_combined"],
            "fip_over_naive_step_time": times["fip"] / times["naive"],
            "fip_over_naive_peak_memory": peaks["fip"] / peaks["naive"],
            "lorafip_over_lora_peak_memory": peaks["lora-fip"] / peaks["lora"]}
  flops = training_flops(s.cfg, args.batch, args.seq)
  kind = jax.devices()[0].device_kind
  datasheet = next((v for k, v in PEAK_FLOPS.items() if k in kind), None)
  measured = matmul_peak(dtype)
  result["naive_step_tflops"] = flops / times["naive"] / 1e12
  result["mfu"] = None if datasheet is None else flops / times["naive"] / datasheet
  result["fraction_of_measured_matmul_peak"] = flops / times["naive"] / measured
  result["measured_matmul_tflops"] = measured / 1e12
  geodesic = {}
  for iters in args.cg_iters:
    m = continual.fip_geodesic(s.task_loss, s.logits, learning_rate=2e-5, cg_iters=iters)
    geodesic[str(iters)] = s.time_step(m, fip_batch, args.repeats)[0] / times["naive"]
  result["geodesic_over_naive_time_by_cg_iters"] = geodesic
  if args.sizes:
    scaling = {}
    for b in args.sizes:
      sb = Setup(args.model, b, b, args.seq, dtype)
      g = geometry_times(sb, args.repeats)
      scaling[f"batch {b}"] = {"gv_s": g["gv"], "grad_s": g["grad"],
                               "fip_step_s": sb.time_step(methods(sb)["fip"], {"new": sb.new, "replay": sb.replay},
                                                          args.repeats)[0]}
    result["scaling"] = scaling
  if not args.no_torch:
    tt = torch_times(s, args.repeats, os.cpu_count())
    result["torch_times_s"] = tt
    result["ours_fip_over_authors_fip_time"] = times["fip"] / tt["fip"]
    result["ours_over_torch_step_time"] = times["naive"] / tt["naive"]
  return result


def table(result: dict) -> str:
  rows = [f"config: {json.dumps(result['config'])}", "", f"{'ratio':36s} {'value':>8s} {'target':>8s}"]
  for key in ("gv_over_grad_time", "fip_overhead_time", "fip_over_naive_step_time", "fip_over_naive_peak_memory",
              "lorafip_over_lora_peak_memory", "ours_fip_over_authors_fip_time", "ours_over_torch_step_time"):
    if key in result:
      target = TARGETS.get(key)
      mark = "" if target is None else ("  ok" if result[key] <= target else "  MISSED")
      rows.append(f"{key:36s} {result[key]:8.3f} {'' if target is None else f'≤ {target}':>8s}{mark}")
  mfu = "n/a (no datasheet peak for this device)" if result["mfu"] is None else f"{result['mfu']:.3f}"
  rows.append(f"naive step: {result['naive_step_tflops']:.3f} TFLOP/s model FLOPs; MFU {mfu}; "
              f"{result['fraction_of_measured_matmul_peak']:.3f} of the measured matmul peak "
              f"({result['measured_matmul_tflops']:.3f} TFLOP/s)")
  rows.append("geodesic step / naive step by CG iterations: " + ", ".join(
      f"{k}: {v:.2f}" for k, v in result["geodesic_over_naive_time_by_cg_iters"].items()))
  for k, v in result.get("scaling", {}).items():
    rows.append(f"{k}: " + ", ".join(f"{n} {x * 1e3:.1f} ms" for n, x in v.items()))
  return "\n".join(rows)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="minilm", help="'tiny' (random 2-layer), 'minilm', a directory or hub id")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--replay-batch", type=int, default=16)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--cg-iters", type=int, nargs="*", default=[1, 2, 4])
  p.add_argument("--sizes", type=int, nargs="*", default=[], help="batch sizes for the scaling table")
  p.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparisons")
  p.add_argument("--json", type=pathlib.Path, default=None)
  args = p.parse_args(argv)
  try:
    result = run(args)
  except hub.CheckpointError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(table(result))
  if args.json is not None:
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
