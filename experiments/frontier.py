"""Retention-versus-learning fronts: each method's own knob swept, over seeds, against the cheap baselines' front.

    python -m experiments.frontier split_digits --sweep naive:stages.steps=25,50,100,200 \\
        --sweep interp:interp.alpha=0.25,0.5,0.75 --sweep fip:fip.beta=10,100,1000 --seeds 0,1,2 --out runs/front

    python -m experiments.frontier yelp_imdb --seeds 0,1,2 --out runs/front-yelp \\
        --sweep naive:stages.steps=8,16,32 --sweep interp:interp.alpha=0.25,0.5,0.75 --sweep fip:fip.beta=1,10,100 \\
        -- --preset cpu

Each ``--sweep METHOD:KNOB=V1,V2,…`` runs the experiment (``split_digits``, ``yelp_imdb``, ``continual_dpo`` or
``align``, i.e. ``fipjax.align``) once per value and seed, with ``--method METHOD --KNOB V --seed S`` and the flags
after ``--``; ``--sweep METHOD`` is one point. A variant of a method is its own curve: ``--sweep
"fip-dpo[dpo.anchor=policy]:fip.beta=16,64"`` adds ``--dpo.anchor policy`` to each of its runs. Runs go to ``OUT/runs/<method>/<knob>=<value>/seed<S>/`` and share
``OUT/cache`` (the first stage is learnt once per seed); a finished run is reused, so a sweep killed or spread over
sittings resumes where it stopped.

A point is a method at one value: its retention (the mean final score of the earlier tasks / rounds: accuracy,
reward, or without rewards the preference accuracy) and its learning (the last task's final score), mean and 95%
t-interval over the seeds. The baselines' front (``--baseline``, default naive and interp, or dpo and interp-dpo for
preference runs) is the set of their points no other of theirs dominates. For every other method: the area it adds
above that front (2-D hypervolume over the lowest retention and learning of all points), and which of its points a
baseline point dominates (no worse in both, better in one). Each method's point is also chosen on validation
(the highest validation (retention + learning) / 2) and compared with each baseline's chosen point by the test
differences paired by seed. Writes ``frontier.json``, ``frontier.md`` and ``frontier.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import pathlib
import sys
from typing import Sequence

import numpy as np

from fipjax import config as cf
from fipjax import continual, fronts, results as results_lib, runs

EXPERIMENTS = {"split_digits": "experiments.split_digits", "yelp_imdb": "experiments.yelp_imdb",
               "continual_dpo": "experiments.continual_dpo", "align": "fipjax.align"}
CACHED = ("yelp_imdb", "continual_dpo", "align")        # the experiments that take --cache-dir
PREFERENCE_EXPERIMENTS = ("continual_dpo", "align")     # their methods are named on preferences (dpo, fip-dpo, …)


@dataclasses.dataclass(frozen=True)
class Sweep:
  """One curve: ``method`` run with the ``fixed`` flags (``((knob, value), …)``, a variant of the method, e.g.
  ``fip-dpo[dpo.anchor=policy]``) and ``knob`` (a dotted flag without dashes, e.g. ``fip.beta``) at each of
  ``values``, or one point (``knob`` None)."""
  method: str
  knob: str | None
  values: tuple[str, ...]
  fixed: tuple[tuple[str, str], ...] = ()

  @classmethod
  def parse(cls, spec: str) -> "Sweep":
    head, _, knob = spec.partition(":")
    method, bracket, rest = head.partition("[")
    fixed = ()
    if bracket:
      pairs = [p.strip().partition("=") for p in rest.removesuffix("]").split(",")]
      if not rest.endswith("]") or any(not k or not sep or not v for k, sep, v in pairs):
        raise runs.UsageError(f"--sweep {spec!r}: write a variant's fixed flags as METHOD[KNOB=V,KNOB=V] (e.g. "
                              "fip-dpo[dpo.anchor=policy]:fip.beta=16,64).")
      fixed = tuple((k.strip().lstrip("-"), v.strip()) for k, _, v in pairs)
    if not method:
      raise runs.UsageError(f"--sweep {spec!r} names no method; write METHOD:KNOB=V1,V2 or METHOD.")
    if not knob:
      return cls(method, None, ("",), fixed)
    name, sep, values = knob.partition("=")
    vals = tuple(v.strip() for v in values.split(",") if v.strip())
    if not sep or not name or not vals:
      raise runs.UsageError(f"--sweep {spec!r}: write METHOD:KNOB=V1,V2,… (e.g. fip:fip.beta=1,10,100).")
    return cls(method, name.lstrip("-"), vals, fixed)

  @property
  def name(self) -> str:
    """The curve's name: the method, with its fixed flags in brackets where it has any."""
    return self.method + (f"[{','.join(f'{k}={v}' for k, v in self.fixed)}]" if self.fixed else "")

  def flags(self, value: str) -> list[str]:
    knobs = [*self.fixed, *([] if self.knob is None else [(self.knob, value)])]
    return [a for k, v in knobs for a in (f"--{k.replace('_', '-')}", v)]

  def label(self, value: str) -> str:
    return "default" if self.knob is None else f"{self.knob}={value}"


def run_dir(out: pathlib.Path, sweep: Sweep, value: str, seed: int) -> pathlib.Path:
  return out / "runs" / sweep.name / sweep.label(value) / f"seed{seed}"


def run_point(experiment: str, sweep: Sweep, value: str, seed: int, out: pathlib.Path, extra: list[str]) -> dict:
  """The results of one run (reused when finished): ``--method``, the knob, ``--seed``, ``--out`` and ``extra``."""
  path = run_dir(out, sweep, value, seed)
  if not (path / "results.json").exists():
    argv = [*extra, "--method", sweep.method, *sweep.flags(value), "--seed", str(seed), "--out", str(path)]
    if experiment in CACHED and "--cache-dir" not in extra:
      argv += ["--cache-dir", str(out / "cache")]
    runs.log(f"frontier: {sweep.name} {sweep.label(value)} seed {seed}")
    code = importlib.import_module(EXPERIMENTS[experiment]).main(argv)
    if code != 0:
      raise runs.UsageError(f"the run of {sweep.name} at {sweep.label(value)}, seed {seed} failed (exit {code}; "
                            f"its message is above): python -m {EXPERIMENTS[experiment]} {' '.join(argv)}")
  return json.loads((path / "results.json").read_text())


def scores(result: dict, method: str) -> tuple[float, float]:
  """(retention, learning) of a method's results: the mean final score of the earlier tasks / rounds, the last
  one's final score."""
  m = result["methods"][method]
  if results_lib.kind_of(result) == results_lib.STREAM.kind:
    final = m["accuracy_matrix"][-1]
  else:
    rewarded = all(v is not None for v in m["reward_matrix"][-1])
    final = m["reward_matrix" if rewarded else "preference_accuracy_matrix"][-1]
  if any(v is None for v in final):
    raise runs.UsageError(f"{method}'s final row has no score for some task ({final}); it cannot be placed on a "
                          "front.")
  return float(np.mean(final[:-1])), float(final[-1])


def validation_scores(result: dict, method: str) -> tuple[float, float] | None:
  """(retention, learning) on the validation split, as :func:`scores` on the test split; None when a run has no
  validation score for every task / round (then no point is chosen)."""
  m = result["methods"][method]
  val, names = m.get("validation") or m.get("validation_reward"), m.get("tasks") or m.get("rounds")
  if not val or any(val.get(n) is None for n in names):
    return None
  return float(np.mean([val[n] for n in names[:-1]])), float(val[names[-1]])


def distances(result: dict, method: str) -> tuple[float, float] | None:
  """(buffer, held-out) old rounds' distance to the policy entering the last round, after it (continual alignment:
  ``old_round_distance``); None where a run did not record it."""
  d = result["methods"][method].get("old_round_distance")
  return (d[-1]["buffer"], d[-1]["held_out"]) if d else None


def plot(path: pathlib.Path, points: list[dict], what: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.5, 5))
  for method in dict.fromkeys(p["method"] for p in points):
    own = [p for p in points if p["method"] == method]
    ax.errorbar([p["learning"] for p in own], [p["retention"] for p in own], xerr=[p["learning_ci"] for p in own],
                yerr=[p["retention_ci"] for p in own], marker="o", capsize=3, label=method)
  ax.set_xlabel(f"learning: the last task's {what}")
  ax.set_ylabel(f"retention: the earlier tasks' {what}")
  ax.set_title("mean and 95% interval over seeds; a line joins a method's knob values")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def table(points: list[dict], analysis: dict, seeds: list[int], command: str) -> str:
  cell = lambda m, h: f"{m:.3f} ± {h:.3f}"
  lines = [f"# Retention-versus-learning front", "", f"Command: `{command}`", "",
           f"Seeds {seeds}; mean ± half-width of the 95% t-interval over seeds.", "",
           "| method | knob | retention | learning |", "|---|---|---|---|"]
  lines += [f"| {p['method']} | {p['value']} | {cell(p['retention'], p['retention_ci'])} | "
            f"{cell(p['learning'], p['learning_ci'])} |" for p in points]
  if measured := [p for p in points if "distance_buffer" in p]:
    lines += ["", "The old rounds' token distributions after the last round: mean Bhattacharyya distance to the policy "
              "entering it (mean over seeds), on the buffered anchor sequences and on completions to unseen test "
              "prompts, and their ratio (how much of the buffer's hold carries to prompts no method saw):", "",
              "| method | knob | on the buffer | on unseen prompts | unseen / buffer |", "|---|---|---|---|---|"]
    lines += [f"| {p['method']} | {p['value']} | {p['distance_buffer']:.4f} | {p['distance_held_out']:.4f} | "
              f"{p['distance_held_out'] / max(p['distance_buffer'], 1e-12):.2f} |" for p in measured]
  lines += ["", "Baselines' front: " + ", ".join(f"{m} {v}" for m, v in analysis["baseline_front"]), "",
            "| method | area added above the baselines' front | points a baseline point dominates |", "|---|---|---|"]
  lines += [f"| {m} | {a['area_above_baseline']:.4f} | {', '.join(a['dominated']) or 'none'} |"
            for m, a in analysis["methods"].items()]
  if chosen := analysis.get("chosen"):
    at = {(p["method"], p["value"]): p for p in points}
    lines += ["", "Chosen on validation (the highest validation (retention + learning) / 2 of each method's points), "
              "test scores:", "", "| method | chosen | retention | learning |", "|---|---|---|---|"]
    lines += [f"| {m} | {c['value']} | {cell(at[m, c['value']]['retention'], at[m, c['value']]['retention_ci'])} | "
              f"{cell(at[m, c['value']]['learning'], at[m, c['value']]['learning_ci'])} |" for m, c in chosen.items()]
    signed = lambda d: f"{d[0]:+.3f} ± {d[1]:.3f}"
    lines += ["", "Chosen point minus a baseline's chosen point, paired by seed (test):", "",
              "| method | baseline | retention difference | learning difference |", "|---|---|---|---|"]
    lines += [f"| {d['method']} | {d['baseline']} | {signed(d['retention_difference'])} | "
              f"{signed(d['learning_difference'])} |" for d in analysis["paired"]]
  else:
    lines += ["", "No point is chosen: these runs have no validation score for every task (split_digits has no "
              "validation split)."]
  return "\n".join(lines) + "\n"


def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m experiments.frontier", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("experiment", choices=sorted(EXPERIMENTS))
  p.add_argument("--sweep", action="append", default=[], required=True, help="METHOD:KNOB=V1,V2,… or METHOD, "
                 "METHOD[KNOB=V,…] for a variant with fixed flags (repeat the flag)")
  p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
  p.add_argument("--baseline", default=None, help="comma-separated methods whose points make the baselines' front "
                 "(default naive,interp; dpo,interp-dpo for preference runs)")
  p.add_argument("--out", type=pathlib.Path, required=True, help="the sweep's folder (a sweep resumes in it)")
  argv = list(sys.argv[1:] if argv is None else argv)
  extra = argv[argv.index("--") + 1:] if "--" in argv else []
  args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
  try:
    check_flags(args.experiment, extra, [Sweep.parse(s) for s in args.sweep])
  except runs.UsageError as e:
    p.error(str(e))
  return args, extra


def check_flags(experiment: str, extra: list[str], sweeps: list[Sweep]) -> None:
  """Every run's command line parses (the experiment's own parser: an unknown flag, knob or value exits 2 with
  its message) before anything runs."""
  parse = importlib.import_module(EXPERIMENTS[experiment]).parse_args
  for s in sweeps:
    for value in s.values:
      flags = ["--method", s.method, *s.flags(value)]
      parse([*extra, *flags, *(["--out", "frontier-check"] if "--out" not in extra else [])])


def quick_sweep(name: str, cfg, on_preferences: bool) -> str:
  """``--sweep`` for method ``name`` around ``cfg``'s values: its registry knob (:class:`fipjax.continual.FrontKnob`;
  LoRA's rank for plain fine-tuning in LoRA), or one point."""
  parsed = continual.parse_name(name, on_preferences=on_preferences)
  knob = parsed.spec.front_knob(parsed.in_lora)
  value = None if knob is None else next(l.value for l in cf.leaves(cfg) if ".".join(l.flag) == knob.flag)
  if value is None:
    return name
  return f"{name}:{knob.flag}=" + ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in knob.values(value))


def _without(argv: Sequence[str], flags: dict[str, int]) -> list[str]:
  """``argv`` less each flag of ``flags`` (name → how many values follow it; ``--flag=value`` too)."""
  out, skip = [], 0
  for a in argv:
    if skip:
      skip -= 1
    elif a.split("=", 1)[0] in flags:
      skip = 0 if "=" in a else flags[a.split("=", 1)[0]]
    else:
      out.append(a)
  return out


FLAG_HELP = ("instead of one run, a quick retention-versus-learning front at --seed: the baselines and --method, "
             "each at three values of its own knob (python -m experiments.frontier for seeds and intervals)")


def from_experiment(experiment: str, argv: Sequence[str] | None, cfg, methods: Sequence[str],
                    out: pathlib.Path | None, runs_root: pathlib.Path, cache_dir: pathlib.Path | None = None) -> int:
  """``--frontier`` on an experiment's command line: a quick front at its ``--seed`` alone (no intervals; use this
  command with ``--seeds`` for them) of the baselines and ``methods``, each method's registry knob at three values
  around its configured one, the command's other flags given to every run (its cache too). Written to ``out``,
  else ``runs_root/frontier-<digest of the command>`` (so that the same command resumes)."""
  preference = experiment in PREFERENCE_EXPERIMENTS
  argv = list(sys.argv[1:] if argv is None else argv)
  extra = _without(argv, {"--frontier": 0, "--method": 1, "--seed": 1, "--out": 1})
  if cache_dir is not None and "--cache-dir" not in extra:      # the command's own cache, not the sweep's
    extra += ["--cache-dir", str(cache_dir)]
  baselines = continual.baselines(on_preferences=preference)
  sweeps = [quick_sweep(m, cfg, preference) for m in dict.fromkeys([*baselines, *methods])]
  args = [experiment, *(a for s in sweeps for a in ("--sweep", s)), "--seeds", str(cfg.seed)]
  out = out or runs_root / f"frontier-{runs.digest({'argv': args + extra})}"
  return main([*args, "--out", str(out), "--", *extra])


def main(argv=None) -> int:
  args, extra = parse_args(argv)
  command = " ".join(["python -m experiments.frontier"] + list(sys.argv[1:] if argv is None else argv))

  def run():
    sweeps = [Sweep.parse(s) for s in args.sweep]
    try:
      seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
      raise runs.UsageError(f"--seeds {args.seeds!r} is not a comma-separated list of integers.") from None
    preference = args.experiment in PREFERENCE_EXPERIMENTS
    for s in sweeps:      # a name the registry does not know fails here, before any run
      try:
        continual.parse_name(s.method, on_preferences=preference)
      except ValueError as e:
        raise runs.UsageError(f"--sweep {s.method}: {e}") from None
    baselines = args.baseline.split(",") if args.baseline else continual.baselines(on_preferences=preference)
    if not any(s.name in baselines for s in sweeps):
      raise runs.UsageError(f"no --sweep runs a baseline ({', '.join(baselines)}); sweep one, or name others with "
                            "--baseline.")
    points, kinds = [], set()
    for s in sweeps:
      for value in s.values:
        got = [run_point(args.experiment, s, value, seed, args.out, extra) for seed in seeds]
        kinds |= {results_lib.kind_of(r) for r in got}
        ret, learn = zip(*(scores(r, s.method) for r in got))
        val = [validation_scores(r, s.method) for r in got]
        val_ret, val_learn = zip(*val) if None not in val else (None, None)
        dist = [distances(r, s.method) for r in got] if preference else [None]
        points.append({"method": s.name, "knob": s.knob, "value": s.label(value), "seeds": seeds,
                       "retention_by_seed": list(ret), "learning_by_seed": list(learn),
                       "val_retention_by_seed": val_ret and list(val_ret),
                       "val_learning_by_seed": val_learn and list(val_learn),
                       "retention": float(np.mean(ret)), "learning": float(np.mean(learn)),
                       "retention_ci": fronts.interval(ret), "learning_ci": fronts.interval(learn),
                       **({} if None in dist else {"distance_buffer": float(np.mean([d[0] for d in dist])),
                                                   "distance_held_out": float(np.mean([d[1] for d in dist]))})})
    analysis = {**fronts.analyse(points, baselines), **fronts.choose(points, baselines)}
    what = "accuracy" if kinds == {results_lib.STREAM.kind} else "score"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "frontier.json").write_text(json.dumps({"command": command, "experiment": args.experiment,
                                                        "flags": extra, "points": points, **analysis}, indent=1))
    text = table(points, analysis, seeds, command)
    (args.out / "frontier.md").write_text(text)
    plot(args.out / "frontier.png", points, what)
    print(text)
    runs.log(f"wrote {args.out / 'frontier.json'}, frontier.md, frontier.png")

  return runs.cli_main(run)


if __name__ == "__main__":
  sys.exit(main())
