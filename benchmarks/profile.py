"""Where a step's time goes: our jitted steps from an XLA profiler trace, the PyTorch ones from ``torch.profiler``.

    python -m benchmarks.profile --json runs/profile-minilm.json       # MiniLM, batch 16 + replay 16, 128 tokens
    python -m benchmarks.profile --model tiny --seq 32 --batch 4 --replay-batch 4 --repeats 3   # CI size

Each operation's time is attributed to a pass and to a kind of work (matmul, transcendental, reduction, layout,
dropout RNG, …). Our passes are the named scopes of ``continual.make_train_step`` and ``geometry.pullback_metric``
(``new_task``, ``replay``, ``metric_linearize``, ``metric_product``, each forward or backward, and the optimiser
``update``); PyTorch's are ``record_function`` labels. Sums of operation times can exceed the wall time where the
runtime overlaps independent operations.
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import os
import json
import pathlib
import re
import sys
import tempfile
import time

import jax

from benchmarks import common
from benchmarks import run as bench
from fipjax import geometry

# Kinds of work, by primitive (JAX) or aten operation name; the first full match wins. A fused XLA operation counts
# as the kind of its root instruction.
CATEGORIES = (
    ("matmul", r"dot_general|mm|addmm|bmm|baddbmm"),
    ("transcendental", r"exp|expm1|log|log1p|erf|erfc|tanh|tanh_backward|logistic|sqrt|rsqrt|pow|integer_pow|gelu|"
                       r"gelu_backward|_softmax|_softmax_backward_data|_log_softmax|_log_softmax_backward_data"),
    ("normalisation", r"native_layer_norm|native_layer_norm_backward"),
    ("reduction", r"reduce_\w+|argmax|argmin|cumsum|sum|mean|amax|var_mean|nll_loss\w*"),
    ("gather/scatter", r"gather|scatter\S*|embedding|embedding_dense_backward|index_select|dynamic_slice|"
                       r"dynamic_update_slice|take"),
    ("layout", r"transpose|reshape|copy_?|broadcast_in_dim|concatenate|pad|slice|squeeze|expand_dims|contiguous|"
               r"clone|permute|view|_unsafe_view|t|expand|_to_copy|as_strided|convert_element_type|unsqueeze|"
               r"split|stack|cat|zero_|zeros|fill_|empty\w*"),
    ("optimizer (fused)", r"_fused_adamw_?|_foreach_\w+"),
)
RNG = r"bernoulli|_uniform|threefry|random_bits|dropout"


def category(op: str, context: str = "") -> str:
  """Kind of work of an operation: ``op`` a JAX primitive or aten name (``aten::`` dropped), ``context`` the JAX
  op_name path it sits in (dropout's random bits are recognised from it)."""
  op = op.removeprefix("aten::")
  if re.search(RNG, context or op):
    return "dropout RNG"
  return next((label for label, pattern in CATEGORIES if re.fullmatch(pattern, op)), "elementwise")


SCOPES = ("new_task", "replay", "metric_linearize", "metric_product")
PASS_ORDER = ("forward", "backward", "new_task forward", "new_task backward", "replay forward", "replay backward",
              "frozen forward", "metric_linearize forward", "metric_product forward", "metric_product backward",
              "optimizer")


def jax_pass(op_name: str) -> str:
  """'new_task forward', 'replay backward', 'metric_product forward', 'optimizer', … from a JAX op_name path."""
  parts = op_name.split("/")
  if "update" in parts:
    return "optimizer"
  scope = next((p + " " for p in parts if p in SCOPES), "")
  return scope + ("backward" if "transpose(" in op_name else "forward")


def xla_profile(call, compiled, repeats: int) -> dict:
  """Seconds per call by pass and by category, from a profiler trace of ``repeats`` runs of ``call`` (a
  :func:`benchmarks.common.compiled_call` of the ``compiled`` program).

  Trace events are matched to HLO instructions by name (the CPU runtime's events; GPU events carry ``hlo_op``).
  """
  op_names = dict(re.findall(r'^\s*%?([\w.\-]+) = [^\n]*?op_name="([^"]*)"', compiled.as_text(), re.M))
  call()
  with tempfile.TemporaryDirectory() as logdir:
    jax.profiler.start_trace(logdir, create_perfetto_trace=True)
    t0 = time.perf_counter()
    for _ in range(repeats):
      call()
    window = (time.perf_counter() - t0) / repeats
    jax.profiler.stop_trace()
    trace_file = next(pathlib.Path(logdir).rglob("perfetto_trace.json.gz"))
    events = json.load(gzip.open(trace_file))["traceEvents"]
  by_pass, by_category = collections.Counter(), collections.Counter()
  for e in events:
    name = (e.get("args") or {}).get("hlo_op", e.get("name"))
    if e.get("ph") != "X" or name not in op_names:
      continue
    seconds = e["dur"] * 1e-6 / repeats
    by_pass[jax_pass(op_names[name])] += seconds
    by_category[category(op_names[name].rsplit("/", 1)[-1], op_names[name])] += seconds
  if not by_category:
    raise RuntimeError(f"no operation events of the compiled step in the {jax.default_backend()} trace")
  return {"by_pass": dict(by_pass), "by_category": dict(by_category), "profiled_wall_s": window}


def torch_profile(step, repeats: int) -> dict:
  """The same for a PyTorch step (a closure), from ``torch.profiler``: passes from ``record_function`` labels
  (inclusive times), categories from each aten operation's self time (autograd's own bookkeeping is left out)."""
  import torch
  step()
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    t0 = time.perf_counter()
    for _ in range(repeats):
      step()
    window = (time.perf_counter() - t0) / repeats
  by_pass, by_category = collections.Counter(), collections.Counter()
  for e in prof.events():
    if e.name in bench.PASSES:
      by_pass[e.name] += e.cpu_time_total * 1e-6 / repeats
  for avg in prof.key_averages():
    if avg.key.startswith("aten::"):
      by_category[category(avg.key)] += avg.self_cpu_time_total * 1e-6 / repeats
  return {"by_pass": dict(by_pass), "by_category": dict(by_category), "profiled_wall_s": window}


@dataclasses.dataclass(frozen=True)
class ProfileOptions(bench.BertSteps):
  """``python -m benchmarks.profile``: benchmarks.run's BERT steps, profiled."""
  repeats: int = common.flag(3, "profiled runs of each program")
  no_torch: bool = common.flag(False, "skip the PyTorch steps")


def run(opts: ProfileOptions) -> dict:
  s = opts.setup()
  methods = bench.methods(s)
  steps = {f"ours {name} step": s.step_call(methods[name], batch)
           for name, batch in (("naive", {"new": s.new}), ("fip", s.fip_batch))}
  steps["ours gradient"] = common.compiled_call(jax.jit(jax.grad(lambda p: s.task_loss(p, s.new))), s.params)
  gv = jax.jit(lambda p, v: geometry.pullback_metric(s.logits, p, s.new["inputs"], "fisher_rao")(v))
  steps["ours G·v"] = common.compiled_call(gv, s.params, s.params)
  result = {"config": {"model": opts.model, "batch": opts.batch, "replay_batch": opts.replay_batch,
                       "seq": opts.seq, "dtype": opts.dtype, "device": jax.devices()[0].device_kind,
                       "repeats": opts.repeats}, "steps": {}}
  walls = {name: call for name, (call, _) in steps.items()}
  torch_steps = {} if opts.no_torch else bench.torch_steps(s, os.cpu_count())
  labels = {"naive": "torch naive step", "fip": "torch authors' FIP step"}
  walls.update({labels[k]: torch_steps[k] for k in labels if k in torch_steps})
  walls = common.interleaved_times(walls, opts.repeats)
  for name, (call, compiled) in steps.items():
    result["steps"][name] = {"wall_s": walls[name], **xla_profile(call, compiled, opts.repeats)}
  for key, label in labels.items():
    if key in torch_steps:
      result["steps"][label] = {"wall_s": walls[label], **torch_profile(torch_steps[key], opts.repeats)}
  return result


def table(result: dict) -> str:
  """Markdown: one column per step, rows in milliseconds by pass then by category."""
  names = list(result["steps"])
  rows = [f"config: {json.dumps(result['config'])}", "",
          "| ms per call | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
  cell = lambda v: "" if v is None else f"{v * 1e3:.0f}"
  rows.append("| **wall** | " + " | ".join(cell(result["steps"][n]["wall_s"]) for n in names) + " |")
  order = {"by_pass": PASS_ORDER, "by_category": [c for c, _ in CATEGORIES] + ["dropout RNG", "elementwise"]}
  for part in ("by_pass", "by_category"):
    present = {k for n in names for k in result["steps"][n][part]}
    rows.append(f"| *{part.replace('_', ' ')}* |" + " |" * len(names))
    for k in [k for k in order[part] if k in present] + sorted(present - set(order[part])):
      rows.append(f"| {k} | " + " | ".join(cell(result["steps"][n][part].get(k)) for n in names) + " |")
  return "\n".join(rows)


def parse_args(argv=None) -> tuple[ProfileOptions, pathlib.Path | None]:
  return common.parse_args(ProfileOptions, __doc__, "python -m benchmarks.profile", argv)


def main(argv=None) -> int:
  opts, out = parse_args(argv)
  # Executables loaded from a persistent compilation cache carry no op metadata to attribute time by: compile anew.
  cached = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  try:
    return common.cli(lambda: run(opts), table, out)
  finally:
    jax.config.update("jax_enable_compilation_cache", cached)


if __name__ == "__main__":
  sys.exit(main())
