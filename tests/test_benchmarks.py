"""The benchmark suite in CI size: every ratio is produced and finite (targets are not asserted here)."""

import json
import math

from benchmarks import run as bench

KEYS = ("gv_over_grad_time", "fip_overhead_time", "fip_over_naive_step_time", "fip_over_naive_peak_memory",
        "lorafip_over_lora_peak_memory", "ours_fip_over_authors_fip_time", "ours_over_torch_step_time")


def test_benchmark_json_has_every_ratio(tmp_path):
  out = tmp_path / "bench.json"
  assert bench.main(["--model", "tiny", "--batch", "4", "--replay-batch", "4", "--seq", "16", "--repeats", "2",
                     "--cg-iters", "1", "2", "--sizes", "2", "--json", str(out)]) == 0
  result = json.loads(out.read_text())
  for key in KEYS:
    assert math.isfinite(result[key]) and result[key] > 0, key
  assert set(result["geodesic_over_naive_time_by_cg_iters"]) == {"1", "2"}
  assert set(result["config"]) >= {"model", "batch", "replay_batch", "seq", "dtype", "device", "threads"}
  assert "batch 2" in result["scaling"]
