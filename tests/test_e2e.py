"""The end-to-end run benchmark: its PyTorch side in CI size, the breakdown's arithmetic, and the command it gives
fipjax's side (the experiment itself is tested in test_yelp_imdb)."""

import pytest

from benchmarks import e2e
from experiments import yelp_imdb

TINY = ["--stage1-steps", "3", "--steps", "3", "--n-train", "32", "--n-test", "8", "--n-val", "8", "--max-len",
        "16", "--buffer-size", "16", "--batch", "4", "--replay-batch", "4", "--eval-batch", "4",
        "--checkpoint-every", "2"]


def test_ours_command_is_the_experiment_with_these_flags(tmp_path):
  args = e2e.parser().parse_args(TINY)
  cfg, parsed = yelp_imdb.parse_args(e2e.ours_argv(args, tmp_path))
  assert (cfg.first.steps, cfg.stages.steps, cfg.optim.batch_size, cfg.stages.replay_batch_size,
          cfg.data.max_len) == (3, 3, 4, 4, 16)
  assert (cfg.method.fip.beta, cfg.stages.buffer_size, cfg.run.checkpoint_every, cfg.model.name) == \
      (16.0, 16, 2, "minilm")
  assert parsed.out == tmp_path / "out" and parsed.cache_dir == tmp_path / "cache"


def test_breakdown_splits_each_stage_into_parts_that_add_up():
  t = {"stage1": 10.0, "stage1/compile": 3.0, "stage1/train": 9.0, "stage1/train/compile": 3.0,
       "stage1/train/checkpoint": 1.0, "stage1/train/checkpoint/compile": 0.0, "eval_test": 2.0,
       "eval_test/compile": 0.5, "naive": 8.0, "naive/compile": 2.5, "naive/train": 5.0, "naive/train/compile": 2.0,
       "naive/train/records": 1.0, "naive/train/records/compile": 0.5, "naive/buffers": 0.5,
       "naive/eval_test": 1.5, "naive/eval_test/compile": 0.0, "naive/eval_val": 0.5, "fip": 12.0}
  s = e2e.summary(40.0, t)
  naive = s["stages"]["naive"]
  assert naive == pytest.approx({"compile": 2.5, "steps": 2.5, "checkpoint": 0.0, "records": 0.5, "buffers": 0.5,
                                 "eval": 2.0, "other": 0.0})
  assert sum(s["stages"]["stage1"].values()) == pytest.approx(12.0)      # stage 1 with its evaluation
  assert s["stages"]["stage1"]["compile"] == pytest.approx(3.5) and s["stages"]["stage1"]["steps"] == 5.0
  assert s["load_and_other_s"] == pytest.approx(8.0)
  assert (s["naive_run_s"], s["fip_run_s"]) == (28.0, 32.0)


def test_torch_side_runs_the_same_work(small_bert):
  args = e2e.parser().parse_args([*TINY, "--model", str(small_bert)])
  torch = {**e2e.summary(60.0, (out := e2e.run_torch_child(args))["timings"]), **out}   # as run_torch reports it
  t = torch["timings"]
  assert t["stage1/train/checkpoint"] > 0 and t["fip/train/checkpoint"] > 0 and t["naive/eval_val"] > 0
  for stage in e2e.STAGES:
    parts = torch["stages"][stage]
    assert parts["steps"] > 0 and parts["eval"] > 0 and parts["compile"] == 0
  assert 0 < torch["naive_run_s"] < 60 and 0 < torch["fip_run_s"] < 60
  for rows in torch["accuracy_matrix"].values():
    assert len(rows) == 2 and all(0 <= a <= 1 for row in rows for a in row)
  assert "naive_run_s" in e2e.table({"config": {}, "torch": torch})
