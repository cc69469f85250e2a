"""The benchmark suite in CI size: each command's main end to end, every ratio produced and finite (targets are not
asserted here), the JSON written part by part."""

import ast
import dataclasses
import graphlib
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import pytest

from benchmarks import dpo, memory, profile
from benchmarks import run as bench

KEYS = ("gv_over_grad_time", "fip_overhead_time", "fip_over_naive_step_time", "fip_over_naive_peak_memory",
        "lorafip_over_lora_peak_memory", "ours_fip_over_authors_fip_time", "ours_over_torch_step_time",
        "gv_with_linearization_over_grad_time", "gv_over_grad_flops", "gv_with_linearization_over_grad_flops",
        "geodesic_over_penalty_step_time",
        *(f"{m}_over_naive_step_time" for m in bench.BASELINES))
TINY = ["--model", "random:1:64", "--batch", "4", "--replay-batch", "4", "--seq", "16"]


def test_benchmark_json_has_every_ratio(tmp_path, small_llama):
  out = tmp_path / "bench.json"
  assert bench.main([*TINY, "--repeats", "3", "--cg-iters", "1", "--model-sizes", "random:1:64",
                     "--dpo-model", "random:1:64", "--dpo-seq", "8", "--generate-model", str(small_llama),
                     "--scale-shapes", "tiny", "--json", str(out)]) == 0
  result = json.loads(out.read_text())
  for key in KEYS:
    assert math.isfinite(result[key]) and result[key] > 0, key
  assert set(result["geodesic_over_naive_time_by_cg_iters"]) == {"1"} and result["geodesic_over_penalty_cg_iters"] == 1
  assert set(result["config"]) >= {"model", "batch", "replay_batch", "seq", "dtype", "device", "threads"}
  assert 0 < result["authors_frozen_forward_share"] < 1
  assert set(result["model_scaling"]["random:1:64"]) == {"params", "gv_s", "gv_with_linearization_s", "grad_s",
                                                        "fip_step_s"}
  # benchmarks.dpo's figures, run with its own options (the DPO ratios themselves: test_benchmark_dpo)
  assert set(dpo.KEYS) <= set(result) and result["dpo"]["config"]["seq"] == 8
  # benchmarks.scale's, from a process of 8 host devices: the tiny decoder's weights and AdamW's state split 8 ways
  tiny = result["scale"]["shapes"]["tiny"]["eight_devices"]
  assert tiny["devices"] == 8 and tiny["state_bytes_per_device"] <= tiny["state_bytes"] / 8 * 1.05 + 4096
  assert 0 < result["fsdp8_step_bytes_per_device_over_one_device"] < 1
  # benchmarks.generate's: the same greedy tokens as transformers' generate from the same weights
  assert result["generate"]["greedy_token_agreement"] == 1.0 and result["generate_ours_over_transformers_time"] > 0
  assert result["parts"] == {"done": ["steps", "geometry", "throughput", "geodesic", "model_scaling", "dpo",
                                      "generate", "scale"], "pending": []}


def test_a_crash_in_a_late_part_keeps_the_earlier_figures(tmp_path, monkeypatch):
  """The JSON is written after each part: a failure in the last (DPO's, where the command once crashed after 11
  minutes) leaves every figure measured before it on disk, and names the part that failed."""
  def crash(opts):
    raise AttributeError("late failure")
  monkeypatch.setattr(dpo, "run", crash)
  out = tmp_path / "bench.json"
  with pytest.raises(AttributeError, match="late failure"):
    bench.main([*TINY, "--repeats", "1", "--no-torch", "--cg-iters", "--dpo-model", "random:1:64",
                "--scale-shapes", "none", "--json", str(out)])
  result = json.loads(out.read_text())
  assert result["parts"] == {"done": ["steps", "geometry", "throughput"], "pending": ["dpo"],
                             "failed": {"part": "dpo", "error": "AttributeError: late failure"}}
  for key in ("fip_overhead_time", "fip_over_naive_peak_memory", "gv_over_grad_time", "measured_matmul_tflops"):
    assert math.isfinite(result[key]) and result[key] > 0, key
  assert not set(dpo.KEYS) & set(result)
  assert list(tmp_path.iterdir()) == [out]             # written beside it, then renamed over it


def test_options_come_from_the_command_line_typed():
  opts, out = bench.parse_args(["--cg-iters", "--sizes", "8", "16", "--no-torch", "--dpo-model", "none"])
  assert (opts.cg_iters, opts.sizes, opts.model_sizes, opts.no_torch, out) == ((), (8, 16), (), True, None)
  assert bench.parts(opts) == ["steps", "geometry", "throughput", "scaling", "scale"]    # --no-torch: no generate
  default, _ = bench.parse_args([])
  assert default == bench.RunOptions() and bench.PRESET_CG_ITERS in default.cg_iters
  assert bench.parts(default) == ["steps", "geometry", "throughput", "geodesic", "dpo", "generate", "scale"]
  with pytest.raises(dataclasses.FrozenInstanceError):
    default.batch = 2


def test_bad_model_spec_exits_2(capsys):
  assert bench.main(["--model", "random:two:64", "--no-torch", "--dpo-model", "none"]) == 2
  assert "random:LAYERS:HIDDEN" in capsys.readouterr().err


def test_unknown_geodesic_form_exits_2_before_measuring(capsys, monkeypatch):
  monkeypatch.setattr(bench, "Setup", None)          # nothing is built
  assert bench.main(["--geodesic-form", "newton"]) == 2
  assert "geodesic.form" in capsys.readouterr().err


@pytest.mark.slow
def test_profile_attributes_time_to_passes_and_kinds_of_work(tmp_path):
  out = tmp_path / "profile.json"
  assert profile.main(["--model", "tiny", "--batch", "2", "--replay-batch", "2", "--seq", "8", "--repeats", "2",
                       "--json", str(out)]) == 0
  steps = json.loads(out.read_text())["steps"]
  assert set(steps["ours fip step"]["by_pass"]) >= {"new_task forward", "new_task backward", "replay forward",
                                                    "replay backward", "optimizer"}
  assert "replay forward" not in steps["ours naive step"]["by_pass"]
  assert set(steps["ours G·v"]["by_pass"]) >= {"metric_linearize forward", "metric_product forward",
                                               "metric_product backward"}
  assert set(steps["torch authors' FIP step"]["by_pass"]) == set(bench.PASSES)
  for name, step in steps.items():
    assert step["by_category"]["matmul"] > 0, name
    # Against the wall of the profiled window itself: a wall timed apart can be stretched by the other worker.
    assert sum(step["by_category"].values()) > 0.2 * step["profiled_wall_s"], name


def test_profile_main_without_torch(tmp_path):
  """The profiler's command at the smallest size (the attribution itself, with PyTorch's steps: the test above)."""
  out = tmp_path / "profile.json"
  assert profile.main([*TINY, "--repeats", "1", "--no-torch", "--json", str(out)]) == 0
  result = json.loads(out.read_text())
  assert set(result["steps"]) == {"ours naive step", "ours fip step", "ours gradient", "ours G·v"}
  assert result["config"]["repeats"] == 1 and result["steps"]["ours fip step"]["by_pass"]["replay forward"] > 0


def test_category_names_the_kind_of_work():
  assert profile.category("dot_general") == profile.category("aten::addmm") == "matmul"
  assert profile.category("add", "jit(step)/new_task/jvp(jit(_bernoulli))/jit(_uniform)/add") == "dropout RNG"
  assert profile.category("aten::native_dropout") == "dropout RNG"
  assert profile.category("erf") == profile.category("aten::gelu") == "transcendental"
  assert profile.category("t") == "layout" and profile.category("tanh") == "transcendental"
  assert profile.category("add") == profile.category("aten::add_") == "elementwise"


def test_memory_of_every_step_counts_its_training_state(tmp_path):
  out = tmp_path / "memory.json"
  assert memory.main(["--model", "tiny", "--batch", "2", "--replay-batch", "2", "--seq", "8",
                      "--dpo-model", "random:1:64", "--dpo-seq", "8", "--pairs", "2", "--old", "2",
                      "--json", str(out)]) == 0
  result = json.loads(out.read_text())
  for key in memory.RATIOS:
    assert math.isfinite(result[key]) and result[key] > 0, key
  s = bench.Setup("tiny", 2, 2, 8, jnp.float32)
  state = 3 * sum(a.nbytes for a in jax.tree.leaves(s.params))         # parameters and Adam's two moments
  assert result["peak_bytes"]["naive"] > state
  assert result["peak_bytes"]["lora"] < result["peak_bytes"]["naive"]


def test_benchmark_modules_import_each_other_without_a_circle():
  """Benchmarks call each other's functions: the modules they import form no circle (function-level imports too)."""
  folder = pathlib.Path(bench.__file__).parent
  modules = {path.stem for path in folder.glob("*.py")}
  graph = {}
  for name in modules:
    found = set()
    for node in ast.walk(ast.parse((folder / f"{name}.py").read_text())):
      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("benchmarks"):
        found |= {a.name for a in node.names} if node.module == "benchmarks" else {node.module.split(".")[1]}
      elif isinstance(node, ast.Import):
        found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("benchmarks.")}
    graph[name] = found & modules
  assert graph["dpo"] == {"common"} and "run" in graph["memory"]
  list(graphlib.TopologicalSorter(graph).static_order())      # CycleError on a circle


def test_generate_benchmark_end_to_end(tmp_path, small_llama, capsys):
  from benchmarks import generate
  out = tmp_path / "generate.json"
  assert generate.main(["--model", str(small_llama), "--batch", "2", "--new-tokens", "4", "--repeats", "1",
                        "--json", str(out)]) == 0
  result = json.loads(out.read_text())
  assert result["greedy_token_agreement"] == 1.0 and set(result["times_s"]) == {"ours", "transformers"}
  assert generate.main(["--model", str(small_llama), "--prompt-tokens", "100000"]) == 2
  assert "lower --prompt-tokens" in capsys.readouterr().err


def test_scale_benchmark_needs_eight_devices_and_known_shapes(capsys):
  from benchmarks import scale
  assert scale.main(["--shape", "tiny"]) == 2          # this process has one device: the reason, no traceback
  assert "needs 8 devices" in capsys.readouterr().err
  assert scale.main(["--shape", "tiny", "--param-dtype", "float16"]) == 2
  assert "--param-dtype float16: float32 or bfloat16" in capsys.readouterr().err
  assert set(scale.SHAPES) == {"llama-3.2-1b", "llama-3.1-8b", "smollm2-135m", "tiny"}
