"""experiments.summarize: mean ± std over seeds, and methods of one seed merged from several files."""

import json

import pytest

from experiments import summarize


def result(seed, methods, yelp_stage1=0.5, **data):
  def method(yelp):
    return {"tasks": ["yelp", "imdb"], "accuracy_matrix": [[yelp_stage1, 0.4], [yelp, 0.7]],
            "task_agnostic_matrix": [[yelp_stage1, 0.0], [yelp, 0.7]], "weight_change": 0.01,
            "forgetting": yelp_stage1 - yelp, "average_accuracy": (yelp + 0.7) / 2,
            "validation": {"yelp": yelp, "imdb": 0.7}}
  return {"seed": seed, "config": {"model": {"model": "minilm"}, "data": {"max_len": 64, **data},
                                   "method": {"beta": seed}, "seed": seed},
          "methods": {name: method(yelp) for name, yelp in methods.items()}}


def test_files_of_one_seed_merge_and_later_methods_replace_earlier():
  merged = summarize.merge_by_seed([result(0, {"naive": 0.3, "fip-geodesic": 0.1}),
                                    result(1, {"naive": 0.4, "fip-geodesic": 0.2}),
                                    result(0, {"fip-geodesic": 0.45, "lora-fip-geodesic": 0.48})])
  assert [r["seed"] for r in merged] == [0, 1]
  assert merged[0]["methods"]["fip-geodesic"]["accuracy_matrix"][1][0] == 0.45
  assert set(merged[0]["methods"]) == {"naive", "fip-geodesic", "lora-fip-geodesic"}
  text = summarize.summarize([result(0, {"naive": 0.3}), result(1, {"naive": 0.4}),
                              result(0, {"lora-fip-geodesic": 0.48})])
  assert "| naive | 0.500 ± 0.000 | 0.350 ± 0.071 | -0.150 ± 0.071 | 0.400 ± 0.000 | 0.700 ± 0.000 |" in text
  assert "| lora-fip-geodesic | 0.500 (1 seed) | 0.480 (1 seed) |" in text   # run by one seed of two
  assert "- naive: 0.350 ± 0.071 / 0.700 ± 0.000" in text         # task-agnostic, then validation
  paired = summarize.summarize([result(0, {"naive": 0.3, "fip": 0.45}), result(1, {"naive": 0.4, "fip": 0.45})],
                               baseline="naive")     # Δ yelp differences 0.15, 0.05: t(0.975, 1) · 0.0707 / √2
  assert "| fip | +0.100 [-0.535, +0.735] (2) | +0.000 [+0.000, +0.000] (2) |" in paired


@pytest.mark.parametrize("other", [result(0, {"fip": 0.4}, yelp_stage1=0.6), result(0, {"fip": 0.4}, max_len=128)])
def test_files_from_different_stage1_networks_are_refused(tmp_path, capsys, other):
  paths = []
  for i, r in enumerate([result(0, {"naive": 0.3}), other]):
    paths.append(tmp_path / f"{i}.json")
    paths[-1].write_text(json.dumps(r))
  assert summarize.main([str(p) for p in paths]) == 2
  assert "do not share one stage-1 network" in capsys.readouterr().err


def test_main_prints_the_table_of_files_of_one_experiment(tmp_path, capsys):
  paths = []
  for seed, acc in ((0, 0.3), (1, 0.4)):
    paths.append(tmp_path / f"{seed}.json")
    paths[-1].write_text(json.dumps(result(seed, {"naive": acc})))
  assert summarize.main([str(p) for p in paths]) == 0
  out = capsys.readouterr().out
  assert "| naive | 0.500 ± 0.000 | 0.350 ± 0.071 |" in out and "Every scalar column" in out


def align_result(seed, method, forgot, learnt, lr=5e-5):
  """A fipjax.align result (no rewards): m1's preference accuracy 0.8 after m1, 0.8 − forgot after m2."""
  m = {"rounds": ["m1", "m2"], "reward_matrix": [[None, None]] * 3,
       "preference_accuracy_matrix": [[None, None], [0.8, None], [0.8 - forgot, learnt]], "forgetting": [forgot],
       "reward_forgetting": [None], "kl_to_base": [None] * 3, "perplexity": [None] * 3,
       "validation_reward": {"m1": None, "m2": None}}
  return {"kind": "alignment", "seed": seed, "methods": {method: m},
          "config": {"config": {"learning_rate": lr}, "model": "smollm2", "rounds": ["m1=a", "m2=b"],
                     "resume_from": None, "test_fraction": 0.1, "dtype": "float32", "pairs": "file", "reward": []}}


def test_align_runs_of_a_seed_join_and_paired_differences_have_t_intervals():
  files = []
  for seed, (dpo, fip) in enumerate(((0.3, 0.2), (0.4, 0.2), (0.5, 0.2))):
    files += [align_result(seed, "dpo", dpo, 0.9), align_result(seed, "lora-fip-dpo", fip, 0.7, lr=5e-4)]
  text = summarize.summarize(files, baseline="dpo")
  assert "preference accuracy on test pairs" in text
  assert "| dpo | 0.800 ± 0.000 | 0.400 ± 0.100 | 0.400 ± 0.100 | 0.900 ± 0.000 |" in text
  # forgetting differences -0.1, -0.2, -0.3: mean -0.2, half-width t(0.975, 2) · 0.1 / √3 = 0.248
  assert "| lora-fip-dpo | -0.200 [-0.448, +0.048] (3) | -0.200 [-0.200, -0.200] (3) |" in text
  with pytest.raises(ValueError, match="--baseline naive is not among"):
    summarize.summarize(files, baseline="naive")
  other = align_result(0, "fip-dpo", 0.1, 0.8)
  other["config"]["rounds"] = ["m1=a", "m2=c"]
  with pytest.raises(ValueError, match="do not share"):
    summarize.merge_by_seed(files + [other])
