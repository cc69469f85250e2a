"""Mean ± std over seeds of several ``results.json`` files of one experiment (``experiments.yelp_imdb``,
``experiments.split_digits`` or ``experiments.continual_dpo``).

    python -m experiments.summarize runs/seed0/results.json runs/seed1/results.json runs/seed2/results.json

Files of the same seed are merged method by method (a later file's method replaces an earlier one's), so methods
run separately can join a table, provided they started from the same first-stage network.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

from fipjax import results as results_lib


def first_stage(result: dict) -> str:
  """What identifies a file's first-stage network and later data: everything but the method hyperparameters
  (and the seed, which groups files), plus the first-stage accuracies."""
  cfg = {k: v for k, v in result["config"].items() if k not in ("method", "run", "seed")}
  kind = results_lib.kind_of(result)
  rows = {json.dumps(_first_rows(m, kind)) for m in result["methods"].values()}
  return json.dumps([cfg, sorted(rows)], sort_keys=True)


def _first_rows(m: dict, kind: str) -> list:
  """What every method of a seed shares: the first-stage accuracies, or the base and round-1 rewards."""
  return m["accuracy_matrix"][:1] if kind == results_lib.STREAM.kind else m["reward_matrix"][:2]


def merge_by_seed(results: list[dict]) -> list[dict]:
  """One result per seed, its methods the union of that seed's files.

  Raises:
    ValueError: files of one seed whose first-stage networks differ (configuration or first-stage accuracies).
  """
  by_seed: dict[int, dict] = {}
  for r in results:
    first = by_seed.setdefault(r["seed"], {**r, "methods": {}})
    if first["methods"] and first_stage(first) != first_stage(r):
      raise ValueError(f"seed {r['seed']}: the files do not share one stage-1 network (configuration or stage-1 "
                       "accuracies differ); summarise them separately")
    first["methods"].update(r["methods"])
  return list(by_seed.values())


def _cell(results: list[dict]):
  """``cell(method, get)``: mean ± sample std over the seeds that ran the method (their count when fewer)."""
  def cell(name, get, digits=3):
    vals = np.array([get(r["methods"][name]) for r in results if name in r["methods"]], float)
    if len(vals) == 1 < len(results):
      return f"{vals[0]:.{digits}f} (1 seed)"
    fewer = f" ({len(vals)} seeds)" if len(vals) < len(results) else ""
    return f"{vals.mean():.{digits}f} ± {vals.std(ddof=1) if len(vals) > 1 else 0.0:.{digits}f}{fewer}"
  return cell


def summarize_alignment(results: list[dict], methods: list[str]) -> str:
  """Continual DPO: each round's reward after its own round and at the end, forgetting, preference accuracy,
  KL to the base model and perplexity, validation rewards."""
  rounds = next(iter(results[0]["methods"].values()))["rounds"]
  cell, last = _cell(results), rounds[-1]
  cols = [c for r in rounds[:-1] for c in (f"{r} after its round", f"{r} final", f"forgetting {r}")]
  cols += [f"{last} final", "pref. acc. " + " / ".join(rounds), "KL to base", "perplexity"]
  lines = [f"Seeds {[r['seed'] for r in results]}; mean ± sample std over seeds; rewards on test prompts.", "",
           "| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
  for name in methods:
    cells = []
    for j in range(len(rounds) - 1):
      cells += [cell(name, lambda m: m["reward_matrix"][j + 1][j]), cell(name, lambda m: m["reward_matrix"][-1][j]),
                cell(name, lambda m: m["reward_forgetting"][j])]
    cells += [cell(name, lambda m: m["reward_matrix"][-1][-1]),
              " / ".join(cell(name, lambda m: m["preference_accuracy_matrix"][-1][j], 2) for j in range(len(rounds))),
              cell(name, lambda m: m["kl_to_base"][-1], 4), cell(name, lambda m: m["perplexity"][-1], 2)]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  lines += ["", f"Validation reward after the last round ({' / '.join(rounds)}; the split used for tuning):", ""]
  for name in methods:
    lines.append(f"- {name}: " + " / ".join(cell(name, lambda m: m["validation_reward"][r]) for r in rounds))
  return "\n".join(lines) + "\n"


def every_scalar(results: list[dict], methods: list[str]) -> str:
  """Mean ± std over seeds of every scalar column of the results' schema (:mod:`fipjax.results`)."""
  cell, cols = _cell(results), results_lib.SCHEMAS[results_lib.kind_of(results[0])].scalars()
  lines = ["", "Every scalar column (mean ± sample std over seeds):", "",
           "| method | " + " | ".join(c.name for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
  for name in methods:
    lines.append(f"| {name} | " + " | ".join(
        cell(name, lambda m: np.nan if m.get(c.name) is None else m[c.name]) for c in cols) + " |")
  return "\n".join(lines) + "\n"


def summarize(results: list[dict]) -> str:
  results = merge_by_seed(results)
  methods = list(dict.fromkeys(name for r in results for name in r["methods"]))
  kind_table = (summarize_alignment if results_lib.kind_of(results[0]) == results_lib.ALIGNMENT.kind
                else summarize_stream)
  return kind_table(results, methods) + every_scalar(results, methods)


def summarize_stream(results: list[dict], methods: list[str]) -> str:
  """A task stream: each task's accuracy after the first stage and at the end, weight change, forgetting, ACC,
  task-agnostic and validation accuracy."""
  tasks = next(iter(results[0]["methods"].values()))["tasks"]
  seeds = [r["seed"] for r in results]
  cell = _cell(results)

  cols = [c for t in tasks for c in (f"{t} after stage 1", f"{t} final", f"Δ {t}")]
  lines = [f"Seeds {seeds}; mean ± sample std over seeds.", "",
           "| method | " + " | ".join(cols) + " | weight change | forgetting | ACC |", "|---" * (len(cols) + 4) + "|"]
  for name in methods:
    cells = []
    for j in range(len(tasks)):
      cells += [cell(name, lambda m: m["accuracy_matrix"][0][j]), cell(name, lambda m: m["accuracy_matrix"][-1][j]),
                cell(name, lambda m: m["accuracy_matrix"][-1][j] - m["accuracy_matrix"][0][j])]
    cells += [cell(name, lambda m: m["weight_change"], 4), cell(name, lambda m: m["forgetting"]),
              cell(name, lambda m: m["average_accuracy"])]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  final_agnostic = lambda m: m["task_agnostic_matrix"][-1]
  if all(a is not None for r in results for m in r["methods"].values() for a in final_agnostic(m)):
    lines += ["", f"Task-agnostic test accuracy after the last stage (argmax over every label), "
              f"{' / '.join(tasks)}:", ""]
    for name in methods:
      lines.append(f"- {name}: " + " / ".join(cell(name, lambda m: final_agnostic(m)[j]) for j in range(len(tasks))))
  if all(m["validation"] is not None for r in results for m in r["methods"].values()):
    lines += ["", f"Validation accuracy after the last stage ({' / '.join(tasks)}; the split used for tuning):", ""]
    for name in methods:
      lines.append(f"- {name}: " + " / ".join(cell(name, lambda m: m["validation"][t]) for t in tasks))
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
  except (ValueError, KeyError) as e:
    print(f"error: {e} (is every file a results.json of one experiment?)", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
