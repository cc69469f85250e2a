"""Mean ± std over seeds of several ``results.json`` files of ``experiments.yelp_imdb``.

    python -m experiments.summarize runs/seed0/results.json runs/seed1/results.json runs/seed2/results.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np


def summarize(results: list[dict]) -> str:
  methods = list(results[0]["methods"])
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
  print(summarize([json.loads(r.read_text()) for r in args.results]))
  return 0


if __name__ == "__main__":
  sys.exit(main())
