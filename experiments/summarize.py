"""Mean ± std over seeds of several ``results.json`` files of ``experiments.yelp_imdb``.

    python -m experiments.summarize runs/seed0/results.json runs/seed1/results.json runs/seed2/results.json

Files of the same seed are merged method by method (a later file's method replaces an earlier one's), so methods
run separately can join a table, provided they started from the same stage-1 network.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

from experiments.yelp_imdb import STAGE1_FIELDS

# What files merged into one seed's row must share: the stage-1 network, and the stage-2 data and schedule.
SHARED_KEYS = STAGE1_FIELDS + ("n_train_imdb", "n_test", "buffer_size", "replay_batch_size", "steps", "epochs")


def merge_by_seed(results: list[dict]) -> list[dict]:
  """One result per seed, its methods the union of that seed's files.

  Raises:
    ValueError: files of one seed whose stage-1 networks differ (stage-1 accuracies or configuration).
  """
  by_seed: dict[int, dict] = {}
  for r in results:
    seed = r["seed"]
    if seed not in by_seed:
      by_seed[seed] = {**r, "methods": dict(r["methods"])}
      continue
    first = by_seed[seed]
    stage1 = lambda res: {json.dumps(m["stage1"], sort_keys=True) for m in res["methods"].values()}
    same_config = all(first["config"].get(k) == r["config"].get(k) for k in SHARED_KEYS)
    if not same_config or stage1(first) != stage1(r):
      raise ValueError(f"seed {seed}: the files do not share one stage-1 network (configuration or stage-1 "
                       "accuracies differ); summarise them separately")
    first["methods"].update(r["methods"])
  return list(by_seed.values())


def summarize(results: list[dict]) -> str:
  results = merge_by_seed(results)
  methods = list(dict.fromkeys(name for r in results for name in r["methods"]))
  seeds = [r["seed"] for r in results]

  def cell(name, get, digits=3):
    vals = np.array([get(r["methods"][name]) for r in results if name in r["methods"]], float)
    return f"{vals.mean():.{digits}f} ± {vals.std(ddof=1) if len(vals) > 1 else 0.0:.{digits}f}"

  lines = [f"Seeds {seeds}; mean ± sample std over seeds.", "",
           "| method | Yelp after stage 1 | Yelp after stage 2 | Δ Yelp | IMDB after stage 1 | IMDB after stage 2 "
           "| weight change | forgetting | ACC |", "|---|---|---|---|---|---|---|---|---|"]
  for name in methods:
    lines.append("| " + " | ".join([
        name, cell(name, lambda m: m["stage1"]["yelp"]), cell(name, lambda m: m["stage2"]["yelp"]),
        cell(name, lambda m: m["stage2"]["yelp"] - m["stage1"]["yelp"]), cell(name, lambda m: m["stage1"]["imdb"]),
        cell(name, lambda m: m["stage2"]["imdb"]), cell(name, lambda m: m["weight_change"], 4),
        cell(name, lambda m: m["forgetting"]), cell(name, lambda m: m["average_accuracy"])]) + " |")
  if results[0]["config"]["heads"] == "shared":
    lines += ["", "Task-agnostic test accuracy after stage 2 (argmax over all seven labels), Yelp / IMDB:", ""]
    for name in methods:
      lines.append(f"- {name}: {cell(name, lambda m: m['task_agnostic']['stage2']['yelp'])} / "
                   f"{cell(name, lambda m: m['task_agnostic']['stage2']['imdb'])}")
  lines += ["", "Validation accuracy after stage 2 (Yelp / IMDB; the split used for tuning):", ""]
  for name in methods:
    lines.append(f"- {name}: {cell(name, lambda m: m['validation']['yelp'])} / "
                 f"{cell(name, lambda m: m['validation']['imdb'])}")
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("results", nargs="+", type=pathlib.Path)
  args = p.parse_args(argv)
  missing = [str(r) for r in args.results if not r.exists()]
  if missing:
    print(f"error: no such results file: {', '.join(missing)}", file=sys.stderr)
    return 2
  try:
    print(summarize([json.loads(r.read_text()) for r in args.results]))
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
