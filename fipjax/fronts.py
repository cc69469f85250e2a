"""Retention-versus-learning fronts: which points dominate, the area a method adds above the baselines' front, and
points chosen on validation and compared by seed.

A point is a dict with a method's ``"method"``, the knob ``"value"`` it ran at, and its means over seeds
``"retention"`` (the earlier tasks' final score) and ``"learning"`` (the last task's); :func:`choose` also reads the
per-seed lists ``"retention_by_seed"``, ``"learning_by_seed"`` and their ``"val_…"`` twins on the validation split.
:mod:`experiments.frontier` runs the sweeps that make the points.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import scipy.stats


def interval(values: Sequence[float]) -> float:
  """The half-width of the mean's 95% t-interval (0 for one seed)."""
  v = np.asarray(values, float)
  return 0.0 if len(v) < 2 else float(scipy.stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))


def dominates(a: dict, b: dict) -> bool:
  """Point ``a`` is no worse than ``b`` in both retention and learning, and better in one (means)."""
  ge = a["retention"] >= b["retention"] and a["learning"] >= b["learning"]
  return ge and (a["retention"] > b["retention"] or a["learning"] > b["learning"])


def hypervolume(points: Sequence[dict], ref: tuple[float, float]) -> float:
  """Area dominated by ``points`` (maximising retention and learning) above the reference corner ``ref``."""
  area, best_retention = 0.0, ref[0]
  for p in sorted(points, key=lambda p: -p["learning"]):          # sweep from the most learning down
    if p["retention"] > best_retention:
      area += (p["retention"] - best_retention) * (p["learning"] - ref[1])
      best_retention = p["retention"]
  return area


def analyse(points: list[dict], baselines: Sequence[str]) -> dict:
  """The baselines' front, each other method's added area above it, and its points a baseline point dominates."""
  base = [p for p in points if p["method"] in baselines]
  ref = (min(p["retention"] for p in points), min(p["learning"] for p in points))
  front = [p for p in base if not any(dominates(q, p) for q in base)]
  out = {"baseline_front": [(p["method"], p["value"]) for p in front], "reference": ref, "methods": {}}
  for method in dict.fromkeys(p["method"] for p in points if p["method"] not in baselines):
    own = [p for p in points if p["method"] == method]
    out["methods"][method] = {
        "area_above_baseline": hypervolume(base + own, ref) - hypervolume(base, ref),
        "dominated": [p["value"] for p in own if any(dominates(q, p) for q in base)]}
  return out


def choose(points: list[dict], baselines: Sequence[str]) -> dict:
  """Each method's point chosen on validation (the highest mean over seeds of (retention + learning) / 2 on the
  validation split), and every other method's chosen point against each baseline's: the test differences paired by
  seed, mean and 95% half-width. Empty when a point lacks validation scores."""
  if any(p.get("val_retention_by_seed") is None for p in points):
    return {}
  val = lambda p: float(np.mean(np.add(p["val_retention_by_seed"], p["val_learning_by_seed"]))) / 2
  best = {m: max((p for p in points if p["method"] == m), key=val) for m in dict.fromkeys(p["method"] for p in points)}
  diff = lambda a, b, k: np.subtract(a[f"{k}_by_seed"], b[f"{k}_by_seed"])
  pairs = [{"method": m, "baseline": b, **{f"{k}_difference": (float(diff(p, best[b], k).mean()),
                                                                interval(diff(p, best[b], k)))
                                             for k in ("retention", "learning")}}
           for m, p in best.items() if m not in baselines for b in baselines if b in best]
  return {"chosen": {m: {"value": p["value"], "validation": val(p)} for m, p in best.items()}, "paired": pairs}
