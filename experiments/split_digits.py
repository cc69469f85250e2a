"""Split digits: a continual-learning check that runs in seconds on real data (scikit-learn's ``load_digits``).

Task A = digits 0–4, task B = digits 5–9; a shared MLP trunk with one head per task. Train A, then B with the
chosen method, and report the accuracy matrix ``R[i, j]`` (row i: after task i; column j: task j test accuracy).

    python -m experiments.split_digits --method fip --out runs/digits_fip.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from fipjax import continual, paths

METHODS = ("naive", "fip", "fip-geodesic", "replay", "ewc")


def load_tasks(seed: int):
  """{'A': (x_train, y_train, x_test, y_test), 'B': ...}, labels within the task (0–4)."""
  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  y = digits.target
  tasks = {}
  for name, lo in (("A", 0), ("B", 5)):
    keep = (y >= lo) & (y < lo + 5)
    xtr, xte, ytr, yte = train_test_split(x[keep], y[keep] - lo, test_size=0.3, random_state=seed,
                                          stratify=y[keep])
    tasks[name] = (xtr, ytr.astype(np.int32), xte, yte.astype(np.int32))
  return tasks


def init_params(key, hidden: int = 64):
  ks = jax.random.split(key, 4)
  dense = lambda k, a, b: {"kernel": jax.random.normal(k, (a, b)) * jnp.sqrt(2.0 / a), "bias": jnp.zeros((b,))}
  return {"trunk": {"l0": dense(ks[0], 64, hidden), "l1": dense(ks[1], hidden, hidden)},
          "head_A": dense(ks[2], hidden, 5), "head_B": dense(ks[3], hidden, 5)}


def features(params, x):
  h = jax.nn.relu(x @ params["trunk"]["l0"]["kernel"] + params["trunk"]["l0"]["bias"])
  return jax.nn.relu(h @ params["trunk"]["l1"]["kernel"] + params["trunk"]["l1"]["bias"])


def logits(params, x, task: str):
  head = params[f"head_{task}"]
  return features(params, x) @ head["kernel"] + head["bias"]


def task_loss(task: str):
  def loss(params, batch, rng=None):
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(logits(params, x, task), y).mean()
  return loss


def accuracy(params, x, y, task: str) -> float:
  return float(jnp.mean(jnp.argmax(logits(params, x, task), -1) == y))


def batches(x, y, batch_size: int, seed: int, replay=None):
  """Endless shuffled batches {'new': (x, y)[, 'replay': {...}]}; replay draws from the buffer independently."""
  rng = np.random.default_rng(seed)
  while True:
    order = rng.permutation(len(x))
    for i in range(0, len(x) - batch_size + 1, batch_size):
      idx = order[i:i + batch_size]
      batch = {"new": (x[idx], y[idx])}
      if replay is not None:
        j = rng.choice(len(replay["inputs"]), size=batch_size, replace=False)
        batch["replay"] = {k: v[j] for k, v in replay.items()}
      yield batch


def trainable_for_b(params):
  """Stage B trains the trunk and the new head; the old head is not the new task's to change."""
  return {"trunk": jax.tree.map(lambda _: True, params["trunk"]),
          "head_A": jax.tree.map(lambda _: False, params["head_A"]),
          "head_B": jax.tree.map(lambda _: True, params["head_B"])}


def build_method(name: str, params_a, replay_buffer, args) -> continual.Method:
  new_loss = task_loss("B")
  f_old = lambda p, x: logits(p, x, "A")
  adam = optax.adam(args.lr)
  common = {"trainable": trainable_for_b}
  if name == "naive":
    return continual.naive(new_loss, adam, **common)
  if name == "fip":
    return continual.fip(new_loss, f_old, adam, distance="bhattacharyya", beta=args.beta, **common)
  if name == "fip-geodesic":
    return continual.fip_geodesic(new_loss, f_old, learning_rate=args.geodesic_lr, damping=args.damping,
                                  cg_iters=args.cg_iters, max_norm=args.max_norm, **common)
  if name == "replay":
    old = lambda p, batch, rng=None: task_loss("A")(p, (batch["inputs"], batch["labels"]))
    return continual.replay(new_loss, old, adam, **common)
  if name == "ewc":
    fisher = continual.diagonal_fisher(f_old, params_a, replay_buffer["inputs"], batch_size=64)
    return continual.ewc(new_loss, adam, params_a, fisher, strength=args.ewc_strength, **common)
  raise ValueError(f"unknown method {name!r}; choose one of {METHODS}")


def run(args) -> dict:
  tasks = load_tasks(args.seed)
  xa, ya, xa_te, ya_te = tasks["A"]
  xb, yb, xb_te, yb_te = tasks["B"]
  params0 = init_params(jax.random.PRNGKey(args.seed))
  stage_a = continual.naive(task_loss("A"), optax.adam(args.lr),
                            trainable=lambda p: {**jax.tree.map(lambda _: True, p),
                                                 "head_B": jax.tree.map(lambda _: False, p["head_B"])})
  params_a, _, _ = continual.fit(stage_a, params0, batches(xa, ya, args.batch_size, args.seed), args.steps)
  row_a = [accuracy(params_a, xa_te, ya_te, "A"), accuracy(params_a, xb_te, yb_te, "B")]

  rng = np.random.default_rng(args.seed + 1)
  idx = rng.choice(len(xa), size=min(args.buffer_size, len(xa)), replace=False)
  replay_buffer = {"inputs": xa[idx], "labels": ya[idx]}
  replay_buffer["ref_outputs"] = np.asarray(paths.reference_outputs(lambda p, x: logits(p, x, "A"), params_a,
                                                                    replay_buffer["inputs"]))
  method = build_method(args.method, params_a, replay_buffer, args)
  data_b = batches(xb, yb, args.batch_size, args.seed + 2, replay_buffer if method.needs_replay else None)
  steps_b = args.geodesic_steps if args.method == "fip-geodesic" else args.steps
  params_b, _, history = continual.fit(method, params_a, data_b, steps_b)
  row_b = [accuracy(params_b, xa_te, ya_te, "A"), accuracy(params_b, xb_te, yb_te, "B")]
  r = np.array([row_a, row_b])
  return {"method": args.method, "seed": args.seed, "accuracy": r.tolist(), **continual.cl_metrics(r),
          "final_loss": history[-1]["loss"], "config": vars(args)}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--method", default="fip", choices=METHODS)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--steps", type=int, default=300, help="Adam steps per task (default 300)")
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--lr", type=float, default=3e-3)
  p.add_argument("--beta", type=float, default=100.0, help="FIP penalty weight (mean Bhattacharyya)")
  p.add_argument("--buffer-size", type=int, default=400, help="task-A replay inputs")
  p.add_argument("--geodesic-lr", type=float, default=0.05)
  p.add_argument("--geodesic-steps", type=int, default=300)
  p.add_argument("--damping", type=float, default=1e-2)
  p.add_argument("--cg-iters", type=int, default=10)
  p.add_argument("--max-norm", type=float, default=1.0, help="bound on the preconditioned direction norm")
  p.add_argument("--ewc-strength", type=float, default=100.0)
  p.add_argument("--out", type=pathlib.Path, default=None, help="write the result as JSON here")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.out is not None and args.out.exists():
    print(f"error: {args.out} already exists; choose another --out or remove it (results are never "
          "overwritten)", file=sys.stderr)
    return 2
  result = run(args)
  r = result["accuracy"]
  print(f"method={result['method']} seed={result['seed']}")
  print("                task A   task B")
  print(f"after task A    {r[0][0]:6.3f}   {r[0][1]:6.3f}")
  print(f"after task B    {r[1][0]:6.3f}   {r[1][1]:6.3f}")
  print(f"ACC={result['average_accuracy']:.3f} BWT={result['backward_transfer']:+.3f} "
        f"forgetting={result['forgetting']:.3f}")
  if args.out is not None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**result, "config": {k: str(v) for k, v in result["config"].items()}},
                                   indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
