"""BERT learns Yelp stars, then IMDB sentiment: does it keep Yelp?

    python -m experiments.yelp_imdb --method fip                  # the paper preset (bert-base, hub data, GPU)
    python -m experiments.yelp_imdb --preset cpu --method all     # offline MiniLM on ../shared/data, 2 CPU cores

Stage 1 fine-tunes the pretrained BERT on Yelp (cached by configuration and reused). Stage 2 learns IMDB from that
"Yelp network" with the chosen method(s); every method starts from the same stage-1 weights. Reports go under
``--out`` (default ``runs/<timestamp>/``): ``results.json``, ``report.md``, ``weight_change.png`` and, for FIP
methods, ``fip_path.png``. A run killed at any point resumes when started again with the same command.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import pathlib
import platform
import shutil
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from fipjax import checkpoint, continual, data, geometry, lora, parallel, paths
from fipjax import tree as tu
from fipjax.models import bert, hub

METHODS = ("naive", "lora", "fip", "fip-geodesic", "ewc", "replay", "lora-fip", "lora-fip-geodesic")
REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_LOCAL_DATA = REPO.parent / "shared" / "data"


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything that determines a run's numbers (the output location is not part of it)."""
  model: str = "bert-base-uncased"
  data_dir: str | None = None          # None: the Hugging Face hub datasets
  heads: str = "shared"                # 'shared': one 7-way head (Yelp 0–4, IMDB 5–6); 'per-task': one each
  n_train_yelp: int | None = 50_000
  n_train_imdb: int | None = None
  n_test: int | None = None            # per task
  n_val: int = 500                     # per task, held out of the training split for tuning (never the test)
  max_len: int = 512
  batch_size: int = 8
  replay_batch_size: int = 8
  eval_batch_size: int = 64
  lr: float = 2e-5
  weight_decay: float = 0.01
  stage1_epochs: float = 1.0
  epochs: float = 10.0                 # stage 2
  stage1_steps: int | None = None      # overrides stage1_epochs
  steps: int | None = None             # overrides epochs
  dropout: bool = True
  buffer_size: int = 2000
  beta: float = 8.0                    # mean-Bhattacharyya weight; the authors' sum over a batch of 8 ≈ 8
  distance: str = "bhattacharyya"
  lora_rank: int = 8
  lora_alpha: float = 16.0
  lora_lr: float = 5e-4
  ewc_strength: float = 1e6
  ewc_samples: int = 2000
  geodesic_lr: float = 2e-5
  geodesic_damping: float = 1e-2
  geodesic_cg_iters: int = 5
  geodesic_max_norm: float | None = None
  lora_geodesic_lr: float = 1.0        # lora-fip-geodesic: lr 1 and ε = 0.03, the CG direction cut to ‖dθ‖ ≤ ε
  lora_geodesic_max_norm: float | None = 0.03
  record_every: int = 50
  probe_size: int = 64
  checkpoint_every: int = 500
  dtype: str = "bfloat16"
  remat: bool = False
  seed: int = 0


PRESETS: dict[str, dict[str, Any]] = {
    # The authors' setup (bert-base-uncased, 7-way head, lr 2e-5, batch 8, 2,000-example buffer, Bhattacharyya);
    # the Yelp subset size and the single stage-1 epoch are our choices (their stage-1 schedule is not public).
    "paper": {},
    # Offline, 2 CPU cores: packaged MiniLM, ../shared/data, subsets sized for `--method all` in about 30 min.
    "cpu": dict(model="minilm", data_dir=str(DEFAULT_LOCAL_DATA), n_train_yelp=2000, n_train_imdb=2000, n_test=500,
                n_val=200, max_len=64, batch_size=16, replay_batch_size=8, eval_batch_size=100, lr=5e-5,
                stage1_steps=250, steps=150, buffer_size=500, lora_lr=1e-3, ewc_samples=200, ewc_strength=1e5,
                geodesic_lr=5e-5, geodesic_cg_iters=3, record_every=10, checkpoint_every=50, dtype="float32"),
}


class UsageError(Exception):
  """Bad input that the user can fix; printed as one paragraph, exit code 2."""


# ---------------------------------------------------------------------------------------------------------------
# Command line.


def parse_args(argv=None) -> tuple[Config, argparse.Namespace]:
  p = argparse.ArgumentParser(prog="python -m experiments.yelp_imdb", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--method", default="fip", choices=METHODS + ("all",),
                 help="stage-2 method; 'all' runs every method from the same stage-1 network")
  p.add_argument("--preset", default="paper", choices=sorted(PRESETS),
                 help="'paper' (bert-base, hub data, GPU/TPU) or 'cpu' (offline MiniLM, local data)")
  p.add_argument("--out", type=pathlib.Path, default=None, help="output directory (default runs/<timestamp>)")
  p.add_argument("--cache-dir", type=pathlib.Path, default=REPO / "runs" / "cache",
                 help="where stage-1 networks are kept for reuse")
  p.add_argument("--no-progress", action="store_true", help="no progress bars")
  p.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() (multi-host)")
  p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)   # tests: simulate a kill
  for f in dataclasses.fields(Config):
    flag = "--" + f.name.replace("_", "-")
    if f.type == "bool":
      p.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=None, metavar="BOOL")
    else:
      kind = {"int": int, "float": float}.get(f.type.split(" ")[0], str)
      p.add_argument(flag, type=_optional(kind), default=None,
                     help=f"(default: from the preset; paper: {f.default})")
  args = p.parse_args(argv)
  values = {**PRESETS[args.preset]}
  for f in dataclasses.fields(Config):
    v = getattr(args, f.name)
    if v is not None:
      values[f.name] = None if v == "none" else v
  return Config(**values), args


def _optional(kind):
  def parse(s):
    return "none" if s.lower() == "none" else kind(s)
  return parse


# ---------------------------------------------------------------------------------------------------------------
# Output directory: never overwrite results; the same command resumes an unfinished run.


def config_hash(cfg: Config) -> str:
  return hashlib.sha256(json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode()).hexdigest()[:12]


def prepare_out_dir(out: pathlib.Path | None, cfg: Config, methods: list[str]) -> tuple[pathlib.Path, bool]:
  """(run directory, resuming?)."""
  ident = {"config": dataclasses.asdict(cfg), "methods": methods}
  if out is None:
    runs = REPO / "runs"
    for run in sorted(runs.glob("*/run.json"), reverse=True):
      info = json.loads(run.read_text())
      if info.get("identity") == ident and not (run.parent / "results.json").exists():
        return run.parent, True
    out = runs / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  if (out / "results.json").exists():
    raise UsageError(f"{out} already holds the results of a finished run; results are never overwritten. Pass "
                     "another --out (or omit it for a fresh runs/<timestamp> directory).")
  if out.exists() and any(out.iterdir()):
    run = out / "run.json"
    if not run.exists() or json.loads(run.read_text()).get("identity") != ident:
      raise UsageError(f"{out} already holds files of another run (a different configuration or methods), "
                       "which would be overwritten. Pass another --out, or repeat that run's exact command to "
                       "resume it.")
    return out, True
  out.mkdir(parents=True, exist_ok=True)
  (out / "run.json").write_text(json.dumps({"identity": ident, "started": time.time()}, indent=1))
  return out, False


# ---------------------------------------------------------------------------------------------------------------
# The experiment.


class Experiment:
  """Model, data and methods for one configuration; methods share the stage-1 network."""

  def __init__(self, cfg: Config, *, progress: bool = True, cache_dir: pathlib.Path | None = None):
    self.cfg, self.progress, self.cache_dir = cfg, progress, cache_dir
    self.timings: dict[str, float] = {}
    if cfg.heads not in ("shared", "per-task"):
      raise UsageError(f"--heads must be 'shared' or 'per-task', got {cfg.heads!r}")
    if cfg.distance not in ("bhattacharyya", "kl", "squared_euclidean"):
      raise UsageError(f"--distance must be bhattacharyya, kl or squared_euclidean, got {cfg.distance!r}")
    self.mesh = parallel.data_mesh()
    try:
      for b in (cfg.batch_size, cfg.replay_batch_size, cfg.eval_batch_size):
        parallel.check_batch_size(b, self.mesh)
    except ValueError as e:
      raise UsageError(str(e)) from e
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(cfg.dtype)
    if dtype is None:
      raise UsageError(f"--dtype must be float32 or bfloat16, got {cfg.dtype!r}")
    t0 = time.perf_counter()
    heads = {"shared": 7} if cfg.heads == "shared" else {"yelp": 5, "imdb": 2}
    graphdef, params, self.bert_config, report = hub.load_bert(cfg.model, heads, dtype=dtype, remat=cfg.remat,
                                                               seed=cfg.seed)
    self.log(str(report))
    self.tokenizer = hub.load_tokenizer(cfg.model)
    self.apply = bert.make_apply(graphdef)
    self.pretrained = params
    self.offsets = {"yelp": 0, "imdb": 5} if cfg.heads == "shared" else {"yelp": 0, "imdb": 0}
    self.num_labels = {"yelp": 5, "imdb": 2}
    self.data = {}
    for task, n_train in (("yelp", cfg.n_train_yelp), ("imdb", cfg.n_train_imdb)):
      train = data.load_task(task, "train", cfg.data_dir)
      test = data.load_task(task, "test", cfg.data_dir)
      for d in (train, test):
        if d.dropped:
          self.log(f"{d.source}: dropped {d.dropped} rows with empty text")
      # Validation rows come out of the training split, chosen before the training subsample.
      order = np.random.default_rng([cfg.seed, 7]).permutation(len(train.texts))
      val_idx, train_idx = order[:cfg.n_val], order[cfg.n_val:]
      pick = lambda d, idx: dataclasses.replace(d, texts=[d.texts[i] for i in idx], labels=d.labels[idx])
      train_part = data.subsample(pick(train, np.sort(train_idx)), n_train, cfg.seed)
      enc = lambda d: data.encode(d, self.tokenizer, cfg.max_len, self.offsets[task])
      self.data[task] = {"train": enc(train_part), "val": enc(pick(train, np.sort(val_idx))),
                         "test": enc(data.subsample(test, cfg.n_test, cfg.seed))}
      self.log(f"{task}: {len(self.data[task]['train'])} train / {len(self.data[task]['val'])} val / "
               f"{len(self.data[task]['test'])} test rows, max_len {cfg.max_len}")
    self.timings["load"] = time.perf_counter() - t0
    self.train_buckets = (cfg.max_len,)      # one compiled training shape
    self._eval_fn = jax.jit(lambda p, b: self.apply(p, b))

  # -- logging -----------------------------------------------------------------------------------------------

  def log(self, msg: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {msg}", flush=True)

  # -- the model's task view -----------------------------------------------------------------------------------

  def task_logits(self, params, inputs, task: str, rng=None):
    """Logits over the labels the task is trained on: all 7 for the shared head, the task's own otherwise."""
    out = self.apply(params, inputs, deterministic=rng is None, rng=rng)
    return out["shared"] if self.cfg.heads == "shared" else out[task]

  def task_loss(self, task: str):
    def loss(params, batch, rng=None):
      logits = self.task_logits(params, batch["inputs"], task, rng if self.cfg.dropout else None)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
      return ce, {"acc": jnp.mean(jnp.argmax(logits, -1) == batch["labels"])}

    return loss

  def f_old(self, params, inputs):
    """Old-task (Yelp) outputs that FIP keeps: the whole shared head, as the authors, or the Yelp head."""
    return self.task_logits(params, inputs, "yelp")

  def trainable_heads(self, task: str) -> str:
    return r"^heads/shared/" if self.cfg.heads == "shared" else rf"^heads/{task}/"

  def all_but_other_head(self, task: str):
    other = "imdb" if task == "yelp" else "yelp"

    def mask(params):
      if self.cfg.heads == "shared":
        return jax.tree.map(lambda _: True, params)
      return jax.tree.map(lambda m: not m, tu.regex_mask(params, rf"^heads/{other}/"))

    return mask

  # -- batches ---------------------------------------------------------------------------------------------------

  def batches(self, task: str, start_step: int, seed: int, replay=None):
    cfg = self.cfg
    stream = data.train_batches(self.data[task]["train"], cfg.batch_size, seed, cfg.max_len,
                                start_step=start_step, buckets=self.train_buckets)
    step = start_step
    for b in stream:
      batch = {"new": {"inputs": data.model_inputs(b), "labels": b["labels"]}}
      if replay is not None:
        r = replay.sample(step, cfg.replay_batch_size, cfg.max_len, self.train_buckets)
        batch["replay"] = {"inputs": data.model_inputs(r), "labels": r["labels"], "ref_outputs": r["ref_outputs"]}
      step += 1
      yield parallel.shard_batch(batch, self.mesh)

  def logits_on(self, params, enc) -> dict[str, np.ndarray]:
    """Logits of every head on an encoded set, in its original order: {head: [N, K]}."""
    out = {}
    for batch, idx in data.eval_batches(enc, self.cfg.eval_batch_size, self.cfg.max_len):
      for head, z in self._eval_fn(params, parallel.shard_batch(data.model_inputs(batch), self.mesh)).items():
        out.setdefault(head, np.empty((len(enc), z.shape[-1]), np.float32))[idx] = np.asarray(z)[:len(idx)]
    return out

  def accuracy(self, params, task: str, split: str = "test") -> dict[str, float | None]:
    """Task-aware (argmax within the task's labels) and task-agnostic (argmax over the shared head) accuracy."""
    enc = self.data[task][split]
    logits = self.logits_on(params, enc)
    lo, k = self.offsets[task], self.num_labels[task]
    z = logits["shared"] if self.cfg.heads == "shared" else logits[task]
    aware = float(np.mean(np.argmax(z[:, lo:lo + k], -1) + lo == enc.labels))
    agnostic = float(np.mean(np.argmax(z, -1) == enc.labels)) if self.cfg.heads == "shared" else None
    return {"task_aware": aware, "task_agnostic": agnostic}

  def evaluate(self, params, split: str = "test") -> dict[str, dict]:
    t0 = time.perf_counter()
    res = {task: self.accuracy(params, task, split) for task in ("yelp", "imdb")}
    self.timings[f"eval_{split}"] = self.timings.get(f"eval_{split}", 0.0) + time.perf_counter() - t0
    return res

  # -- training ----------------------------------------------------------------------------------------------------

  def adamw(self, lr: float):
    return optax.adamw(lr, weight_decay=self.cfg.weight_decay)

  def _steps(self, explicit, epochs, task) -> int:
    if explicit is not None:
      return int(explicit)
    return max(1, int(epochs * len(self.data[task]["train"]) // self.cfg.batch_size))

  def run_fit(self, method, params, task: str, steps: int, ckpt_dir: pathlib.Path | None, seed: int,
              replay=None, record=None, stop_after: int | None = None):
    """`continual.fit` with progress, periodic orbax checkpoints, resume, and a FIP path record."""

    state, history, start = None, [], 0
    init_state, _ = continual.init_train_state(method, params)
    template = {"train_params": init_state.train_params, "opt_state": init_state.opt_state}
    latest = None if ckpt_dir is None else checkpoint.latest_step(ckpt_dir)
    if latest is not None:
      tree = checkpoint.restore(latest, template)
      meta = checkpoint.load_meta(latest)
      start, history = meta["step"], meta["history"]
      if record is not None:
        record.restore(meta["record"])
      state = continual.TrainState(start, tree["train_params"], tree["opt_state"])
      self.log(f"{method.name}: resuming from {latest} (step {start}/{steps})")
    bar = tqdm(total=steps, initial=start, desc=method.name, disable=not self.progress, leave=False,
               dynamic_ncols=True)

    def callback(st, row):
      history.append(row)
      bar.update(1)
      bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row.get('new_acc', float('nan')):.2f}")
      if record is not None:
        record.observe(st, row, method.to_model, record_now=st.step % self.cfg.record_every == 0 or st.step == steps)
      if ckpt_dir is not None and (st.step % self.cfg.checkpoint_every == 0) and st.step < steps:
        checkpoint.save_step(ckpt_dir, st.step, {"train_params": st.train_params, "opt_state": st.opt_state},
                             {"history": history, "record": None if record is None else record.dump()})
      if stop_after is not None and st.step >= stop_after:
        raise KeyboardInterrupt(f"stopped after step {st.step} (--stop-after)")

    rng = jax.random.PRNGKey(seed)
    params = parallel.replicate(params, self.mesh)
    try:
      final, _, _ = continual.fit(method, params, self.batches(task, start, seed, replay), steps, state=state,
                                  callback=callback, rng=rng)
    finally:
      bar.close()
    return final, history

  def stage1(self, stop_after: int | None = None):
    """The Yelp network: trained once per configuration and kept under the cache directory."""
    cfg = self.cfg
    key = {k: v for k, v in dataclasses.asdict(cfg).items() if k in STAGE1_FIELDS}
    path = None if self.cache_dir is None else self.cache_dir / ("stage1-" + hashlib.sha256(
        json.dumps(key, sort_keys=True).encode()).hexdigest()[:12])
    if path is not None and checkpoint.is_complete(path / "final"):
      self.log(f"stage 1: reusing the Yelp network in {path}")
      return checkpoint.restore(path / "final", self.pretrained), checkpoint.load_meta(path / "final")["history"]
    steps = self._steps(cfg.stage1_steps, cfg.stage1_epochs, "yelp")
    method = continual.naive(self.task_loss("yelp"), self.adamw(cfg.lr), trainable=self.all_but_other_head("yelp"))
    t0 = time.perf_counter()
    self.log(f"stage 1: fine-tuning on Yelp for {steps} steps")
    params, history = self.run_fit(method, self.pretrained, "yelp", steps,
                                   None if path is None else path / "checkpoints", cfg.seed, stop_after=stop_after)
    self.timings["stage1"] = time.perf_counter() - t0
    if path is not None:
      checkpoint.save(path / "final", params, {"history": history, "config": key})
      shutil.rmtree(path / "checkpoints", ignore_errors=True)
    return params, history

  def replay_buffer(self, params_yelp):
    """Yelp training inputs with the Yelp network's stored outputs (computed once)."""
    cfg = self.cfg
    train = self.data["yelp"]["train"]
    idx = np.sort(np.random.default_rng([cfg.seed, 11]).choice(len(train), size=min(cfg.buffer_size, len(train)),
                                                               replace=False))
    enc = train.take(idx)
    logits = self.logits_on(params_yelp, enc)
    ref = logits["shared"] if cfg.heads == "shared" else logits["yelp"]
    return data.ReplayBuffer(enc, ref.astype(np.float32), seed=cfg.seed)

  def build_method(self, name: str, params_yelp, replay):
    cfg = self.cfg
    new_loss = self.task_loss("imdb")
    common = {"trainable": self.all_but_other_head("imdb")}
    if name.startswith("lora"):
      lcfg = lora.LoraConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha)
      common = {"init": lambda p: lora.train_params(p, jax.random.PRNGKey(cfg.seed + 1), lcfg),
                "to_model": lambda tp: lora.to_model(tp, lcfg),
                "trainable": lambda tp: lora.train_mask(tp, self.trainable_heads("imdb"))}
    if name in ("naive", "lora"):
      m = continual.naive(new_loss, self.adamw(cfg.lora_lr if name == "lora" else cfg.lr), **common)
      return dataclasses.replace(m, name=name)
    if name in ("fip", "lora-fip"):
      return continual.fip(new_loss, self.f_old, self.adamw(cfg.lora_lr if name == "lora-fip" else cfg.lr),
                           distance=cfg.distance, beta=cfg.beta, name=name, **common)
    if name in ("fip-geodesic", "lora-fip-geodesic"):
      # In LoRA's subspace G is pulled back to the adapter coordinates (and the new head) through the merge.
      in_lora = name == "lora-fip-geodesic"
      return continual.fip_geodesic(new_loss, self.f_old,
                                    learning_rate=cfg.lora_geodesic_lr if in_lora else cfg.geodesic_lr,
                                    max_norm=cfg.lora_geodesic_max_norm if in_lora else cfg.geodesic_max_norm,
                                    damping=cfg.geodesic_damping, cg_iters=cfg.geodesic_cg_iters, name=name,
                                    **common)
    if name == "replay":
      old = lambda p, b, rng=None: self.task_loss("yelp")(p, b, rng)
      return continual.replay(new_loss, old, self.adamw(cfg.lr), **common)
    if name == "ewc":
      n = min(cfg.ewc_samples, len(replay.enc))
      batch = data.collate(replay.enc, np.arange(n), cfg.max_len, self.train_buckets)
      inputs = data.model_inputs(batch)
      t0 = time.perf_counter()
      yelp_logits = lambda p, x: self.task_logits(p, x, "yelp")[:, :5]
      fisher = continual.diagonal_fisher(yelp_logits, params_yelp, inputs, batch_size=4)
      self.timings["ewc_fisher"] = time.perf_counter() - t0
      self.log(f"ewc: true diagonal Fisher of the Yelp labels from {n} per-example gradients")
      return continual.ewc(new_loss, self.adamw(cfg.lr), params_yelp, fisher, strength=cfg.ewc_strength, **common)
    raise UsageError(f"unknown method {name!r}; choose one of {', '.join(METHODS)} or all")


STAGE1_FIELDS = ("model", "data_dir", "heads", "n_train_yelp", "n_val", "max_len", "batch_size", "lr",
                 "weight_decay", "stage1_epochs", "stage1_steps", "dropout", "dtype", "seed")


class PathTracker:
  """FIP path record: IMDB loss, Bhattacharyya distance to the Yelp network on a probe of the buffer, step
  lengths, and cumulative functional / Euclidean path lengths."""

  def __init__(self, exp: Experiment, replay):
    self.exp = exp
    n = min(exp.cfg.probe_size, len(replay.enc))
    b = data.collate(replay.enc, np.arange(n), exp.cfg.max_len, exp.train_buckets)
    self.inputs = data.model_inputs(b)
    self.ref = replay.ref_outputs[:n]
    self.prev = self.ref
    self.dist = geometry.get_distance(exp.cfg.distance).fn
    self.f = jax.jit(exp.f_old)
    self.record = paths.PathRecord()
    self.since_last = 0.0

  def observe(self, state, row, to_model, record_now: bool):
    """Called after every step; measures the functional distance at record steps only."""
    self.since_last += row["step_length"]
    if not record_now:
      return
    z = np.asarray(self.f(to_model(state.train_params), self.inputs))
    d_start = float(np.mean(self.dist(z, self.ref)))
    d_step = float(np.mean(self.dist(z, self.prev)))
    self.prev = z
    self.record.append(state.step, row["new_loss"], d_start, self.since_last, d_step)
    self.since_last = 0.0

  def dump(self):
    return {"rows": self.record.rows, "prev": np.asarray(self.prev).tolist(), "since_last": self.since_last}

  def restore(self, d):
    self.record.rows = d["rows"]
    self.prev = np.asarray(d["prev"], np.float32)
    self.since_last = d["since_last"]




FIP_METHODS = ("fip", "fip-geodesic", "lora-fip", "lora-fip-geodesic")


def layer_group(path: str) -> str:
  """Group parameter paths per layer for the weight-change figure."""
  parts = path.split("/")
  if parts[0] == "heads":
    return "heads"
  if parts[1] == "encoder":
    return f"layer {parts[3]}"
  return parts[1]          # embeddings, pooler


def _write_json(path: pathlib.Path, obj) -> None:
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps(obj, indent=1))
  tmp.rename(path)


def run_method(exp: Experiment, name: str, params_yelp, stage1_acc, replay, out: pathlib.Path,
               stop_after: int | None) -> dict:
  """Stage 2 for one method; its result is written to ``methods/<name>.json`` (reused when resuming)."""
  cfg = exp.cfg
  done = out / "methods" / f"{name}.json"
  if done.exists():
    exp.log(f"{name}: already finished in an earlier invocation, reusing {done}")
    return json.loads(done.read_text())
  method = exp.build_method(name, params_yelp, replay)
  tracker = PathTracker(exp, replay) if name in FIP_METHODS else None
  steps = exp._steps(cfg.steps, cfg.epochs, "imdb")
  exp.log(f"stage 2 ({name}): {steps} steps on IMDB")
  t0 = time.perf_counter()
  final, history = exp.run_fit(method, params_yelp, "imdb", steps, out / "checkpoints" / name, cfg.seed + 100,
                               replay if method.needs_replay else None, tracker, stop_after)
  train_time = time.perf_counter() - t0
  test, val = exp.evaluate(final, "test"), exp.evaluate(final, "val")
  r = np.array([[stage1_acc["yelp"]["task_aware"], stage1_acc["imdb"]["task_aware"]],
                [test["yelp"]["task_aware"], test["imdb"]["task_aware"]]])
  result = {
      "stage1": {t: stage1_acc[t]["task_aware"] for t in ("yelp", "imdb")},
      "stage2": {t: test[t]["task_aware"] for t in ("yelp", "imdb")},
      "task_agnostic": {"stage1": {t: stage1_acc[t]["task_agnostic"] for t in ("yelp", "imdb")},
                        "stage2": {t: test[t]["task_agnostic"] for t in ("yelp", "imdb")}},
      "validation": {t: val[t]["task_aware"] for t in ("yelp", "imdb")},
      "validation_task_agnostic": {t: val[t]["task_agnostic"] for t in ("yelp", "imdb")},
      "weight_change": continual.fractional_weight_change(final, params_yelp),
      "weight_change_by_layer": continual.weight_change_by_group(final, params_yelp, layer_group),
      "accuracy_matrix": r.tolist(),
      **continual.cl_metrics(r),
      "steps": steps,
      "train_time_s": train_time,
      "steps_per_s": steps / train_time,
      "final_loss": history[-1]["loss"] if history else None,
      "loss_curve": [row["loss"] for row in history],
      "path": None if tracker is None else tracker.record.as_dict(),
  }
  done.parent.mkdir(parents=True, exist_ok=True)
  _write_json(done, result)
  shutil.rmtree(out / "checkpoints" / name, ignore_errors=True)
  exp.log(f"{name}: Yelp {result['stage1']['yelp']:.3f} → {result['stage2']['yelp']:.3f}, IMDB "
          f"{result['stage1']['imdb']:.3f} → {result['stage2']['imdb']:.3f}, weight change "
          f"{result['weight_change']:.4f}")
  return result


def versions() -> dict[str, str]:
  import importlib.metadata as md
  out = {"python": platform.python_version(), "platform": platform.platform(),
         "devices": ", ".join(sorted({d.device_kind for d in jax.devices()})) + f" ×{jax.device_count()}"}
  for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "datasets", "fipjax"):
    try:
      out[pkg] = md.version(pkg)
    except md.PackageNotFoundError:
      pass
  return out


DEFINITIONS = """Definitions. R[i, j] = test accuracy on task j (1 = Yelp, 2 = IMDB) after stage i, task-aware (argmax
within the task's own labels). ACC = mean_j R[2, j]. BWT = R[2, 1] − R[1, 1] (Lopez-Paz & Ranzato, divided by
T − 1 = 1). Forgetting = max_{l<2} R[l, 1] − R[2, 1] (Chaudhry et al.). Task-agnostic accuracy = argmax over all
seven labels of the shared head. Weight change = ‖θ_final − θ_Yelp‖_F / ‖θ_Yelp‖_F over all parameters (LoRA on
merged weights)."""


def write_report(out: pathlib.Path, results: dict) -> str:
  """report.md (tables) and the figures; returns the markdown."""
  methods = results["methods"]
  lines = [f"# Yelp → IMDB, seed {results['seed']}", "", f"Command: `{results['command']}`", "",
           "## Table 1: test accuracy (task-aware)", "",
           "| method | Yelp after stage 1 | IMDB after stage 1 | Yelp after stage 2 | IMDB after stage 2 |",
           "|---|---|---|---|---|"]
  for name, m in methods.items():
    lines.append(f"| {name} | {m['stage1']['yelp']:.3f} | {m['stage1']['imdb']:.3f} | {m['stage2']['yelp']:.3f} "
                 f"| {m['stage2']['imdb']:.3f} |")
  lines += ["", "## Table 2: change from the Yelp network to the final network", "",
            "| method | Δ Yelp | Δ IMDB | weight change | ACC | BWT | forgetting | Yelp / IMDB task-agnostic |",
            "|---|---|---|---|---|---|---|---|"]
  for name, m in methods.items():
    ag = m["task_agnostic"]["stage2"]
    agn = "n/a" if ag["yelp"] is None else f"{ag['yelp']:.3f} / {ag['imdb']:.3f}"
    lines.append(f"| {name} | {m['stage2']['yelp'] - m['stage1']['yelp']:+.3f} | "
                 f"{m['stage2']['imdb'] - m['stage1']['imdb']:+.3f} | {m['weight_change']:.4f} | "
                 f"{m['average_accuracy']:.3f} | {m['backward_transfer']:+.3f} | {m['forgetting']:.3f} | {agn} |")
  lines += ["", DEFINITIONS, "", "Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in results["timings"].items()),
            "", "![weight change](weight_change.png)"]
  if any(m.get("path") for m in methods.values()):
    lines.append("![FIP path](fip_path.png)")
  text = "\n".join(lines) + "\n"
  (out / "report.md").write_text(text)
  plot_figures(out, methods)
  return text


def plot_figures(out: pathlib.Path, methods: dict) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [1, 2]})
  names = list(methods)
  ax0.bar(names, [methods[n]["weight_change"] for n in names], color="tab:blue")
  ax0.set_ylabel("‖θ_final − θ_Yelp‖ / ‖θ_Yelp‖")
  ax0.set_title("fractional weight change")
  ax0.tick_params(axis="x", rotation=45)
  groups = list(next(iter(methods.values()))["weight_change_by_layer"])
  for n in names:
    ax1.plot(groups, [methods[n]["weight_change_by_layer"][g] for g in groups], "o-", label=n)
  ax1.set_yscale("log")
  ax1.set_title("per layer")
  ax1.tick_params(axis="x", rotation=45)
  ax1.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out / "weight_change.png", dpi=110)
  plt.close(fig)
  fip = {n: m["path"] for n, m in methods.items() if m.get("path")}
  if fip:
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
    for n, p in fip.items():
      ax0.plot(p["step"], p["functional_distance"], "o-", ms=3, label=n)
      ax1.plot(p["step"], p["new_loss"], "o-", ms=3, label=n)
    ax0.set_xlabel("stage-2 step")
    ax0.set_ylabel("Bhattacharyya distance to the Yelp network\n(probe of the Yelp buffer)")
    ax1.set_xlabel("stage-2 step")
    ax1.set_ylabel("IMDB training loss")
    ax0.legend()
    fig.tight_layout()
    fig.savefig(out / "fip_path.png", dpi=110)
    plt.close(fig)


def run(cfg: Config, args, argv) -> dict:
  methods = list(METHODS) if args.method == "all" else [args.method]
  out, resuming = prepare_out_dir(args.out, cfg, methods)
  exp = Experiment(cfg, progress=not args.no_progress, cache_dir=args.cache_dir)
  exp.log(f"{'resuming' if resuming else 'writing'} {out}; devices: {jax.device_count()} "
          f"({jax.devices()[0].device_kind})")
  params_yelp, _ = exp.stage1(stop_after=args.stop_after)
  stage1_acc = exp.evaluate(params_yelp)
  exp.log(f"stage 1: Yelp {stage1_acc['yelp']['task_aware']:.3f}, IMDB {stage1_acc['imdb']['task_aware']:.3f}")
  replay = exp.replay_buffer(params_yelp)
  results = {"config": dataclasses.asdict(cfg), "seed": cfg.seed, "command": " ".join(
      ["python -m experiments.yelp_imdb"] + list(argv if argv is not None else sys.argv[1:])),
             "versions": versions(), "methods": {}}
  for name in methods:
    results["methods"][name] = run_method(exp, name, params_yelp, stage1_acc, replay, out, args.stop_after)
    exp.timings[f"stage2_{name}"] = results["methods"][name]["train_time_s"]
  results["timings"] = exp.timings
  text = write_report(out, results)
  _write_json(out / "results.json", results)
  print(text)
  exp.log(f"wrote {out / 'results.json'}, {out / 'report.md'}")
  return results


def main(argv=None) -> int:
  try:
    cfg, args = parse_args(argv)
    if args.distributed:
      parallel.initialize_distributed()
    run(cfg, args, argv)
  except (UsageError, data.DataError, hub.CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt as e:
    print(f"interrupted ({e}); run the same command again to resume from the last checkpoint", file=sys.stderr)
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
