"""End to end: continual DPO on real review prompts with a one-layer random Llama (SmolLM2's tokenizer) and
one-layer MiniLM reward classifiers: every report, a kill and resume, bad input."""

import json

import numpy as np
import pytest

from experiments import continual_dpo
from fipjax import rewards

TINY = ["--preset", "cpu", "--data.train-prompts", "8", "--data.val-prompts", "4", "--data.test-prompts", "4",
        "--data.held-out-texts", "4", "--data.text-tokens", "16", "--optim.batch-size", "2", "--first.steps", "2",
        "--stages.steps", "4", "--stages.replay-batch-size", "2", "--stages.buffer-size", "4",
        "--dpo.response-tokens", "6", "--dpo.prompt-tokens", "4", "--dpo.generate-batch-size", "8",
        "--run.eval-batch-size", "4", "--run.checkpoint-every", "2", "--run.record-every", "2", "--run.probe-size",
        "2", "--rewards.train-rows", "32", "--rewards.test-rows", "16", "--rewards.steps", "2", "--rewards.max-len",
        "16", "--dpo.top-k", "8", "--optim.lr", "1e-3", "--lora.optim.lr", "1e-2", "--no-progress"]
# The three methods whose paths differ: plain DPO, DPO on replayed old pairs, LoRA with FIP's penalty on stored
# token distributions (fip-dpo is the same penalty on the full model; every registry method is tested elsewhere).
METHODS = ("dpo", "replay-dpo", "lora-fip-dpo")
MODELS = []


@pytest.fixture(scope="module", autouse=True)
def _models(small_llama, small_bert, data_dir):
  MODELS[:] = ["--model.name", str(small_llama), "--rewards.model", str(small_bert), "--data.dir", str(data_dir)]


def _run(tmp, *extra, out="run", cache="cache"):
  return continual_dpo.main(TINY + MODELS + ["--out", str(tmp / out), "--cache-dir", str(tmp / cache), *extra])


@pytest.fixture(scope="module")
def finished(tmp_path_factory, _models):
  tmp = tmp_path_factory.mktemp("dpo")
  assert _run(tmp, "--method", ",".join(METHODS)) == 0
  return tmp


def test_every_method_reports(finished):
  results = json.loads((finished / "run" / "results.json").read_text())
  assert list(results["methods"]) == list(METHODS)
  assert set(results["rewards"]) == {"imdb-positive", "yelp-negative"}
  for reward in results["rewards"].values():
    assert 0 <= reward["classifier"]["test_accuracy"] <= 1 and reward["classifier"]["test_rows"] == 16
  for name, m in results["methods"].items():
    r = np.array(m["reward_matrix"])
    assert m["rounds"] == ["imdb-positive", "yelp-negative"] and r.shape == (3, 2), name
    assert ((0 <= r) & (r <= 1)).all(), name
    acc = m["preference_accuracy_matrix"]
    assert acc[0] == [None, None] and acc[1][1] is None and all(0 <= a <= 1 for a in acc[2]), name
    assert m["kl_to_base"][0] == pytest.approx(0.0, abs=1e-6) and m["kl_to_base"][2] > 0, name
    assert all(p > 1 for p in m["perplexity"]) and len(m["reward_forgetting"]) == 1
    assert set(m["validation_reward"]) == set(m["rounds"])
    assert m["peak_step_memory_bytes"] > 0 and m["weight_change"] > 0
    assert m["drift"]["step"] == [2, 4] and np.isfinite(m["loss_curve"]).all() and len(m["loss_curve"]) == 4
    (distance,) = m["old_round_distance"]          # after round 2: its old round's, on the buffer and unseen prompts
    assert distance["buffer"] > 0 and distance["held_out"] > 0, name
  # Every method starts round 2 from the one round-1 policy; only FIP stores token distributions.
  assert len({json.dumps(m["reward_matrix"][:2]) for m in results["methods"].values()}) == 1
  stored = {n: m["stored_reference_bytes"] for n, m in results["methods"].items()}
  assert stored["dpo"] == stored["replay-dpo"] == 0 < stored["lora-fip-dpo"]
  # LoRA adapts 2 of the attention kernels: its step needs far less memory than full DPO's.
  assert results["methods"]["lora-fip-dpo"]["peak_step_memory_bytes"] < results["methods"]["dpo"][
      "peak_step_memory_bytes"]
  text = (finished / "run" / "report.md").read_text()
  assert "Table 1" in text and "test accuracy" in text and "Table 3: old rounds' distance" in text
  for f in ("rewards.png", "drift.png"):
    assert (finished / "run" / f).stat().st_size > 0
  assert not (finished / "run" / "checkpoints").exists()


def test_killed_run_resumes_to_the_same_results(tmp_path, finished):
  args = ("--method", "lora-fip-dpo")
  # Killed at round 2's third step, after its checkpoint at step 2 (round 1 is 2 steps).
  assert _run(tmp_path, *args, "--stop-after", "5", out="killed", cache="cache_killed") == 130
  assert not (tmp_path / "killed" / "results.json").exists()
  assert _run(tmp_path, *args, out="killed", cache="cache_killed") == 0
  resumed = json.loads((tmp_path / "killed" / "results.json").read_text())["methods"]["lora-fip-dpo"]
  whole = json.loads((finished / "run" / "results.json").read_text())["methods"]["lora-fip-dpo"]
  for key in ("loss_curve", "reward_matrix", "kl_to_base", "preference_accuracy_matrix"):
    np.testing.assert_allclose(np.array(resumed[key], float), np.array(whole[key], float), rtol=1e-5, err_msg=key)


@pytest.mark.parametrize("args, message", [
    (("--data.train-prompts", "100000"), "--data.train-prompts + --data.val-prompts"),
    (("--optim.batch-size", "16"), "than one batch of 16 (--optim.batch-size)"),
    (("--stages.buffer-size", "1"), "fewer pairs than one replay batch"),
    (("--method", "dpo,fip-dpo", "--fip.distance", "squared_euclidean"), "no compressed form"),
    (("--method", "fip-geodesic-dpo", "--geodesic.form", "adam"), "add --geodesic.corrector false"),
    (("--data.test-prompts", "100000"), "--data.test-prompts + --data.held-out-texts"),
])
def test_bad_input_is_one_paragraph(tmp_path, capsys, args, message):
  assert _run(tmp_path, *args, cache="cache_bad") == 2
  err = capsys.readouterr().err
  assert message in err and "Traceback" not in err
  assert not (tmp_path / "run").exists() and not (tmp_path / "cache_bad").exists()


def test_unknown_method_or_round_is_refused(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    _run(tmp_path, "--method", "fip")
  assert e.value.code == 2 and "preference methods are named <method>-dpo" in capsys.readouterr().err
  with pytest.raises(SystemExit) as e:
    _run(tmp_path, "--method", "sgd-dpo")
  assert e.value.code == 2 and "unknown method 'sgd-dpo'" in capsys.readouterr().err
  with pytest.raises(SystemExit) as e:
    _run(tmp_path, "--data.rounds", "imdb-positive,imdb-positive")
  assert e.value.code == 2 and "--data.rounds must be two or more distinct names" in capsys.readouterr().err


def test_summary_over_seeds(finished, tmp_path):
  from experiments import summarize
  r0 = json.loads((finished / "run" / "results.json").read_text())
  r1 = json.loads(json.dumps({**r0, "seed": 1}))
  for m in r1["methods"].values():
    m["reward_forgetting"] = [f + 0.1 for f in m["reward_forgetting"]]
  text = summarize.summarize([r0, r1])
  assert "Seeds [0, 1]" in text and "forgetting imdb-positive" in text
  f0 = r0["methods"]["dpo"]["reward_forgetting"][0]
  assert f"{f0 + 0.05:.3f} ± {np.std([f0, f0 + 0.1], ddof=1):.3f}" in text
  assert all(f"| {name} |" in text for name in METHODS)


def test_the_paper_preset_runs_offline_at_small_size(tmp_path):
  """The GPU preset (hub model and data by default) through the same code path on local files: its own choices
  (bfloat16, β, no dropout, its learning rates) at the tiny run's sizes, FIP-DPO end to end."""
  cfg, _ = continual_dpo.parse_args(["--preset", "paper"])
  assert cfg.model.name.startswith("HuggingFaceTB/") and cfg.data.dir in (None, "")
  argv = ["paper" if a == "cpu" else a for a in TINY]
  assert continual_dpo.main([*argv, *MODELS, "--method", "fip-dpo", "--out", str(tmp_path / "run"),
                             "--cache-dir", str(tmp_path / "cache")]) == 0
  m = json.loads((tmp_path / "run" / "results.json").read_text())["methods"]["fip-dpo"]
  assert np.array(m["reward_matrix"]).shape == (3, 2) and np.isfinite(m["loss_curve"]).all()


def test_prompts_are_disjoint_within_and_across_rounds_and_from_the_classifiers_rows():
  """Every split of all three rounds (two on Yelp) and the held-out reviews on the cpu preset's sizes: no review
  twice, no training or validation prompt among the reward classifiers' fine-tuning rows, and the first two rounds'
  prompts those of the two-round stream."""
  names = ",".join(continual_dpo.ROUND_NAMES)
  cfg, _ = continual_dpo.parse_args(["--preset", "cpu", "--data.rounds", names])
  prompts, held_out = continual_dpo.split_prompts(cfg)
  texts = [t for r in prompts for split in ("train", "val", "test") for t in r[split]] + held_out
  assert len(texts) == len(set(texts)) == 3 * (128 + 64 + 64) + 3 * 24
  for (_, task, _, _), rnd in zip(continual_dpo.ROUNDS, prompts):
    seen = set(rewards.classifier_rows(task, cfg.rewards, cfg.data.dir).texts)
    assert seen.isdisjoint(rnd["train"] + rnd["val"] + rnd["test"])
  two, held_two = continual_dpo.split_prompts(continual_dpo.parse_args(["--preset", "cpu"])[0])
  assert two == prompts[:2] and held_two == held_out[:2 * 24]


def test_a_third_round_is_learnt_by_the_method_and_reported(tmp_path):
  rounds = ",".join(continual_dpo.ROUND_NAMES)
  assert _run(tmp_path, "--method", "fip-dpo", "--data.rounds", rounds, "--stages.steps", "2") == 0
  m = json.loads((tmp_path / "run" / "results.json").read_text())["methods"]["fip-dpo"]
  r = np.array(m["reward_matrix"])
  assert m["rounds"] == list(continual_dpo.ROUND_NAMES) and r.shape == (4, 3) and ((0 <= r) & (r <= 1)).all()
  assert len(m["reward_forgetting"]) == 2 and np.isfinite(m["loss_curve"]).all() and len(m["loss_curve"]) == 4
