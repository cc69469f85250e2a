"""The continual-DPO benchmark in CI size: every ratio is produced and finite, the stored references' size is
exact (targets are not asserted here)."""

import json
import math

from benchmarks import dpo as bench


def test_dpo_benchmark_reports_memory_time_and_stored_bytes(tmp_path):
  out = tmp_path / "dpo.json"
  assert bench.main(["--model", "random:1:64", "--pairs", "2", "--old", "2", "--seq", "8", "--top-k", "4",
                     "--repeats", "1", "--json", str(out)]) == 0
  result = json.loads(out.read_text())
  for key in ("fipdpo_over_dpo_peak_memory", "lorafipdpo_over_loradpo_peak_memory", "fipdpo_over_dpo_step_time",
              "lorafipdpo_over_loradpo_step_time"):
    assert math.isfinite(result[key]) and result[key] > 0, key
  assert result["stored_reference_bytes_per_token"] == 4 * (2 + 4) + 4   # uint16 ids, float32 log-probs, tail
  assert result["stored_reference_fraction"] == 28 / (4 * 49152)
  assert set(result["times_s"]) == {"dpo", "fip-dpo", "lora-dpo", "lora-fip-dpo"}
  assert set(bench.KEYS) <= set(result)       # what benchmarks.run copies into its JSON


def test_bad_model_spec_exits_2(capsys):
  assert bench.main(["--model", "random:one:64"]) == 2
  assert "random:LAYERS:HIDDEN" in capsys.readouterr().err
