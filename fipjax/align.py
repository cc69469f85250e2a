"""Align your own causal LM on your own preference data, month after month, without losing earlier months.

    python -m fipjax.align --model smollm2 --method lora-fip-dpo --round m1=m1.jsonl --round m2=m2.jsonl \\
        --max-steps 4 --out runs/align
    python -m fipjax.align --model smollm2 --method lora-fip-dpo --resume-from runs/align \\
        --round m3=m3.jsonl --max-steps 4 --out runs/align-m3

Each ``--round NAME=PATH`` is a month of preference pairs in TRL's standard or conversational format (JSON Lines;
a seeded ``--test-fraction`` held out as the month's test pairs, or a directory with ``train.jsonl`` and
``test.jsonl``; see :mod:`fipjax.preferences`). The months are learnt in order: the first by DPO (in LoRA for LoRA
methods), every later one by ``--method`` from the policy the previous month left, DPO's reference being that
policy (its log-probabilities stored with the pairs: no reference model is kept). After every month each month's
test pairs are scored (preference accuracy by the implicit reward, mean reward margin, chosen log-probability:
the matrices of results.json), and the policy is exported for serving under ``OUT/export/<month>/`` (a Hugging
Face directory that transformers' ``AutoModelForCausalLM`` loads, tokenizer and chat template included).

``--resume-from DIR`` continues a finished run: its final policy and what later months need of the earlier ones
(their pairs with reference log-probabilities, their test pairs) are one folder, ``DIR/state``; the new months
are appended and every month is evaluated. TRL's DPOConfig names mean what they mean in TRL (``--beta`` is DPO's
β); FIP's own knobs are ``--fip.*`` (docs/align.md maps every DPOConfig field).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from fipjax import (alignment, checkpoint, continual, experiment, export, parallel, precision, preferences, rewards,
                    runs, streams)
from fipjax import config as cf
from fipjax import models

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
PAIRS = ("file", "on-policy")
ON_POLICY_NEW_TOKENS = 64       # TRL OnlineDPOConfig's max_new_tokens
PEFT_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class FipSettings:
  """FIP (fip-dpo, lora-fip-dpo): the earlier months' token distributions held on a buffer of their pairs."""
  beta: float = cf.option(16.0, "penalty weight on the mean distance to the stored distributions (not DPO's β)",
                          cf.non_negative)
  distance: str = cf.option("bhattacharyya", "distance between token distributions", cf.one_of("bhattacharyya", "kl"))
  top_k: int = cf.option(32, "stored reference tokens per position (the tail's mass kept as one bucket)", cf.positive)
  anchor: str = cf.option("chosen", "sequences the penalty holds: the buffered pairs' chosen completions, or "
                          "'policy': completions sampled from the policy entering the month",
                          cf.one_of(*alignment.ANCHORS))


@dataclasses.dataclass(frozen=True)
class ReplaySettings:
  """The earlier months' buffers (replay-dpo replays their pairs; FIP holds their distributions on them)."""
  buffer_size: int = cf.option(256, "pairs kept per earlier month", cf.positive)
  batch_size: int = cf.option(4, "pairs per earlier month in each step", cf.positive)


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """Evaluation, checkpoints and records."""
  batch_size: int = cf.option(8, "pairs per evaluation call", cf.positive)
  checkpoint_every: int = cf.option(50, "steps between checkpoints (a killed run resumes from the last)",
                                    cf.positive)
  record_every: int = cf.option(10, "steps between records of the earlier months' drift", cf.positive)
  probe_size: int = cf.option(16, "buffered pairs per earlier month on which the drift is recorded", cf.positive)
  samples: int = cf.option(1, "completions sampled per test prompt for a month's reward (their mean; the same keys "
                           "for every policy)", cf.positive)


@dataclasses.dataclass(frozen=True)
class AlignConfig:
  """Everything that determines a run's numbers: TRL DPOConfig's and PEFT's names at the top, FIP's in sections."""
  beta: float = cf.option(0.1, "DPO's β, the implicit reward's scale (TRL's beta)", cf.positive)
  loss_type: str = cf.option("sigmoid", "sigmoid (DPO), ipo, hinge or robust (TRL's loss_type)",
                             cf.one_of(*alignment.dpo.KINDS))
  label_smoothing: float = cf.option(0.0, "probability ε that a preference label is flipped (conservative / "
                                     "robust DPO)", cf.interval(0, 0.5))
  rpo_alpha: float | None = cf.option(None, "weight of RPO's NLL term on the chosen completions (none: off)",
                                      cf.non_negative)
  learning_rate: float = cf.option(1e-6, "AdamW's peak learning rate (TRL's default)", cf.positive)
  lr_scheduler_type: str = cf.option("linear", "schedule after the warm-up, over each month's steps",
                                     cf.one_of(*continual.SCHEDULES))
  warmup_ratio: float = cf.option(0.0, "share of each month's steps spent warming the learning rate up from 0",
                                  cf.interval(0, 1))
  weight_decay: float = cf.option(0.0, "AdamW's weight decay", cf.non_negative)
  max_grad_norm: float | None = cf.option(1.0, "clip gradients to this global norm (none: no clipping)", cf.positive)
  per_device_train_batch_size: int = cf.option(8, "pairs per batch", cf.positive)
  gradient_accumulation_steps: int = cf.option(1, "batches averaged into one optimiser step", cf.positive)
  gradient_checkpointing: bool = cf.option(False, "recompute each decoder layer's activations in the backward pass "
                                           "(less memory, about one more forward pass)")
  max_steps: int | None = cf.option(None, "optimiser steps per month (overrides --num-train-epochs)", cf.positive)
  num_train_epochs: float = cf.option(1.0, "epochs over each month's training pairs", cf.positive)
  max_prompt_length: int = cf.option(512, "prompt tokens kept (a longer prompt loses its start)", cf.positive)
  max_length: int = cf.option(1024, "prompt + completion tokens kept (a longer completion loses its end)",
                              cf.positive)
  max_new_tokens: int | None = cf.option(None, "tokens of a sampled completion (on-policy pairs, --reward's "
                                         "evaluation, --fip.anchor policy), at least the longest file completion "
                                         "(none: that; 64 with --pairs on-policy; TRL OnlineDPOConfig's name)",
                                         cf.positive)
  temperature: float = cf.option(1.0, "sampling temperature of sampled completions (TRL OnlineDPOConfig's name)",
                                 cf.positive)
  lora_r: int = cf.option(8, "LoRA rank (PEFT's r), for lora-* methods", cf.positive)
  lora_alpha: float = cf.option(16.0, "LoRA α: adapters scaled by α / r (PEFT's lora_alpha)", cf.positive)
  lora_target_modules: str = cf.option("q_proj,v_proj", "comma-separated module names LoRA adapts, or all-linear "
                                       "(PEFT's target_modules)")
  seed: int = cf.option(42, "seed of the test split, batches, adapters and sampling", cf.non_negative)
  fip: FipSettings = cf.section(FipSettings)
  replay: ReplaySettings = cf.section(ReplaySettings)
  geodesic: continual.GeodesicConfig = cf.section(continual.GeodesicConfig)
  interp: continual.InterpConfig = cf.section(continual.InterpConfig)
  eval: EvalSettings = cf.section(EvalSettings)


# The geodesic form of fip-geodesic-dpo: the adam form's corrector needs stored logits (top-k references here).
PRESETS = {"default": cf.with_values(AlignConfig(), {"geodesic.form": "gradient", "geodesic.cg_iters": 5})}


def lora_targets(modules: str) -> str:
  """PEFT's ``target_modules`` (names, or ``all-linear``) as the regex of the decoder's kernels LoRA adapts."""
  names = PEFT_MODULES if modules.strip() == "all-linear" else [m.strip() for m in modules.split(",") if m.strip()]
  unknown = sorted(set(names) - set(PEFT_MODULES))
  if unknown or not names:
    raise runs.UsageError(f"--lora-target-modules {modules!r}: {', '.join(unknown) or 'no module'} is not a linear "
                          f"module of the decoder; choose among {', '.join(PEFT_MODULES)}, or all-linear.")
  return rf"(^|/)({'|'.join(names)})/kernel$"


def sections(cfg: AlignConfig, widths: tuple[int, int], rows_per_month: int) -> dict:
  """The stage loop's configuration sections and the preference section from the TRL-named values."""
  k = cfg.gradient_accumulation_steps
  optim = continual.OptimConfig(lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                batch_size=cfg.per_device_train_batch_size, dropout=False,
                                schedule=cfg.lr_scheduler_type, warmup_ratio=cfg.warmup_ratio,
                                max_grad_norm=cfg.max_grad_norm, gradient_accumulation_steps=k)
  steps = None if cfg.max_steps is None else cfg.max_steps * k
  hp = dataclasses.replace(
      continual.MethodConfig(), fip=continual.FipConfig(beta=cfg.fip.beta, distance=cfg.fip.distance),
      geodesic=cfg.geodesic, interp=cfg.interp, lora=continual.LoraSettings(
          targets=lora_targets(cfg.lora_target_modules), rank=cfg.lora_r, alpha=cfg.lora_alpha,
          optim=continual.LoraOptim(lr=cfg.learning_rate),
          geodesic=continual.LoraGeodesic(kappa=None, lr=None, max_norm=None)))
  pref = alignment.PreferenceConfig(beta=cfg.beta, loss=cfg.loss_type, label_smoothing=cfg.label_smoothing,
                                    rpo_alpha=cfg.rpo_alpha, prompt_tokens=widths[0], response_tokens=widths[1],
                                    top_k=cfg.fip.top_k, generate_batch_size=cfg.eval.batch_size,
                                    anchor=cfg.fip.anchor, temperature=cfg.temperature,
                                    eval_samples=cfg.eval.samples)
  return dict(
      optim=optim, first=streams.FirstStageConfig(steps=steps, epochs=cfg.num_train_epochs),
      stages=streams.StageConfig(steps=steps, epochs=cfg.num_train_epochs,
                                 replay_batch_size=min(cfg.replay.batch_size, rows_per_month),
                                 buffer_size=cfg.replay.buffer_size),
      hp=hp, run=streams.RunConfig(eval_batch_size=cfg.eval.batch_size, checkpoint_every=cfg.eval.checkpoint_every,
                                   record_every=cfg.eval.record_every, probe_size=cfg.eval.probe_size),
      seed=cfg.seed, pref=pref)


# ---------------------------------------------------------------------------------------------------------------
# A month's stored state.

STATE = "state"


def save_state(out: pathlib.Path, params, memory: dict, held_out: dict, meta: dict,
               lora: tuple[Any, str] | None = None) -> int:
  """``OUT/state``: the final policy, each month's buffered training pairs and test pairs with their reference
  log-probabilities, and ``meta``; returns its size in bytes. With ``lora`` = (the base model's parameters, the LoRA
  targets) the policy is kept as the low-rank change of each target kernel from the base (every month's adapters
  together, :func:`fipjax.export.kernel_deltas`): megabytes instead of the whole model."""
  path = out / STATE
  keep = ("chosen", "rejected", "ref_chosen", "ref_rejected", "reward_chosen", "reward_rejected")
  pairs = {n: {k: np.asarray(v[k]) if not isinstance(v[k], dict) else {a: np.asarray(b) for a, b in v[k].items()}
               for k in keep} for n, v in memory.items()}
  tests = {n: {k: v[k] for k in keep} for n, v in held_out.items()}
  policy = {"params": params}
  if lora is not None:
    deltas, _ = export.kernel_deltas(lora[0], params, lora[1])
    policy = {"deltas": {p: {"a": a.astype(np.float32), "b": b.astype(np.float32)} for p, (a, b) in deltas.items()}}
  checkpoint.save(path, {**policy, "pairs": pairs, "test": tests}, meta, keep_structure=True)
  return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def stored_policy(tree: dict, base_params) -> Any:
  """The policy of a stored state: its parameters, or the base model's moved by its stored low-rank changes."""
  if "params" in tree:
    return tree["params"]
  return export.apply_deltas(base_params, {p: (d["a"], d["b"]) for p, d in tree["deltas"].items()})


def load_state(path: pathlib.Path, model: str, param_dtype: str) -> tuple[Any, dict]:
  """(the tree, the metadata) of a finished run's ``state``; a one-paragraph error for anything else (another
  model, or its weights stored in another dtype: a LoRA state's changes apply to the base as that run rounded it)."""
  state = pathlib.Path(path) / STATE
  if not (pathlib.Path(path) / "results.json").exists() or not checkpoint.is_complete(state):
    raise runs.UsageError(f"--resume-from {path} is not a finished fipjax.align run (no results.json and {STATE}/); "
                          "finish it first (repeat its command), or pass the --out of a finished run.")
  meta = checkpoint.load_meta(state)
  if meta.get("model") != str(model):
    raise runs.UsageError(f"--resume-from {path} aligned --model {meta.get('model')!r}, not {model!r}; a later month "
                          "continues the same model: pass --model as that run did.")
  if meta.get("param_dtype", "auto") != param_dtype:
    raise runs.UsageError(f"--resume-from {path} stored the model's weights as --param-dtype "
                          f"{meta.get('param_dtype', 'auto')}, not {param_dtype}; a later month continues the same "
                          "weights: pass --param-dtype as that run did.")
  return checkpoint.restore_tree(state), meta


# ---------------------------------------------------------------------------------------------------------------
# The run.


class MonthlyRunner(alignment.AlignmentRunner):
  """The alignment runner of one tool run: months learnt from a base model, or continued from a stored state;
  each month's policy exported, the final state stored."""
  batch_flag = "--per-device-train-batch-size"
  buffer_flags = ("--replay.buffer-size", "--replay.batch-size")

  def __init__(self, *args, out: pathlib.Path, resumed: tuple | None, export_fn, state_meta: dict,
               lora_state: tuple[Any, str] | None, **kw):
    super().__init__(*args, **kw)
    self.out, self.resumed, self.export_fn, self.state_meta = out, resumed, export_fn, state_meta
    self.lora_state = lora_state
    if resumed is not None:
      self.first_stages = len(resumed[1])

  def first_stage(self, base_params):
    if self.resumed is None:
      first = super().first_stage(base_params)
      self.export_fn(self.rounds[0].name, first[0])
      return first
    self.remember_base(base_params)
    params, memory, rows, held_out = self.resumed
    t = len(self.rounds)        # the earlier rows gain a column (None: not yet entered) for every new month
    widen = lambda v: v + [None] * (t - len(v)) if isinstance(v, list) else v
    return params, memory, [{k: widen(v) for k, v in row.items()} for row in rows], held_out

  def stage(self, name, k, state, ckpt_dir):
    super().stage(name, k, state, ckpt_dir)
    self.export_fn(self.rounds[k].name, state.params)

  def result(self, name, state):
    result = super().result(name, state)
    size = save_state(self.out, state.params, state.memory, state.scratch["held_out"],
                      {**self.state_meta, "rows": state.log["rows"], "rounds": list(self.stage_names)},
                      lora=self.lora_state)
    runs.log(f"stored state of the run: {size / 2**20:.1f} MiB in {self.out / STATE}")
    return {**result, "stored_state_bytes": size}


def parse_args(argv=None):
  p = cf.ArgumentParser(prog="python -m fipjax.align", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", required=True, help="causal LM: Hugging Face directory or hub id, .gguf file, or "
                 "'smollm2' (the packaged SmolLM2-135M-Instruct)")
  p.add_argument("--round", action="append", default=[], metavar="NAME=PATH", dest="rounds",
                 help="a month of preference pairs, in order (repeat the flag): a JSON Lines file or a directory with "
                      "train.jsonl and test.jsonl")
  p.add_argument("--method", default="lora-fip-dpo", type=lambda v: continual.method_argument(v, on_preferences=True),
                 help="dpo, lora-dpo, replay-dpo, fip-dpo, lora-fip-dpo, fip-geodesic-dpo, lora-fip-geodesic-dpo, "
                      "interp-dpo (--interp.alpha) (any registry method as <method>-dpo)")
  p.add_argument("--out", type=pathlib.Path, required=True, help="the run's folder (a killed run resumes with the "
                 "same command; a finished one is never overwritten)")
  p.add_argument("--resume-from", type=pathlib.Path, default=None, help="a finished run whose months this one "
                 "continues")
  p.add_argument("--pairs", default="file", choices=PAIRS, help="'file': each month's pairs as its file gives them; "
                 "'on-policy': two completions per prompt sampled from the policy entering the month, ranked by "
                 "--reward (the file's rows may be prompt-only)")
  p.add_argument("--reward", action="append", default=[], metavar="[NAME=]MODULE:FUNCTION", dest="rewards",
                 help="a reward (a function of a list of completion texts returning one score each), for every month "
                      "or for month NAME (repeat the flag): adds the reward matrix on sampled completions; needed by "
                      "--pairs on-policy. MODULE is importable or a path/to/file.py")
  p.add_argument("--test-fraction", type=float, default=0.1, help="share of a one-file month held out as its test "
                 "pairs (seeded by --seed)")
  p.add_argument("--held-out-text", type=pathlib.Path, default=None, help="JSON Lines of {\"text\"}: perplexity and "
                 "per-token KL to the base model after every month")
  p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="compute dtype")
  p.add_argument("--param-dtype", default="auto", choices=list(precision.PARAM_DTYPES),
                 help=precision.PARAM_DTYPE_HELP)
  p.add_argument("--cache-dir", type=pathlib.Path, default=None, help="where month 1's policy and sampled pairs "
                 "are kept for reuse (sweeps: runs of the same model, months, settings and seed share them; a "
                 "--reward is known by its spec and its file's contents); none: nothing is kept")
  p.add_argument("--no-export", action="store_true", help="write no OUT/export/ (sweeps: a month's export of "
                 "SmolLM2-135M is 0.5 GB); the stored state is written as always")
  p.add_argument("--no-progress", action="store_true", help="log lines instead of progress bars")
  p.add_argument("--fsdp", action="store_true", help="shard the policy, its gradients and AdamW's state over every "
                 "device (Hugging Face's fsdp=\"full_shard\"; fipjax.sharding); else replicated")
  p.add_argument("--distributed", action="store_true", help=experiment.DISTRIBUTED_HELP)
  p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)   # tests: simulate a kill
  cfg, args = cf.parse(p, PRESETS, argv)
  args.preset = "default"
  return cfg, args


def parse_rounds(specs: Sequence[str], resumed_names: Sequence[str]) -> list[tuple[str, pathlib.Path]]:
  """``NAME=PATH`` flags as (name, path), names unique (also against the months continued)."""
  out = []
  for spec in specs:
    name, sep, path = spec.partition("=")
    if not sep or not name.strip() or not path.strip():
      raise runs.UsageError(f"--round {spec!r} is not NAME=PATH; write e.g. --round 2026-11=prefs-november.jsonl.")
    if name == export.BASE:
      raise runs.UsageError(f"--round {spec!r}: '{export.BASE}' names the base model's export; choose another month "
                            "name.")
    if name in resumed_names or name in [n for n, _ in out]:
      raise runs.UsageError(f"--round {name} is given twice (or is a month of --resume-from); every month needs a "
                            "name of its own.")
    out.append((name, pathlib.Path(path)))
  return out


def month_rewards(specs: Sequence[str], names: Sequence[str]) -> dict[str, tuple[Any, str]]:
  """``--reward [NAME=]MODULE:FUNCTION`` flags as {month: (the reward, its :func:`fipjax.rewards.spec_id`)}: one
  without NAME applies to every month that none with its NAME names."""
  every, named = None, {}
  for spec in specs:
    name, sep, fn = spec.partition("=")
    if not sep:
      if every is not None:
        raise runs.UsageError(f"--reward {spec} and --reward {every} both apply to every month; give one, or name "
                              "the month (--reward NAME=MODULE:FUNCTION).")
      every = spec
    elif name not in names:
      raise runs.UsageError(f"--reward {spec} names month {name!r}, which is not among the months "
                            f"({', '.join(names)}).")
    elif name in named:
      raise runs.UsageError(f"--reward gives month {name} two rewards ({named[name]}, {fn}); give one.")
    else:
      named[name] = fn
  loaded: dict[str, Any] = {}
  out = {}
  for n in names:
    if (spec := named.get(n, every)) is not None:
      if spec not in loaded:      # each spec imported and probed once, however many months share it
        fn = rewards.from_spec(spec)
        loaded[spec] = (fn, rewards.spec_id(spec, fn))
      out[n] = loaded[spec]
  return out


def base_model_path(model: str) -> str | None:
  """Where PEFT finds the base model of a LoRA export: the Hugging Face directory or hub id given; None for a GGUF
  file (the base is then exported once as ``OUT/export/base``)."""
  if models.hub.is_gguf(model):
    return None
  return str(pathlib.Path(model).resolve()) if pathlib.Path(model).is_dir() else str(model)


def held_out_text(path: pathlib.Path | None, tokenizer, length: int) -> dict | None:
  if path is None:
    return None
  try:
    rows = [json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line.strip()]
  except (OSError, ValueError) as e:
    raise runs.UsageError(f"--held-out-text {path} cannot be read as JSON Lines ({e}).") from None
  texts = [r["text"] for r in rows if isinstance(r, dict) and isinstance(r.get("text"), str) and r["text"].strip()]
  if not texts:
    raise runs.UsageError(f"--held-out-text {path} holds no {{\"text\": …}} rows.")
  return alignment.encode_texts(texts, tokenizer, length)


def tokenize_month(rows: dict[str, list[dict]], tokenizer, cfg: AlignConfig, on_policy: bool) -> tuple[dict, int]:
  """({split: (prompt ids, chosen ids, rejected ids)} of a month — prompts only, ``(prompt ids,)``, on-policy —
  and how many rows were truncated)."""
  lengths = dict(max_prompt_length=cfg.max_prompt_length, max_length=cfg.max_length)
  if on_policy:
    out = {s: preferences.tokenize_prompts(preferences.render_prompts(r, tokenizer), tokenizer, **lengths)
           for s, r in rows.items()}
  else:
    out = {s: preferences.tokenize(preferences.render(r, tokenizer), tokenizer, **lengths) for s, r in rows.items()}
  return {s: t[:-1] for s, t in out.items()}, sum(t[-1] for t in out.values())


def encoded_width(cfg: AlignConfig, tokenised: list[tuple[str, dict]], on_policy: bool, stored) -> tuple[int, int]:
  """(P, R): the longest prompt, and the longest of the file completions and of a sampled completion
  (``--max-new-tokens``), over the months and a continued run's ``stored`` width."""
  splits = [t for _, split in tokenised for t in split.values()]
  new = cfg.max_new_tokens or (ON_POLICY_NEW_TOKENS if on_policy else 1)
  completions = [len(c) for t in splits for part in t[1:] for c in part]
  width = (max(len(p) for t in splits for p in t[0]), max(completions + [new]))
  return tuple(int(w) for w in np.max([width] + ([] if stored is None else [stored]), axis=0))


def build(cfg: AlignConfig, args, months: list[tuple[str, pathlib.Path]], resumed) -> tuple[MonthlyRunner, Any]:
  """(the runner, the base model's parameters): the months' files read and the rewards loaded first, then the model
  loaded, the pairs (or prompts) templated, tokenised and encoded to one width (with a continued run's, re-padded)."""
  on_policy = args.pairs == "on-policy"
  read = [(name, path, preferences.load_round(path, test_fraction=args.test_fraction, seed=cfg.seed,
                                              prompt_only=on_policy)) for name, path in months]
  old_names = [] if resumed is None else list(resumed[1]["rounds"])
  scored = month_rewards(args.rewards, old_names + [n for n, _ in months])
  if on_policy and (unscored := [n for n, _ in months if n not in scored]):
    raise runs.UsageError(f"--pairs on-policy ranks two sampled completions by a reward, but month(s) "
                          f"{', '.join(unscored)} have none; add --reward MODULE:FUNCTION (every month) or "
                          "--reward NAME=MODULE:FUNCTION.")
  model = models.load(args.model, dtype=DTYPES[args.dtype], remat=cfg.gradient_checkpointing,
                      param_dtype=precision.PARAM_DTYPES[args.param_dtype])
  if not hasattr(model.family, "generate"):
    raise runs.UsageError(f"--model {args.model} is not a causal LM (a {model.family.__name__.split('.')[-1]} "
                          "model); fipjax.align aligns decoders: Llama, Qwen2/3, Mistral, Gemma 2/3, a .gguf file or smollm2.")
  runs.log(str(model.report))
  tokenizer = models.load_llama_tokenizer(args.model)
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
  tokenised = []
  for name, path, rows in read:
    split, cut = tokenize_month(rows, tokenizer, cfg, on_policy)
    runs.log(f"month {name}: {len(rows['train'])} training / {len(rows['test'])} test "
             f"{'prompts' if on_policy else 'pairs'} from {path}"
             + (f"; {cut} truncated (--max-prompt-length, --max-length)" if cut else ""))
    tokenised.append((name, split))
  width = encoded_width(cfg, tokenised, on_policy, None if resumed is None else resumed[1]["width"])
  reward = lambda n: scored.get(n, (None, None))
  rounds = []
  for name, split in tokenised:
    if on_policy:
      pairs, prompts = None, {s: alignment.Prompts(*preferences.left_padded(t[0], width[0], pad))
                              for s, t in split.items()}
    else:
      pairs = {s: preferences.encode_pairs(*t, width=width, pad_id=pad) for s, t in split.items()}
      prompts = {s: alignment.Prompts(*p.pop("prompt")) for s, p in pairs.items()}
    rounds.append(alignment.Round(name, prompts, *reward(name), pairs))
  first, old = None, []
  if resumed is not None:
    tree, meta = resumed
    memory = {n: preferences.repad(p, width, pad) for n, p in tree["pairs"].items()}
    tests = {n: preferences.repad(p, width, pad) for n, p in tree["test"].items()}
    old = [alignment.Round(n, {s: alignment.Prompts(p["chosen"]["input_ids"][:, :width[0]],
                                                    p["chosen"]["attention_mask"][:, :width[0]])
                               for s, p in (("train", memory[n]), ("test", tests[n]))}, *reward(n))
           for n in meta["rounds"]]
    first = (stored_policy(tree, model.params), memory, meta["rows"], tests)
  all_rounds = old + rounds
  if len(all_rounds) < 2:
    raise runs.UsageError("continual alignment needs at least two months: give two --round flags, or one with "
                          "--resume-from a finished run.")
  kw = sections(cfg, width, min(len(r.prompts["train"]) for r in all_rounds))
  kw["run"] = dataclasses.replace(kw["run"], fsdp=args.fsdp)      # where the numbers are computed, not what they are
  parsed = continual.parse_name(args.method, on_preferences=True)
  plain = str(continual.Name(continual.PLAIN, parsed.in_lora, True))
  problems = continual.check_methods([args.method], kw["hp"], "tokens", on_preferences=True)
  if problems:
    raise runs.UsageError("; ".join(problems) + ".")
  exporter = (lambda month, params: None) if args.no_export else export.Exporter(
      args.out / "export", model, tokenizer, lora_targets=kw["hp"].lora.targets if parsed.in_lora else None,
      base_model_path=base_model_path(args.model))
  weights = {"model": str(args.model), "param_dtype": args.param_dtype}
  runner = MonthlyRunner(
      model.graphdef, tokenizer, all_rounds, held_out_text(args.held_out_text, tokenizer, width[0] + width[1]),
      family=model.family, first_method=plain, model_key={**weights, "dtype": args.dtype},
      cache=None if args.cache_dir is None else runs.StageCache(args.cache_dir), progress=not args.no_progress,
      stop_after=args.stop_after, out=args.out, resumed=first, export_fn=exporter,
      state_meta={**weights, "method": args.method, "width": list(width)},
      lora_state=(model.params, kw["hp"].lora.targets) if parsed.in_lora else None, **kw)
  return runner, model.params


def main(argv=None) -> int:
  cfg, args = parse_args(argv)
  command = " ".join(["python -m fipjax.align"] + list(sys.argv[1:] if argv is None else argv))
  config = {"config": cf.to_dict(cfg), "model": str(args.model), "rounds": args.rounds,
            "resume_from": None if args.resume_from is None else str(args.resume_from),
            "test_fraction": args.test_fraction, "dtype": args.dtype,
            "param_dtype": args.param_dtype, "pairs": args.pairs, "reward": args.rewards}

  def run():
    if args.distributed:
      parallel.initialize_distributed()
    resumed = None if args.resume_from is None else load_state(args.resume_from, args.model, args.param_dtype)
    months = parse_rounds(args.rounds, [] if resumed is None else resumed[1]["rounds"])
    if not months:
      raise runs.UsageError("give at least one --round NAME=PATH (a month of preference pairs).")
    if not 0 < args.test_fraction < 1:
      raise runs.UsageError(f"--test-fraction {args.test_fraction} must be between 0 and 1.")
    experiment.run_experiment(lambda: build(cfg, args, months, resumed), methods=[args.method], config=config,
                              out=args.out, cache_dir=None, title="Continual alignment", command=command)

  return runs.cli_main(run, user_errors=(preferences.DataError, models.CheckpointError))


if __name__ == "__main__":
  sys.exit(main())
