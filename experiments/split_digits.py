"""Split digits: a continual-learning check that runs in seconds on real data (scikit-learn's ``load_digits``).

Task A = digits 0–4, task B = digits 5–9 (``--tasks 3``: 0–3, 4–6, 7–9); a shared MLP trunk with one head per
task. Learn the tasks in order with the chosen method and report the accuracy matrix ``R[i, j]``.

    python -m experiments.split_digits --method fip --out runs/digits_fip
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from experiments import frontier
from fipjax import config as cf
from fipjax import continual, data, experiment, runs, streams

SPLITS = {2: ((0, 5), (5, 10)), 3: ((0, 4), (4, 7), (7, 10))}
METHODS = continual.method_names(())


@dataclasses.dataclass(frozen=True)
class Config(streams.StreamConfig):
  tasks: int = cf.option(2, "how many tasks the ten digits are split into", cf.one_of(2, 3))
  hidden: int = cf.option(64, "MLP width", cf.positive)


PRESETS = {"default": cf.with_values(Config(), {
    "optim.lr": 3e-3, "optim.weight_decay": 0.0, "optim.batch_size": 32, "optim.dropout": False, "first.steps": 300,
    "stages.steps": 300, "stages.replay_batch_size": 32, "stages.buffer_size": 400, "fip.beta": 100.0,
    "geodesic.form": "gradient", "geodesic.lr": 0.05, "geodesic.damping": 1e-2, "geodesic.cg_iters": 10,
    "geodesic.max_norm": 1.0, "ewc.strength": 100.0, "ewc.samples": 400, "run.eval_batch_size": 50,
    "run.record_every": 50, "run.probe_size": 64, "bir.generator.steps": 500})}


def digit_tasks(seed: int, splits) -> list[streams.TaskSpec]:
  """One task per digit range, labels within the task, 30% of each held out for test."""
  digits = load_digits()
  x, y = (digits.data / 16.0).astype(np.float32), digits.target
  tasks = []
  for i, (lo, hi) in enumerate(splits):
    keep = (y >= lo) & (y < hi)
    xtr, xte, ytr, yte = train_test_split(x[keep], y[keep] - lo, test_size=0.3, random_state=seed,
                                          stratify=y[keep])
    name = "ABC"[i]
    tasks.append(streams.TaskSpec(name, {"train": data.Arrays(xtr, ytr.astype(np.int32)),
                                         "test": data.Arrays(xte, yte.astype(np.int32))}, hi - lo, head=name))
  return tasks


def mlp(key, tasks, hidden: int):
  """(apply, params, split): a two-layer ReLU trunk and one linear head per task (``head_<name>``), split after
  the first layer (brain-inspired replay generates its activations)."""
  ks = iter(jax.random.split(key, 2 + len(tasks)))
  dense = lambda a, b: {"kernel": jax.random.normal(next(ks), (a, b)) * jnp.sqrt(2.0 / a), "bias": jnp.zeros((b,))}
  params = {"trunk": {"l0": dense(64, hidden), "l1": dense(hidden, hidden)},
            **{f"head_{t.name}": dense(hidden, t.num_labels) for t in tasks}}

  layer = lambda h, d: h @ d["kernel"] + d["bias"]

  def features(p, x, *, deterministic=True, rng=None):
    return jax.nn.relu(layer(x, p["trunk"]["l0"]))

  def readout(p, h, *, deterministic=True, rng=None):
    h = jax.nn.relu(layer(h, p["trunk"]["l1"]))
    return {t.name: layer(h, p[f"head_{t.name}"]) for t in tasks}

  def apply(p, x, *, deterministic=True, rng=None):
    return readout(p, features(p, x))

  return apply, params, (features, readout, r"^trunk/l0/")


def build(cfg: Config, cache_dir=None, progress=False, stop_after=None):
  tasks = digit_tasks(cfg.seed, SPLITS[cfg.tasks])
  apply, params, split = mlp(jax.random.PRNGKey(cfg.seed), tasks, cfg.hidden)
  stream = streams.Stream(apply, tuple(tasks), head_params=lambda h: rf"^head_{h}/", split=split)
  runner = streams.Runner(stream, **cfg.runner_args(), model_key={"mlp": cfg.hidden, "tasks": cfg.tasks},
                          cache=None if cache_dir is None else runs.StageCache(cache_dir), progress=progress,
                          stop_after=stop_after)
  return runner, params


def parse_args(argv=None):
  p = cf.ArgumentParser(prog="python -m experiments.split_digits", description=__doc__,
                        formatter_class=cf.argparse.RawDescriptionHelpFormatter)
  p.add_argument("--method", default="fip", type=continual.method_argument,
                 help=f"{', '.join(METHODS)}, any lora-<method>, several comma-separated, or 'all' "
                      "(every method above)")
  p.add_argument("--preset", default="default", choices=sorted(PRESETS), help=cf.argparse.SUPPRESS)
  p.add_argument("--frontier", action="store_true", help=frontier.FLAG_HELP)
  p.add_argument("--out", type=pathlib.Path, required=True, help="output directory (never overwritten)")
  p.add_argument("--distributed", action="store_true", help=experiment.DISTRIBUTED_HELP)
  return cf.parse(p, PRESETS, argv)


def main(argv=None) -> int:
  cfg, args = parse_args(argv)
  if args.frontier:
    return frontier.from_experiment("split_digits", argv, cfg, continual.method_list(args.method, METHODS), args.out,
                                    args.out.parent)
  return experiment.experiment_main("experiments.split_digits", argv, cfg, args,
                                    continual.method_list(args.method, METHODS), lambda: build(cfg),
                                    title="Split digits", runs_root=args.out.parent)


if __name__ == "__main__":
  sys.exit(main())
