"""``python -m benchmarks.e2e`` end to end at tiny size, and its JSON written side by side (the breakdown's arithmetic
and the PyTorch loop in process: test_e2e)."""

import json
import math

import pytest

from benchmarks import e2e

TINY = ["--stage1-steps", "2", "--steps", "2", "--n-train", "16", "--n-test", "8", "--n-val", "8", "--max-len", "16",
        "--buffer-size", "8", "--batch", "4", "--replay-batch", "4", "--eval-batch", "8", "--checkpoint-every", "1"]


def _check_side(side: dict) -> None:
  assert 0 < side["naive_run_s"] < side["wall_s"] and 0 < side["fip_run_s"] < side["wall_s"]
  assert set(side["stages"]) == set(e2e.STAGES) and set(side["accuracy_matrix"]) == {"naive", "fip"}
  for rows in side["accuracy_matrix"].values():
    assert len(rows) == 2 and all(0 <= a <= 1 for row in rows for a in row)


@pytest.mark.slow
def test_main_times_both_sides(small_bert, tmp_path, capsys):
  out = tmp_path / "e2e.json"
  assert e2e.main([*TINY, "--model", str(small_bert), "--json", str(out)]) == 0
  result = json.loads(out.read_text())
  assert result["parts"] == {"done": ["ours", "torch"], "pending": []}
  assert result["config"]["steps"] == 2 and result["config"]["model"] == str(small_bert)
  for side in ("ours", "torch"):
    _check_side(result[side])
  assert result["ours"]["compile_s"] > 0 and result["torch"]["compile_s"] == 0
  for key in e2e.TARGETS:
    assert math.isfinite(result[key]) and result[key] > 0, key
  assert "ours_over_torch_run_time" in capsys.readouterr().out


def test_main_runs_the_torch_side_in_a_fresh_process(small_bert, tmp_path):
  """The options reach the child process whole (on its stdin) and its timings come back."""
  out = tmp_path / "e2e.json"
  assert e2e.main([*TINY, "--model", str(small_bert), "--side", "torch", "--json", str(out)]) == 0
  result = json.loads(out.read_text())
  assert result["parts"] == {"done": ["torch"], "pending": []} and "ours" not in result
  _check_side(result["torch"])
  assert result["torch"]["timings"]["fip/train/checkpoint"] > 0          # --checkpoint-every 1 reached the child


def test_a_failed_side_keeps_the_other(tmp_path, monkeypatch):
  ours = {"naive_run_s": 1.0, "fip_run_s": 2.0}

  def fail(opts):
    raise RuntimeError("the PyTorch run failed")
  monkeypatch.setattr(e2e, "run_ours", lambda opts: ours)
  monkeypatch.setattr(e2e, "run_torch", fail)
  out = tmp_path / "e2e.json"
  with pytest.raises(RuntimeError):
    e2e.main([*TINY, "--json", str(out)])
  result = json.loads(out.read_text())
  assert result["ours"] == ours and "torch" not in result and "ours_over_torch_run_time" not in result
  assert result["parts"] == {"done": ["ours"], "pending": ["torch"],
                             "failed": {"part": "torch", "error": "RuntimeError: the PyTorch run failed"}}
