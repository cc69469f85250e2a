"""Mean ± std over seeds of several ``results.json`` files of one experiment (``experiments.yelp_imdb``,
``experiments.split_digits`` or ``experiments.continual_dpo``).

    python -m experiments.summarize runs/seed0/results.json runs/seed1/results.json runs/seed2/results.json
    python -m experiments.summarize runs/align-matrices/*-s*/results.json --baseline dpo      # fipjax.align runs

Files of the same seed are merged method by method (a later file's method replaces an earlier one's), so methods
run separately can join a table, provided they started from the same first-stage network (``fipjax.align`` runs:
the same model and months; a LoRA method's first month is LoRA-DPO by design). ``--baseline`` adds each method's
paired differences from one method, seed by seed, with 95% t-intervals.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

from fipjax import fronts, results as results_lib

# What fixes the months of a fipjax.align run (its results' "config" holds "rounds"): methods of a seed join a table
# when these agree.
ALIGN_DATA = ("model", "rounds", "resume_from", "test_fraction", "dtype", "pairs", "reward")


def first_stage(result: dict) -> str:
  """What identifies a file's first-stage network and later data: everything but the method hyperparameters
  (and the seed, which groups files), plus the first-stage accuracies."""
  if "rounds" in result["config"]:
    return json.dumps({k: result["config"].get(k) for k in ALIGN_DATA}, sort_keys=True)
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
    if np.isnan(vals).all():         # not measured (e.g. no --held-out-text): never a NaN in a table
      return "n/a"
    if len(vals) == 1 < len(results):
      return f"{vals[0]:.{digits}f} (1 seed)"
    fewer = f" ({len(vals)} seeds)" if len(vals) < len(results) else ""
    return f"{vals.mean():.{digits}f} ± {vals.std(ddof=1) if len(vals) > 1 else 0.0:.{digits}f}{fewer}"
  return cell


def alignment_metric(results: list[dict]) -> tuple[str, str, str]:
  """(matrix, forgetting column, what): the rewards where any round has one, else preference accuracy."""
  rewarded = any(v is not None for r in results for m in r["methods"].values() for row in m["reward_matrix"]
                 for v in row)
  return (("reward_matrix", "reward_forgetting", "reward") if rewarded else
          ("preference_accuracy_matrix", "forgetting", "preference accuracy"))


def summarize_alignment(results: list[dict], methods: list[str]) -> str:
  """Continual DPO: each round's reward (or, without rewards, preference accuracy) after its own round and at the
  end, forgetting, preference accuracy, KL to the base model and perplexity, validation rewards."""
  rounds = next(iter(results[0]["methods"].values()))["rounds"]
  cell, last = _cell(results), rounds[-1]
  matrix, forgetting, what = alignment_metric(results)
  cols = [c for r in rounds[:-1] for c in (f"{r} after its round", f"{r} final", f"forgetting {r}")]
  cols += [f"{last} final", "pref. acc. " + " / ".join(rounds), "KL to base", "perplexity"]
  lines = [f"Seeds {[r['seed'] for r in results]}; mean ± sample std over seeds; {what} on test "
           f"{'prompts' if what == 'reward' else 'pairs'}.", "",
           "| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
  for name in methods:
    cells = []
    for j in range(len(rounds) - 1):
      cells += [cell(name, lambda m: m[matrix][j + 1][j]), cell(name, lambda m: m[matrix][-1][j]),
                cell(name, lambda m: m[forgetting][j])]
    cells += [cell(name, lambda m: m[matrix][-1][-1]),
              " / ".join(cell(name, lambda m: m["preference_accuracy_matrix"][-1][j], 2) for j in range(len(rounds))),
              cell(name, lambda m: _number(m["kl_to_base"][-1]), 4),
              cell(name, lambda m: _number(m["perplexity"][-1]), 2)]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  if any(v is not None for r in results for m in r["methods"].values() for v in m["validation_reward"].values()):
    lines += ["", f"Validation reward after the last round ({' / '.join(rounds)}; the split used for tuning):", ""]
    for name in methods:
      lines.append(f"- {name}: " + " / ".join(cell(name, lambda m: m["validation_reward"][r]) for r in rounds))
  return "\n".join(lines) + "\n"


def _number(v) -> float:
  return np.nan if v is None else v


def interval(diffs: np.ndarray) -> str:
  """``mean [low, high] (n)``: the mean of paired differences and its 95% t-interval."""
  n = len(diffs)
  if n < 2:
    return f"{diffs.mean():+.3f} (1 seed, no interval)" if n else "n/a"
  half = fronts.interval(diffs)
  return f"{diffs.mean():+.3f} [{diffs.mean() - half:+.3f}, {diffs.mean() + half:+.3f}] ({n})"


def paired_differences(results: list[dict], methods: list[str], baseline: str) -> str:
  """Each method minus ``baseline``, seed by seed (the seeds that ran both): forgetting of every earlier round and
  the last round's final value (what it learnt), mean and 95% t-interval."""
  kind = results_lib.kind_of(results[0])
  if kind == results_lib.ALIGNMENT.kind:
    matrix, forgetting, what = alignment_metric(results)
    rounds = next(iter(results[0]["methods"].values()))["rounds"]
    cols = [(f"forgetting {r}", lambda m, j=j: m[forgetting][j]) for j, r in enumerate(rounds[:-1])]
    cols.append((f"{rounds[-1]} final", lambda m: m[matrix][-1][-1]))
  else:
    tasks = next(iter(results[0]["methods"].values()))["tasks"]
    what = "accuracy"
    cols = [(f"Δ {t}", lambda m, j=j: m["accuracy_matrix"][-1][j] - m["accuracy_matrix"][0][j])
            for j, t in enumerate(tasks[:-1])] + [(f"{tasks[-1]} final", lambda m: m["accuracy_matrix"][-1][-1])]
  lines = ["", f"Paired differences from {baseline} ({what}; method − {baseline}, seed by seed: mean [95% t-interval] "
           "(seeds)):", "", "| method | " + " | ".join(c for c, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
  for name in methods:
    if name == baseline:
      continue
    pairs = [(r["methods"][name], r["methods"][baseline]) for r in results
             if name in r["methods"] and baseline in r["methods"]]
    cells = [interval(np.array([get(a) - get(b) for a, b in pairs], float)) for _, get in cols]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
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


def summarize(results: list[dict], baseline: str | None = None) -> str:
  results = merge_by_seed(results)
  methods = list(dict.fromkeys(name for r in results for name in r["methods"]))
  if baseline is not None and baseline not in methods:
    raise ValueError(f"--baseline {baseline} is not among the files' methods ({', '.join(methods)})")
  kind_table = (summarize_alignment if results_lib.kind_of(results[0]) == results_lib.ALIGNMENT.kind
                else summarize_stream)
  paired = "" if baseline is None else paired_differences(results, methods, baseline)
  return kind_table(results, methods) + paired + every_scalar(results, methods)


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
  p.add_argument("--baseline", default=None, help="a method: add every other method's paired differences from it")
  args = p.parse_args(argv)
  missing = [str(r) for r in args.results if not r.exists()]
  if missing:
    print(f"error: no such results file: {', '.join(missing)}", file=sys.stderr)
    return 2
  try:
    print(summarize([json.loads(r.read_text()) for r in args.results], args.baseline))
  except (ValueError, KeyError) as e:
    print(f"error: {e} (is every file a results.json of one experiment?)", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
