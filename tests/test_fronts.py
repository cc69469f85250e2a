"""fipjax.fronts: the area above a front, dominated points, points chosen on validation and paired by seed."""

import numpy as np
import pytest
import scipy.stats

from fipjax import fronts


def point(method, retention, learning, value="v"):
  return {"method": method, "value": value, "retention": retention, "learning": learning}


def test_hypervolume_is_the_union_of_the_points_rectangles():
  # [0, 0.5] × [0, 0.6] ∪ [0, 0.9] × [0, 0.2] = 0.30 + 0.4 · 0.2
  assert fronts.hypervolume([point("a", 0.9, 0.2), point("a", 0.5, 0.6)], (0.0, 0.0)) == pytest.approx(0.38)
  assert fronts.hypervolume([point("a", 0.9, 0.2), point("a", 0.8, 0.1)], (0.0, 0.0)) == pytest.approx(0.18)


def test_added_area_and_dominated_points():
  points = [point("naive", 0.5, 0.9), point("interp", 0.9, 0.5), point("fip", 0.8, 0.8, "beta=1"),
            point("fip", 0.4, 0.4, "beta=9"), point("ewc", 0.5, 0.5)]
  got = fronts.analyse(points, ["naive", "interp"])
  assert got["reference"] == (0.4, 0.4) and len(got["baseline_front"]) == 2
  # fip's (0.8, 0.8) adds the rectangle [0.5, 0.8] × [0.5, 0.8] above the two baseline points
  assert got["methods"]["fip"]["area_above_baseline"] == pytest.approx(0.09)
  assert got["methods"]["fip"]["dominated"] == ["beta=9"]
  assert got["methods"]["ewc"] == {"area_above_baseline": pytest.approx(0.0), "dominated": ["v"]}


def test_points_are_chosen_on_validation_and_compared_by_seed():
  seeded = lambda m, v, test, val: {"method": m, "value": v, "retention_by_seed": test[0], "learning_by_seed": test[1],
                                    "val_retention_by_seed": val[0], "val_learning_by_seed": val[1]}
  points = [seeded("naive", "a", ([0.5, 0.6], [0.9, 0.9]), ([0.5, 0.5], [0.9, 0.9])),
            seeded("naive", "b", ([0.7, 0.7], [0.8, 0.8]), ([0.2, 0.2], [0.2, 0.2])),
            # fip's "y" is best on test, "x" on validation: the test split never chooses
            seeded("fip", "x", ([0.8, 0.9], [0.9, 1.0]), ([0.9, 0.9], [0.9, 0.9])),
            seeded("fip", "y", ([1.0, 1.0], [1.0, 1.0]), ([0.1, 0.1], [0.1, 0.1]))]
  got = fronts.choose(points, ["naive"])
  assert {m: c["value"] for m, c in got["chosen"].items()} == {"naive": "a", "fip": "x"}
  (pair,) = got["paired"]
  assert pair["method"] == "fip" and pair["baseline"] == "naive"
  # differences by seed: retention (0.3, 0.3), learning (0.0, 0.1)
  assert pair["retention_difference"] == pytest.approx((0.3, 0.0), abs=1e-12)
  assert pair["learning_difference"][0] == pytest.approx(0.05)
  assert pair["learning_difference"][1] == pytest.approx(fronts.interval([0.0, 0.1]))
  assert fronts.choose([{**points[0], "val_retention_by_seed": None}], ["naive"]) == {}


def test_interval_is_the_t_interval_half_width():
  v = [0.1, 0.4, 0.2]
  assert fronts.interval(v) == pytest.approx(scipy.stats.t.ppf(0.975, 2) * np.std(v, ddof=1) / np.sqrt(3))
  assert fronts.interval([0.3]) == 0.0
