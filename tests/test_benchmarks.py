"""The benchmark suite in CI size: every ratio is produced and finite (targets are not asserted here)."""

import json
import math

import jax
import jax.numpy as jnp
import pytest

from benchmarks import memory, profile
from benchmarks import run as bench

KEYS = ("gv_over_grad_time", "fip_overhead_time", "fip_over_naive_step_time", "fip_over_naive_peak_memory",
        "lorafip_over_lora_peak_memory", "ours_fip_over_authors_fip_time", "ours_over_torch_step_time",
        "gv_with_linearization_over_grad_time", "gv_over_grad_flops", "gv_with_linearization_over_grad_flops",
        "geodesic_over_penalty_step_time",
        *(f"{m}_over_naive_step_time" for m in bench.BASELINES))


def test_benchmark_json_has_every_ratio(tmp_path):
  out = tmp_path / "bench.json"
  assert bench.main(["--model", "random:1:64", "--batch", "4", "--replay-batch", "4", "--seq", "16", "--repeats", "3",
                     "--cg-iters", "1", "--model-sizes", "random:1:64", "--dpo-model", "none", "--json", str(out)]) == 0
  result = json.loads(out.read_text())
  for key in KEYS:
    assert math.isfinite(result[key]) and result[key] > 0, key
  assert set(result["geodesic_over_naive_time_by_cg_iters"]) == {"1"} and result["geodesic_over_penalty_cg_iters"] == 1
  assert set(result["config"]) >= {"model", "batch", "replay_batch", "seq", "dtype", "device", "threads"}
  assert 0 < result["authors_frozen_forward_share"] < 1
  assert not set(bench.DPO_KEYS) & set(result)          # --dpo-model none; the DPO ratios: test_benchmark_dpo
  assert set(result["model_scaling"]["random:1:64"]) == {"params", "gv_s", "gv_with_linearization_s", "grad_s",
                                                        "fip_step_s"}


def test_bad_model_spec_exits_2(capsys):
  assert bench.main(["--model", "random:two:64", "--no-torch", "--dpo-model", "none"]) == 2
  assert "random:LAYERS:HIDDEN" in capsys.readouterr().err


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
