"""A whole run's wall clock, fipjax against the same run in PyTorch: load, compilation, steps, checkpoints,
evaluation (#14).

    python -m benchmarks.e2e --json runs/bench-e2e.json    # 125 + 125 steps of MiniLM at 128 tokens: 57 min, 2 cores
    python -m benchmarks.e2e --stage1-steps 2 --steps 2 --n-train 32 --n-test 8 --n-val 8 --max-len 16 \\
        --buffer-size 16 --batch 4 --replay-batch 4 --checkpoint-every 1 --side torch          # CI size, PyTorch

Each side runs in a fresh process with empty caches (no compiled programs, no stage-1 network), back to back on
the same machine. Ours is ``python -m experiments.yelp_imdb --preset cpu --method naive,fip`` with the flags below
(its own run directory, stage cache and compilation cache in a temporary directory). PyTorch's is the same work
written as a PyTorch user would: transformers' ``BertForSequenceClassification`` with a 7-way head, AdamW, dropout,
``torch.save`` of the model and optimiser at the same cadence, the authors' FIP formulation (a frozen copy of the
Yelp network, Bhattacharyya distance to its softmax outputs on a replay batch, β × the batch mean), the same rows,
tokens, batches and evaluations (test after each stage, validation after stage 2).

A user running one method waits for: start-up and loading, stage 1, its evaluation, and that method's stage 2.
``ours_over_torch_run_time`` is that wall clock for naive fine-tuning, ours over PyTorch's;
``ours_fip_over_authors_fip_run_time`` the same for FIP. The breakdown splits each stage into compilation, steps,
checkpointing, path records (ours), replay-buffer outputs (ours), evaluation and the rest.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks import common

REPO = pathlib.Path(__file__).resolve().parents[1]
TARGETS = {"ours_over_torch_run_time": 0.9, "ours_fip_over_authors_fip_run_time": 0.8}
STAGES = ("stage1", "naive", "fip")
PARTS = ("compile", "steps", "checkpoint", "records", "buffers", "eval", "other")


@dataclasses.dataclass(frozen=True)
class E2EOptions:
  """``python -m benchmarks.e2e``: the run both sides make, and which sides run."""
  model: str = common.flag("minilm", "BERT checkpoint: 'minilm' (packaged), a directory or hub id")
  data_dir: str = common.flag(str(REPO.parent / "shared" / "data"), "folder holding yelp/ and imdb/")
  n_train: int = common.flag(2000, "training rows per task")
  n_test: int = common.flag(1000, "test rows per task")
  n_val: int = common.flag(200, "validation rows per task")
  max_len: int = common.flag(128, "tokens per review")
  batch: int = common.flag(16, "new-task rows per step")
  replay_batch: int = common.flag(16, "replayed rows per FIP step")
  eval_batch: int = common.flag(100, "rows per evaluation batch")
  lr: float = common.flag(5e-5, "AdamW learning rate")
  stage1_steps: int = common.flag(125, "steps on Yelp")
  steps: int = common.flag(125, "steps on IMDB, per method")
  beta: float = common.flag(16.0, "FIP weight on the replay batch's mean distance")
  buffer_size: int = common.flag(2000, "Yelp rows kept for replay")
  checkpoint_every: int = common.flag(50, "steps between checkpoints")
  seed: int = common.flag(0, "seed of batches, buffer and initialisation")
  side: str = common.flag("both", "which runs to time", choices=["both", "ours", "torch"])


PROG = "python -m benchmarks.e2e"


def parser():
  """The command line of :class:`E2EOptions` (parsed: :func:`parse_args`)."""
  return common.parser(E2EOptions, __doc__, PROG)


def parse_args(argv=None) -> tuple[E2EOptions, pathlib.Path | None]:
  return common.parse_args(E2EOptions, __doc__, PROG, argv)


def ours_argv(opts: E2EOptions, work: pathlib.Path) -> list[str]:
  """The experiment's command line for this run, everything in ``work``."""
  flags = {"model.name": opts.model, "data.dir": opts.data_dir, "data.n-train-yelp": opts.n_train,
           "data.n-train-imdb": opts.n_train, "data.n-test": opts.n_test, "data.n-val": opts.n_val,
           "data.max-len": opts.max_len, "optim.batch-size": opts.batch, "optim.lr": opts.lr,
           "stages.replay-batch-size": opts.replay_batch, "run.eval-batch-size": opts.eval_batch,
           "first.steps": opts.stage1_steps, "stages.steps": opts.steps, "fip.beta": opts.beta,
           "stages.buffer-size": opts.buffer_size, "run.checkpoint-every": opts.checkpoint_every, "seed": opts.seed}
  return ["--preset", "cpu", "--method", "naive,fip", *(w for k, v in flags.items() for w in (f"--{k}", str(v))),
          "--no-progress", "--out", str(work / "out"), "--cache-dir", str(work / "cache")]


def stage_parts(t: dict, stage: str) -> dict[str, float]:
  """One stage's seconds by kind of work, from ``Timings`` keys (each part net of the compilation inside it)."""
  net = lambda key: t.get(key, 0.0) - t.get(f"{key}/compile", 0.0)
  train = f"{stage}/train"
  parts = {"compile": t.get(f"{stage}/compile", 0.0), "checkpoint": net(f"{train}/checkpoint"),
           "records": net(f"{train}/records"), "buffers": net(f"{stage}/buffers"),
           "eval": net(f"{stage}/eval_test") + net(f"{stage}/eval_val")}
  parts["steps"] = net(train) - parts["checkpoint"] - parts["records"]
  parts["other"] = t[stage] - sum(parts.values())
  return {k: parts[k] for k in PARTS}


def summary(wall: float, t: dict) -> dict:
  """Per-stage breakdown, and the wall clock a user waits for each method alone (the run less the other
  method's stage)."""
  stages = {s: stage_parts(t, s) for s in STAGES}
  stages["stage1"]["eval"] += t.get("eval_test", 0.0) - t.get("eval_test/compile", 0.0)
  stages["stage1"]["compile"] += t.get("eval_test/compile", 0.0)
  load = wall - sum(t[s] for s in STAGES) - t.get("eval_test", 0.0)
  return {"wall_s": wall, "load_and_other_s": load, "stages": stages,
          "naive_run_s": wall - t["fip"], "fip_run_s": wall - t["naive"],
          "compile_s": sum(v["compile"] for v in stages.values())}


def run_ours(opts: E2EOptions) -> dict:
  with tempfile.TemporaryDirectory(prefix="fipjax-e2e-") as work:
    work = pathlib.Path(work)
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}   # cold: compilation counts
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "experiments.yelp_imdb", *ours_argv(opts, work)], cwd=REPO,
                          env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
      raise RuntimeError(f"the fipjax run failed ({proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    results = json.loads((work / "out" / "results.json").read_text())
  acc = {m: results["methods"][m]["accuracy_matrix"] for m in ("naive", "fip")}
  return {**summary(wall, results["timings"]), "accuracy_matrix": acc, "timings": results["timings"]}


def run_torch_child(opts: E2EOptions) -> dict:
  """The PyTorch run, in this process: ``{"timings": …, "accuracy_matrix": …}``."""
  import copy
  import torch
  import transformers
  from fipjax import data, runs
  from fipjax.models import hub
  from experiments import yelp_imdb

  t = runs.Timings()
  with t.phase("load"):
    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(opts.seed)
    cfg = yelp_imdb.parse_args(ours_argv(opts, pathlib.Path("unused")))[0]
    tasks = yelp_imdb.load_tasks(cfg, hub.load_tokenizer(opts.model), shared=True)
    model = transformers.BertForSequenceClassification.from_pretrained(
        str(hub.resolve_model_dir(opts.model)), num_labels=7)
  tensors = lambda b: (torch.from_numpy(b["inputs"]["input_ids"]).long(),
                       torch.from_numpy(b["inputs"]["attention_mask"]).long())

  def train(model, task, steps, seed, ckpt, buffer=None, frozen=None):
    with t.phase("train"):
      opt = torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=0.01)
      model.train()
      batches = data.train_batches(task.splits["train"], opts.batch, seed)
      for step in range(steps):
        b = next(batches)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(*tensors(b)).logits, torch.from_numpy(b["labels"]).long())
        if buffer is not None:
          r = tensors(buffer.sample(step, opts.replay_batch))
          p = torch.softmax(model(*r).logits, -1)
          with torch.no_grad():
            q = torch.softmax(frozen(*r).logits, -1)
          loss = loss + opts.beta * -torch.log(torch.sum(torch.sqrt(p * q + 1e-12), -1)).mean()
        loss.backward()
        opt.step()
        if not np.isfinite(loss.item()):           # a training loop logs the loss every step
          raise FloatingPointError(f"loss {loss.item()} at step {step + 1}")
        if (step + 1) % opts.checkpoint_every == 0 and step + 1 < steps:
          with t.phase("checkpoint"):
            path = ckpt / f"step_{step + 1}.pt"
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step + 1}, path)
            for old in ckpt.glob("step_*.pt"):
              if old != path:
                old.unlink()

  def evaluate(model, split):
    with t.phase(f"eval_{split}"), torch.no_grad():
      model.eval()
      row = []
      for task in tasks:
        ds, right = task.splits[split], 0
        for b, idx in data.eval_batches(ds, opts.eval_batch):
          z = model(*tensors(b)).logits[:len(idx), task.offset:task.offset + task.num_labels].numpy()
          right += int(np.sum(np.argmax(z, -1) + task.offset == ds.labels[idx]))
        row.append(right / len(ds))
      return row

  with tempfile.TemporaryDirectory(prefix="fipjax-e2e-torch-") as work:
    work = pathlib.Path(work)
    for d in ("stage1", "naive", "fip"):
      (work / d).mkdir()
    yelp, imdb = tasks
    with t.phase("stage1"):
      train(model, yelp, opts.stage1_steps, opts.seed, work / "stage1")
      torch.save(model.state_dict(), work / "stage1" / "final.pt")
    row1 = evaluate(model, "test")
    acc = {}
    for name in ("naive", "fip"):
      with t.phase(name):
        net = copy.deepcopy(model)
        buffer = frozen = None
        if name == "fip":
          frozen = copy.deepcopy(model).eval()
          train_rows = yelp.splits["train"]
          idx = np.sort(np.random.default_rng([opts.seed, 11]).choice(
              len(train_rows), size=min(opts.buffer_size, len(train_rows)), replace=False))
          buffer = data.ReplayBuffer(train_rows.take(idx), None, seed=opts.seed)
        train(net, imdb, opts.steps, opts.seed + 100, work / name, buffer, frozen)
        acc[name] = [row1, evaluate(net, "test")]
        evaluate(net, "val")
  return {"timings": dict(t), "accuracy_matrix": acc}


def run_torch(opts: E2EOptions) -> dict:
  """The PyTorch run in a fresh process (``--torch-child``, the options on its stdin), timed from its start."""
  t0 = time.perf_counter()
  proc = subprocess.run([sys.executable, "-m", "benchmarks.e2e", "--torch-child"], cwd=REPO, capture_output=True,
                        text=True, input=json.dumps(dataclasses.asdict(opts)))
  wall = time.perf_counter() - t0
  if proc.returncode:
    raise RuntimeError(f"the PyTorch run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  return {**summary(wall, out["timings"]), **out}


def run(opts: E2EOptions, out: pathlib.Path | None = None) -> dict:
  """Each side ``opts.side`` names, as a part of the result (with ``out``, written there after each part)."""
  sides = [side for side in ("ours", "torch") if opts.side in ("both", side)]
  config = {k: v for k, v in dataclasses.asdict(opts).items() if k != "side"}
  progress = common.Progress(out, sides, config={**config, "threads": os.cpu_count()})
  for side in sides:
    with progress.part(side) as r:
      r[side] = (run_ours if side == "ours" else run_torch)(opts)
      if side == "torch" and "ours" in progress.result:
        ours, torch = progress.result["ours"], r["torch"]
        r["ours_over_torch_run_time"] = ours["naive_run_s"] / torch["naive_run_s"]
        r["ours_fip_over_authors_fip_run_time"] = ours["fip_run_s"] / torch["fip_run_s"]
  return progress.result


def table(result: dict) -> str:
  sides = [s for s in ("ours", "torch") if s in result]
  rows = [f"config: {json.dumps(result['config'])}", ""]
  if "ours_over_torch_run_time" in result:
    for key, target in TARGETS.items():
      mark = "ok" if result[key] <= target else "MISSED"
      rows.append(f"{key:38s} {result[key]:6.3f}  target ≤ {target}  {mark}")
    rows.append("")
  rows.append(f"{'seconds':24s}" + "".join(f"{s:>10s}" for s in sides))
  for key in ("wall_s", "naive_run_s", "fip_run_s", "load_and_other_s", "compile_s"):
    rows.append(f"{key:24s}" + "".join(f"{result[s][key]:10.1f}" for s in sides))
  for stage in STAGES:
    rows.append(f"{stage:24s}" + "".join(f"{sum(result[s]['stages'][stage].values()):10.1f}" for s in sides))
    for part in PARTS:
      rows.append(f"  {part:22s}" + "".join(f"{result[s]['stages'][stage][part]:10.1f}" for s in sides))
  for s in sides:
    rows.append(f"{s} accuracy (yelp, imdb after stage 2): " + ", ".join(
        f"{m} {r[-1][0]:.3f} / {r[-1][1]:.3f}" for m, r in result[s]["accuracy_matrix"].items()))
  return "\n".join(rows)


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv == ["--torch-child"]:         # run_torch's fresh process: the options on stdin, the result on stdout
    print(json.dumps(run_torch_child(E2EOptions(**json.loads(sys.stdin.read())))))
    return 0
  opts, out = parse_args(argv)
  return common.cli(lambda: run(opts, out), table, out)


if __name__ == "__main__":
  sys.exit(main())
