"""experiments.frontier: a tiny split-digits front end to end (resumed without rerunning); the geometry is
fipjax.fronts' (test_fronts.py)."""

import json

import pytest

from experiments import frontier


def test_a_tiny_front_runs_resumes_and_reports(tmp_path, capsys):
  argv = ["split_digits", "--sweep", "naive", "--sweep", "interp:interp.alpha=0.5", "--sweep", "fip[fip.beta=10]",
          "--seeds", "0,1", "--out", str(tmp_path), "--", "--first.steps", "40", "--stages.steps", "40"]
  assert frontier.main(argv) == 0
  got = json.loads((tmp_path / "frontier.json").read_text())
  assert [(p["method"], p["value"]) for p in got["points"]] == [("naive", "default"), ("interp", "interp.alpha=0.5"),
                                                                ("fip[fip.beta=10]", "default")]
  for p in got["points"]:
    assert len(p["retention_by_seed"]) == 2 and 0 <= p["retention"] <= 1 and p["retention_ci"] >= 0
  assert set(got["methods"]) == {"fip[fip.beta=10]"} and (tmp_path / "frontier.png").stat().st_size > 0
  run = tmp_path / "runs" / "fip[fip.beta=10]" / "default" / "seed1" / "results.json"
  config = json.loads(run.read_text())["config"]
  assert config["stages"]["steps"] == 40 and config["method"]["fip"]["beta"] == 10
  stamp = run.stat().st_mtime_ns
  assert frontier.main(argv) == 0 and run.stat().st_mtime_ns == stamp       # finished runs are reused
  out = capsys.readouterr().out
  assert "area added above the baselines' front" in out and "No point is chosen" in out and "chosen" not in got


@pytest.mark.parametrize("argv,words", [
    (["--sweep", "fip:fip.beta"], "write METHOD:KNOB=V1,V2"),
    (["--sweep", "fip"], "no --sweep runs a baseline"),
    (["--sweep", "naive", "--sweep", "nonsense"], "nonsense"),
    (["--sweep", "naive:stages.nonsense=1"], "--stages.nonsense"),
    (["--sweep", "naive", "--seeds", "a,b"], "not a comma-separated list"),
    (["--sweep", "naive", "--sweep", "fip[fip.beta]:fip.beta=1"], "METHOD[KNOB=V,KNOB=V]"),
    (["--sweep", "naive", "--sweep", "fip[fip.beta=1"], "METHOD[KNOB=V,KNOB=V]"),
    (["--sweep", "naive", "--sweep", "fip[fip.nonsense=1]"], "--fip.nonsense"),
])
def test_bad_sweeps_are_one_paragraph(argv, words, tmp_path, capsys):
  try:
    code = frontier.main(["split_digits", *argv, "--out", str(tmp_path / "f")])
  except SystemExit as e:          # the command line's own errors (argparse)
    code = e.code
  assert code == 2
  err = capsys.readouterr().err
  assert words in err and "Traceback" not in err
  assert not (tmp_path / "f").exists()


def test_a_variant_is_its_own_curve_with_its_fixed_flags_before_the_knob():
  s = frontier.Sweep.parse("fip-dpo[dpo.anchor=policy, stages.buffer_size=128]:fip.beta=16,64")
  assert (s.method, s.name, s.values) == ("fip-dpo", "fip-dpo[dpo.anchor=policy,stages.buffer_size=128]", ("16", "64"))
  assert s.flags("16") == ["--dpo.anchor", "policy", "--stages.buffer-size", "128", "--fip.beta", "16"]
  plain = frontier.Sweep.parse("fip-dpo:fip.beta=16")
  assert plain.name == "fip-dpo" and plain.flags("16") == ["--fip.beta", "16"]
  assert frontier.Sweep.parse("dpo[stages.steps=8]").flags("") == ["--stages.steps", "8"]


def test_quick_sweeps_take_each_methods_registry_knob_around_its_configured_value():
  from experiments import continual_dpo, yelp_imdb
  cfg, _ = yelp_imdb.parse_args(["--preset", "cpu"])
  got = {m: frontier.quick_sweep(m, cfg, False) for m in ("naive", "interp", "fip", "replay", "lora", "lora-fip", "bir")}
  assert got == {"naive": "naive:stages.steps=37,75,150", "interp": "interp:interp.alpha=0.25,0.5,0.75",
                 "fip": "fip:fip.beta=2,8,32", "replay": "replay:stages.buffer_size=125,500",
                 "lora": "lora:lora.rank=4,8,16", "lora-fip": "lora-fip:fip.beta=2,8,32", "bir": "bir"}
  cfg, _ = continual_dpo.parse_args(["--preset", "cpu"])
  assert frontier.quick_sweep("fip-dpo", cfg, True) == "fip-dpo:fip.beta=4,16,64"
  assert frontier.quick_sweep("dpo", cfg, True) == "dpo:stages.steps=8,16,32"


def test_frontier_flag_on_an_experiment_runs_a_quick_front_at_its_seed(tmp_path):
  from experiments import split_digits
  out = tmp_path / "front"
  argv = ["--method", "fip", "--frontier", "--seed", "1", "--out", str(out), "--first.steps", "20", "--stages.steps",
          "8", "--fip.beta", "10"]
  assert split_digits.main(argv) == 0
  got = json.loads((out / "frontier.json").read_text())
  assert [(p["method"], p["value"]) for p in got["points"]] == [
      ("naive", "stages.steps=2"), ("naive", "stages.steps=4"), ("naive", "stages.steps=8"),
      ("interp", "interp.alpha=0.25"), ("interp", "interp.alpha=0.5"), ("interp", "interp.alpha=0.75"),
      ("fip", "fip.beta=2.5"), ("fip", "fip.beta=10"), ("fip", "fip.beta=40")]
  assert all(p["seeds"] == [1] for p in got["points"]) and "--frontier" not in got["flags"]
  run = json.loads((out / "runs" / "fip" / "fip.beta=40" / "seed1" / "results.json").read_text())
  assert run["config"]["stages"]["steps"] == 8 and run["config"]["first"]["steps"] == 20


def test_alignment_points_carry_the_old_rounds_distance_on_the_buffer_and_on_unseen_prompts():
  result = {"methods": {"fip-dpo": {"old_round_distance": [{"buffer": 0.01, "held_out": 0.03}]},
                        "dpo": {"old_round_distance": []}}}
  assert frontier.distances(result, "fip-dpo") == (0.01, 0.03) and frontier.distances(result, "dpo") is None
  point = {"method": "fip-dpo", "value": "fip.beta=16", "retention": .5, "retention_ci": .1, "learning": .4,
           "learning_ci": .1, "distance_buffer": 0.01, "distance_held_out": 0.03}
  text = frontier.table([point], {"baseline_front": [], "methods": {}}, [0], "cmd")
  assert "| fip-dpo | fip.beta=16 | 0.0100 | 0.0300 | 3.00 |" in text
  assert "on unseen prompts" not in frontier.table([{k: v for k, v in point.items() if "distance" not in k}],
                                                   {"baseline_front": [], "methods": {}}, [0], "cmd")
