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
