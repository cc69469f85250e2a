"""Speed and memory of FIP, as ratios measured in one process on one machine.

    python -m benchmarks.run --json runs/bench.json                 # MiniLM, batch 16 + replay 16, 128 tokens
    python -m benchmarks.run --model tiny --seq 32 --batch 4 --replay-batch 4 --repeats 2 --no-torch   # CI size

Every time is the median of ``--repeats`` runs after a warm-up (compilation excluded); the steps compared with
each other run in interleaved rounds, so drifts of the machine's speed touch them alike. Peak memory is XLA's memory
analysis of the compiled step (:func:`fipjax.continual.peak_bytes`: temporaries counted on every backend); these steps
do not donate their inputs, so it counts the state twice (``benchmarks.memory``: as the training loop runs them).
Parts of their own modules join the JSON: continual DPO's costs (``benchmarks.dpo``), generation against
transformers' (``benchmarks.generate``) and the FSDP scale figures (``benchmarks.scale``, in an 8-device process).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import common, dpo, generate, scale
from benchmarks.common import compiled_call, interleaved_times
from fipjax import config as cf
from fipjax import continual, geometry
from fipjax import tree as tu
from fipjax.models import bert, hub
from experiments import yelp_imdb

TARGETS = {"gv_over_grad_time": 1.3, "fip_overhead_time": 1.05, "fip_over_naive_peak_memory": 1.05,
           "lorafip_over_lora_peak_memory": 1.05, "ours_fip_over_authors_fip_time": 0.67,
           "ours_over_torch_step_time": 1.0, "fipdpo_over_dpo_peak_memory": 1.05,
           "lorafipdpo_over_loradpo_peak_memory": 1.05, "stored_reference_fraction": 0.02,
           "geodesic_over_penalty_step_time": 1.5, "fsdp8_step_bytes_per_device_over_one_device": 0.2,
           "generate_ours_over_transformers_time": 1.0}
PRESET_METHODS = yelp_imdb.PRESETS["cpu"].method
"""The cpu preset's methods (experiments.yelp_imdb): its geodesic step (form, κ, CG budget) is timed against the
penalty form."""
PRESET_CG_ITERS = PRESET_METHODS.geodesic.cg_iters
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
  call, _ = compiled_call(jax.jit(lambda x: x @ x), jnp.ones((n, n), dtype))
  return 2.0 * n**3 / interleaved_times({"matmul": call}, repeats)["matmul"]


def random_config(spec: str) -> dict:
  """``'random:L:H'`` → a randomly initialised BERT with L layers of width H (H/64 heads, 4H feed-forward), for
  timing how cost grows with model size where no checkpoint of that size is at hand."""
  layers, hidden = common.random_spec(spec)
  return dict(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
              intermediate_size=4 * hidden)


class Setup:
  def __init__(self, model: str, batch: int, replay_batch: int, seq: int, dtype, seed: int = 0):
    if model == "tiny" or model.startswith("random:"):
      cfg = bert.BertConfig(**(TINY if model == "tiny" else random_config(model)))
      from flax import nnx
      graphdef, params = bert.split_params(bert.BertClassifier(cfg, {"shared": 7}, dtype=dtype, rngs=nnx.Rngs(0)))
      self.model_dir = None
    else:
      graphdef, params, cfg, _ = hub.load_bert(model, {"shared": 7}, dtype=dtype)
      self.model_dir = hub.resolve_model_dir(model)
    self.cfg, self.params, self.apply = cfg, params, bert.make_apply(graphdef)
    self.features, self.readout, self.below = bert.make_split(graphdef)
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
    self.fip_batch = {"new": self.new, "replay": {"old": self.replay}}
    h = self.features(params, replay_inputs)        # brain-inspired replay's generated features stand in
    self.bir_batch = {"new": self.new, "replay": {"old": {"features": h, "ref_outputs": ref}}}

  def logits(self, params, inputs):
    return self.apply(params, inputs)["shared"]

  def task_loss(self, params, batch, rng=None):
    """Cross-entropy with dropout (as the PyTorch baseline in train mode) when the batch carries an rng."""
    logits = self.apply(params, batch["inputs"], deterministic=rng is None, rng=rng)["shared"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()

  def step(self, method: continual.Method):
    return continual.train_step(method, self.params, donate=False)   # repeats reuse the buffers

  def step_call(self, method, batch) -> tuple:
    """:func:`compiled_call` of one training step of ``method`` on ``batch`` (with a dropout key)."""
    step, *args = self.step(method)
    return compiled_call(step, *args, {**batch, "rng": jax.random.PRNGKey(0)})


@dataclasses.dataclass(frozen=True)
class BertSteps:
  """The BERT steps measured (also ``benchmarks.profile``'s and ``benchmarks.memory``'s)."""
  model: str = common.flag("minilm", "'tiny' (random 2-layer), 'random:L:H', 'minilm', a directory or hub id")
  batch: int = common.flag(16, "new-task rows per step")
  replay_batch: int = common.flag(16, "replayed rows per step")
  seq: int = common.flag(128, "tokens per row")
  dtype: str = common.flag("float32", "compute dtype", choices=sorted(common.DTYPES))

  def setup(self, **change) -> Setup:
    """:class:`Setup` of these steps (with the fields ``change`` names replaced)."""
    o = dataclasses.replace(self, **change)
    return Setup(o.model, o.batch, o.replay_batch, o.seq, common.DTYPES[o.dtype])


def method_config(beta: float = 8.0, cg_iters: int = PRESET_CG_ITERS,
                  form: str = PRESET_METHODS.geodesic.form) -> continual.MethodConfig:
  """The methods' hyperparameters: the library's defaults with FIP's ``beta``, LoRA at the full model's learning
  rate, and the cpu preset's geodesic step with ``cg_iters`` and ``form`` (OptionError where a value is invalid)."""
  hp = cf.with_values(continual.MethodConfig(), {  # dotted paths: the experiments' flags
      "fip.beta": beta, "lora.optim.lr": 2e-5, "geodesic.cg_iters": cg_iters, "geodesic.form": form,
      "geodesic.kappa": PRESET_METHODS.geodesic.kappa})
  if problems := cf.problems(hp):
    raise common.OptionError("; ".join(problems))
  return hp


def methods(s: Setup, hp: continual.MethodConfig | None = None) -> dict[str, continual.Method]:
  """The benchmarked methods, built by the library's registry as the experiments build them, configured by ``hp``
  (default: :func:`method_config`'s); one old task, ``"old"``: its batch is ``s.fip_batch["replay"]["old"]``."""
  ones = jax.tree.map(jnp.ones_like, s.params)
  old = continual.OldTask(s.logits, s.logits, s.task_loss, lambda n: s.replay["inputs"],
                          lambda p, h: s.readout(p, h)["shared"], {"si_omega": ones, "si_change": ones})
  ctx = continual.StageContext(s.task_loss, {"old": old}, s.params, None, r"^heads/", seed=0, below=s.below)
  optim = continual.OptimConfig(lr=2e-5, weight_decay=0.01)
  hp = method_config() if hp is None else hp
  return {name: continual.build(name, ctx, hp, optim)
          for name in ("naive", "fip", "fip-geodesic", "lora", "lora-fip") + BASELINES}


def timed_steps(s: Setup) -> list[tuple[str, continual.Method, dict]]:
  """(name, method, batch) of every step timed: each method on its batch, and naive on all 32 sequences."""
  ms, fip_batch = methods(s), s.fip_batch
  return [("naive", ms["naive"], {"new": s.new}), ("naive_combined", ms["naive"], {"new": s.combined}),
          ("fip", ms["fip"], fip_batch), ("lora", ms["lora"], {"new": s.new}),
          ("lora-fip", ms["lora-fip"], fip_batch), ("si", ms["si"], {"new": s.new}), ("gem", ms["gem"], fip_batch),
          ("agem", ms["agem"], fip_batch), ("bir", ms["bir"], s.bir_batch)]


BASELINES = ("si", "gem", "agem", "bir")
"""The other continual-learning methods, timed per step against naive (``<name>_over_naive_step_time``)."""


def compiled_flops(compiled) -> float:
  """FLOPs of a compiled program by XLA's cost analysis."""
  cost = compiled.cost_analysis()
  return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


def geometry_times(s: Setup, repeats: int, batch=None, products: int = 5) -> dict[str, float]:
  """Seconds (and compiled FLOPs) of one gradient, one ``G·v`` including the linearisation (a metric formed and
  used once), and one further product with the metric formed — what each CG iteration pays —
  ``(t(products) − t(1)) / (products − 1)``."""
  batch = s.new if batch is None else batch
  grad = jax.jit(jax.grad(lambda p: s.task_loss(p, batch)))

  def gv_repeated(k):
    def f(p, v):
      metric = geometry.pullback_metric(s.logits, p, batch["inputs"], "fisher_rao")
      return jax.lax.scan(lambda u, _: (metric(u), None), v, None, length=k, unroll=True)[0]
    return jax.jit(f)

  programs = {"grad": compiled_call(grad, s.params), "gv_1": compiled_call(gv_repeated(1), s.params, s.params),
              "gv_k": compiled_call(gv_repeated(products), s.params, s.params)}
  t = interleaved_times({k: call for k, (call, _) in programs.items()}, repeats)
  flops = {k: compiled_flops(compiled) for k, (_, compiled) in programs.items()}
  return {"grad": t["grad"], "gv_with_linearization": t["gv_1"], "gv": (t["gv_k"] - t["gv_1"]) / (products - 1),
          "grad_flops": flops["grad"], "gv_with_linearization_flops": flops["gv_1"],
          "gv_flops": (flops["gv_k"] - flops["gv_1"]) / (products - 1)}


PASSES = ("new_task forward", "replay forward", "frozen forward", "backward", "optimizer")   # torch labels


def torch_steps(s: Setup, threads: int) -> dict:
  """transformers' PyTorch BertForSequenceClassification, as closures that run one step each: ``naive``, the
  authors' ``fip`` (a frozen copy, three forward passes, Bhattacharyya on softmax outputs summed over the replay
  batch), and ``frozen_forward`` (the frozen copy's pass alone). Passes are labelled for ``torch.profiler``."""
  import copy
  import torch
  import transformers
  from torch.profiler import record_function
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  if s.model_dir is None:
    model = transformers.BertForSequenceClassification(
        transformers.BertConfig(**dataclasses.asdict(s.cfg), num_labels=7))
  else:
    model = transformers.BertForSequenceClassification.from_pretrained(str(s.model_dir), num_labels=7)
  model.train()
  frozen = copy.deepcopy(model).eval()
  opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.01)
  t = lambda a: torch.tensor(np.array(a), dtype=torch.long)
  new_ids, new_mask, new_y = t(s.new["inputs"]["input_ids"]), t(s.new["inputs"]["attention_mask"]), t(s.new["labels"])
  rep_ids, rep_mask = t(s.replay["inputs"]["input_ids"]), t(s.replay["inputs"]["attention_mask"])

  def new_task_loss():
    with record_function("new_task forward"):
      logits = model(input_ids=new_ids, attention_mask=new_mask).logits
      return torch.nn.functional.cross_entropy(logits, new_y)

  def frozen_probs():
    with record_function("frozen forward"), torch.no_grad():
      return torch.softmax(frozen(input_ids=rep_ids, attention_mask=rep_mask).logits, -1)

  def descend(loss):
    with record_function("backward"):
      loss.backward()
    with record_function("optimizer"):
      opt.step()

  def naive():
    opt.zero_grad()
    descend(new_task_loss())

  def fip():
    opt.zero_grad()
    ce = new_task_loss()
    with record_function("replay forward"):
      p = torch.softmax(model(input_ids=rep_ids, attention_mask=rep_mask).logits, -1)
    q = frozen_probs()
    bd = -torch.log(torch.sum(torch.sqrt(p * q + 1e-12), -1)).sum()
    descend(ce + bd)

  return {"naive": naive, "fip": fip, "frozen_forward": frozen_probs}


def cost_row(s: Setup, repeats: int) -> dict[str, float]:
  """Seconds of G·v (metric formed, and with its linearisation), of a gradient and of a FIP step, for one setup."""
  g = geometry_times(s, repeats)
  fip_step = s.step_call(methods(s)["fip"], s.fip_batch)[0]
  return {"params": tu.tree_size(s.params), "gv_s": g["gv"], "gv_with_linearization_s": g["gv_with_linearization"],
          "grad_s": g["grad"], "fip_step_s": interleaved_times({"fip": fip_step}, repeats)["fip"]}


@dataclasses.dataclass(frozen=True)
class RunOptions(BertSteps):
  """``python -m benchmarks.run``: what is timed besides the steps, and how often."""
  repeats: int = common.flag(5, "timed runs of each program (the median is kept)")
  no_torch: bool = common.flag(False, "skip the PyTorch comparisons")
  cg_iters: tuple[int, ...] = common.flag(tuple(sorted({PRESET_CG_ITERS, 3, 5})),
                                          "CG budgets of the geodesic step to time (none: skip that part)")
  geodesic_form: str = common.flag(PRESET_METHODS.geodesic.form, "the geodesic step timed (the library's "
                                   "GeodesicConfig.form; default: the cpu preset's)")
  sizes: tuple[int, ...] = common.flag((), "batch sizes for the scaling table")
  model_sizes: tuple[str, ...] = common.flag((), "random BERTs of L layers, width H, for the model-size scaling "
                                             "table", metavar="random:L:H")
  dpo_model: str = common.flag("smollm2", "decoder for the continual-DPO ratios (benchmarks.dpo): 'smollm2', "
                               "'random:L:H', a .gguf, a directory or hub id; 'none' skips them")
  dpo_seq: int = common.flag(64, "tokens per sequence of the DPO ratios")
  generate_model: str = common.flag("smollm2", "decoder whose greedy generation is timed against transformers' "
                                    "(benchmarks.generate: batch 16, 48 new tokens); 'none' skips")
  scale_shapes: str = common.flag("llama-3.2-1b,llama-3.1-8b", "decoder shapes whose FIP-DPO step is compiled on 1 "
                                  f"and 8 host devices (benchmarks.scale: {', '.join(scale.SHAPES)}); 'none' skips")


def parts(opts: RunOptions) -> list[str]:
  """The parts :func:`run` measures, in order (each written to the JSON when done)."""
  optional = {"geodesic": opts.cg_iters, "scaling": opts.sizes, "model_scaling": opts.model_sizes,
              "dpo": opts.dpo_model != "none", "generate": opts.generate_model != "none" and not opts.no_torch,
              "scale": opts.scale_shapes != "none"}
  return ["steps", "geometry", "throughput", *(name for name, wanted in optional.items() if wanted)]


def run(opts: RunOptions, out: pathlib.Path | None = None) -> dict:
  """Every part of :func:`parts`; with ``out``, the figures so far are written there after each part."""
  method_config(form=opts.geodesic_form)          # an invalid form fails now, not after the first parts
  s = opts.setup()
  config = {"model": opts.model, "params": tu.tree_size(s.params), "batch": opts.batch,
            "replay_batch": opts.replay_batch, "seq": opts.seq, "dtype": opts.dtype,
            "device": f"{jax.devices()[0].device_kind} ×{jax.device_count()}", "threads": os.cpu_count(),
            "repeats": opts.repeats}
  progress = common.Progress(out, parts(opts), config=config)
  with progress.part("steps") as r:
    calls, peaks = {}, {}
    for name, method, batch in timed_steps(s):
      calls[name], compiled = s.step_call(method, batch)
      if name != "naive_combined":
        peaks[name] = continual.peak_bytes(compiled)
    if not opts.no_torch:
      calls.update({f"torch_{k}": fn for k, fn in torch_steps(s, os.cpu_count()).items()})
    times = interleaved_times(calls, opts.repeats)
    r.update({"times_s": {k: v for k, v in times.items() if not k.startswith("torch_")}, "peak_bytes": peaks,
              "fip_overhead_time": times["fip"] / times["naive_combined"],
              "fip_over_naive_step_time": times["fip"] / times["naive"],
              "fip_over_naive_peak_memory": peaks["fip"] / peaks["naive"],
              "lorafip_over_lora_peak_memory": peaks["lora-fip"] / peaks["lora"],
              **{f"{m}_over_naive_step_time": times[m] / times["naive"] for m in BASELINES}})
    if not opts.no_torch:
      tt = {k.removeprefix("torch_"): v for k, v in times.items() if k.startswith("torch_")}
      r["torch_times_s"] = tt
      r["ours_fip_over_authors_fip_time"] = times["fip"] / tt["fip"]
      r["ours_over_torch_step_time"] = times["naive"] / tt["naive"]
      # Dropping the frozen copy removes at most this share of the authors' step: at equal kernel speed, our FIP
      # step can reach no less than 1 − share of theirs.
      r["authors_frozen_forward_share"] = tt["frozen_forward"] / tt["fip"]
  with progress.part("geometry") as r:
    geo = geometry_times(s, opts.repeats)
    r.update({"geometry_times_s": geo, "gv_over_grad_time": geo["gv"] / geo["grad"],
              "gv_with_linearization_over_grad_time": geo["gv_with_linearization"] / geo["grad"],
              "gv_over_grad_flops": geo["gv_flops"] / geo["grad_flops"],
              "gv_with_linearization_over_grad_flops": geo["gv_with_linearization_flops"] / geo["grad_flops"]})
  with progress.part("throughput") as r:
    rate = training_flops(s.cfg, opts.batch, opts.seq) / times["naive"]       # model FLOP/s of the naive step
    kind = jax.devices()[0].device_kind
    datasheet = next((v for k, v in PEAK_FLOPS.items() if k in kind), None)
    measured = matmul_peak(common.DTYPES[opts.dtype])
    r.update({"naive_step_tflops": rate / 1e12, "mfu": None if datasheet is None else rate / datasheet,
              "fraction_of_measured_matmul_peak": rate / measured, "measured_matmul_tflops": measured / 1e12})
  if opts.cg_iters:
    with progress.part("geodesic") as r:
      r.update(geodesic_ratios(s, opts, calls))
  if opts.sizes:
    with progress.part("scaling") as r:
      r["scaling"] = {f"batch {b}": cost_row(opts.setup(batch=b, replay_batch=b), opts.repeats) for b in opts.sizes}
  if opts.model_sizes:
    with progress.part("model_scaling") as r:
      r["model_scaling"] = {spec: cost_row(opts.setup(model=spec), opts.repeats) for spec in opts.model_sizes}
  if opts.dpo_model != "none":
    with progress.part("dpo") as r:       # continual DPO's costs on a decoder (benchmarks.dpo), in the same JSON
      d = dpo.run(dpo.DpoOptions(model=opts.dpo_model, seq=opts.dpo_seq, repeats=opts.repeats))
      r.update({"dpo": d, **{k: d[k] for k in dpo.KEYS}})
  if opts.generate_model != "none" and not opts.no_torch:
    with progress.part("generate") as r:
      d = generate.run(generate.GenerateOptions(model=opts.generate_model, repeats=opts.repeats))
      r.update({"generate": d, **{k: d[k] for k in generate.KEYS}})
  if opts.scale_shapes != "none":
    with progress.part("scale") as r:
      d = scale_figures(opts.scale_shapes)
      r.update({"scale": d, **{k: d[k] for k in scale.KEYS}})
  return progress.result


def scale_figures(shapes: str) -> dict:
  """``benchmarks.scale``'s result, run in a process of its own: it needs 8 host devices, fixed when JAX starts."""
  with tempfile.TemporaryDirectory() as tmp:
    out = pathlib.Path(tmp) / "scale.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.scale", "--shape", shapes, "--json", str(out)],
                          capture_output=True, text=True, cwd=pathlib.Path(__file__).parents[1])
    if done.returncode:
      raise RuntimeError(f"benchmarks.scale failed (exit {done.returncode}): {done.stderr[-2000:]}")
    return json.loads(out.read_text())


def geodesic_ratios(s: Setup, opts: RunOptions, calls: dict) -> dict:
  """The geodesic step's time over naive's by CG budget, and over the penalty form's at the headline budget: the
  cpu preset's when timed, else the largest timed (``calls``: the compiled steps of the part "steps")."""
  geodesic_calls = {"naive": calls["naive"], "fip": calls["fip"]}
  for iters in opts.cg_iters:
    method = methods(s, method_config(cg_iters=iters, form=opts.geodesic_form))["fip-geodesic"]
    geodesic_calls[str(iters)] = s.step_call(method, s.fip_batch)[0]
  t = interleaved_times(geodesic_calls, opts.repeats)
  iters = PRESET_CG_ITERS if PRESET_CG_ITERS in opts.cg_iters else max(opts.cg_iters)
  return {"geodesic_over_naive_time_by_cg_iters": {str(i): t[str(i)] / t["naive"] for i in opts.cg_iters},
          "geodesic_over_penalty_cg_iters": iters, "geodesic_form": opts.geodesic_form,
          "geodesic_over_penalty_step_time": t[str(iters)] / t["fip"]}


def table(result: dict) -> str:
  rows = [f"config: {json.dumps(result['config'])}", "", f"{'ratio':40s} {'value':>8s} {'target':>8s}"]
  for key in ("gv_over_grad_time", "gv_with_linearization_over_grad_time", "gv_over_grad_flops",
              "gv_with_linearization_over_grad_flops", "fip_overhead_time", "fip_over_naive_step_time",
              "fip_over_naive_peak_memory", "lorafip_over_lora_peak_memory", "geodesic_over_penalty_step_time",
              "ours_fip_over_authors_fip_time", "ours_over_torch_step_time", "authors_frozen_forward_share",
              *(f"{m}_over_naive_step_time" for m in BASELINES), *dpo.KEYS, *generate.KEYS,
              *scale.KEYS):
    if key in result:
      target = TARGETS.get(key)
      mark = "" if target is None else ("  ok" if result[key] <= target else "  MISSED")
      rows.append(f"{key:40s} {result[key]:8.3f} {'' if target is None else f'≤ {target}':>8s}{mark}")
  mfu = "n/a (no datasheet peak for this device)" if result["mfu"] is None else f"{result['mfu']:.3f}"
  rows.append(f"naive step: {result['naive_step_tflops']:.3f} TFLOP/s model FLOPs; MFU {mfu}; "
              f"{result['fraction_of_measured_matmul_peak']:.3f} of the measured matmul peak "
              f"({result['measured_matmul_tflops']:.3f} TFLOP/s)")
  if "geodesic_over_naive_time_by_cg_iters" in result:
    rows.append("geodesic step / naive step by CG iterations: " + ", ".join(
        f"{k}: {v:.2f}" for k, v in result["geodesic_over_naive_time_by_cg_iters"].items()))
  for k, v in {**result.get("scaling", {}), **result.get("model_scaling", {})}.items():
    rows.append(f"{k}: {v['params'] / 1e6:.1f}M params, " + ", ".join(
        f"{n} {x * 1e3:.1f} ms" for n, x in v.items() if n != "params"))
  return "\n".join(rows)


def parse_args(argv=None) -> tuple[RunOptions, pathlib.Path | None]:
  return common.parse_args(RunOptions, __doc__, "python -m benchmarks.run", argv)


def main(argv=None) -> int:
  opts, out = parse_args(argv)
  return common.cli(lambda: run(opts, out), table, out)


if __name__ == "__main__":
  sys.exit(main())
