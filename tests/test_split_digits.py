"""Split digits end to end: FIP retains task A where naive fine-tuning forgets it.

Margins measured first (seeds 0–3, `python -m experiments.split_digits --method all --seed S --out DIR`; README):
naive loses 8–30 points of task A; FIP (penalty, β=100, 400-example buffer) keeps task A within 1.5 points and task
B within 0.4 points of naive, its geodesic form within 0 and 1.9. Seed 0 is the test's: naive loses 30 points.
"""

import json
import subprocess
import sys

import pytest

from experiments import split_digits


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  out = tmp_path_factory.mktemp("digits") / "run"
  assert split_digits.main(["--method", "all", "--seed", "0", "--out", str(out)]) == 0
  return json.loads((out / "results.json").read_text())["methods"]


@pytest.mark.parametrize("method", ["fip", "fip-geodesic"])
def test_fip_retains_task_a(results, method):
  (a_after_a, _), (a_after_b, b_after_b) = results[method]["accuracy_matrix"]
  (_, _), (naive_a, naive_b) = results["naive"]["accuracy_matrix"]
  assert a_after_a > 0.97
  assert a_after_b >= a_after_a - 0.01, results[method]
  assert b_after_b >= naive_b - 0.03, (results[method], results["naive"])
  assert (a_after_a - naive_a) > (a_after_a - a_after_b) + 0.1   # naive forgets clearly more


def test_every_method_runs_and_replay_methods_keep_more_than_naive(results):
  assert set(results) == set(split_digits.METHODS)
  naive_a = results["naive"]["accuracy_matrix"][1][0]
  for name in ("replay", "ewc"):
    assert results[name]["accuracy_matrix"][1][0] > naive_a, name


def test_same_seed_same_numbers(results, tmp_path):
  assert split_digits.main(["--method", "fip", "--seed", "0", "--out", str(tmp_path / "again")]) == 0
  again = json.loads((tmp_path / "again" / "results.json").read_text())["methods"]["fip"]
  assert again["accuracy_matrix"] == results["fip"]["accuracy_matrix"]
  assert again["loss_curve"] == results["fip"]["loss_curve"]


def test_cli_refuses_to_overwrite(tmp_path):
  out = tmp_path / "r"
  cmd = [sys.executable, "-m", "experiments.split_digits", "--method", "naive", "--stages.steps", "20", "--first.steps",
         "20", "--out", str(out)]
  done = subprocess.run(cmd, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr
  before = (out / "results.json").read_text()
  again = subprocess.run(cmd, capture_output=True, text=True)
  assert again.returncode == 2 and "never overwritten" in again.stderr and "Traceback" not in again.stderr
  assert (out / "results.json").read_text() == before
