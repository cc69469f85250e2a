"""Monthly DPO rounds on a causal LM: does the second round undo what the first one taught?

    python -m experiments.continual_dpo --preset cpu --method all     # packaged SmolLM2-135M, ../shared/data, 2 cores
    python -m experiments.continual_dpo --method fip-dpo              # the paper preset (hub model and data, GPU)

After the DPO paper's controlled-sentiment task: round 1's prompts are the first tokens of IMDB reviews and the
preferred completion of two is the more positive (an IMDB sentiment classifier's P(positive)); round 2's prompts
are Yelp review openings and the preferred completion is the more negative (a Yelp star classifier's expected
stars, reversed), a preference that pulls against round 1's. Both classifiers are MiniLM fine-tuned with fipjax's
own BERT pipeline (their test accuracy is reported). Pairs are two samples per prompt from the policy entering the
round, cached. Round 1 is plain DPO, shared by every method; round 2 is learnt by each method from that policy.
``--data.rounds imdb-positive,yelp-negative,yelp-neutral`` adds a third round on other Yelp openings whose preferred
completion is the more neutral (a Yelp star classifier's expected closeness to 3 stars), so that round 1's
forgetting accumulates over two later rounds, each learnt by the method.
Reports go under ``--out`` (default ``runs/<timestamp>/``): ``results.json``, ``report.md``, ``rewards.png`` and
``drift.png``. A run killed at any point resumes when started again with the same command.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys

import jax.numpy as jnp
import numpy as np

from experiments import frontier
from fipjax import alignment, continual, data, experiment, precision, rewards, runs, streams
from fipjax import config as cf
from fipjax import models
from fipjax.models import llama

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_LOCAL_DATA = REPO.parent / "shared" / "data"
METHODS = ("dpo", "lora-dpo", "replay-dpo", "fip-dpo", "lora-fip-dpo")
"""What ``--method all`` runs (any ``<method>-dpo`` of the registry runs too, e.g. fip-geodesic-dpo)."""
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# (round, dataset, reward weights over its classifier's classes, what the reward is). yelp-neutral, a third round
# on reviews no other round prompts with, pulls against both earlier ones (towards 3 stars from round 2's 1 and
# round 1's praise), so that round 1's forgetting accumulates over two later rounds.
ROUNDS = (("imdb-positive", "imdb", np.array([0.0, 1.0]), "P(positive) of an IMDB sentiment classifier"),
          ("yelp-negative", "yelp", np.array([1.0, 0.75, 0.5, 0.25, 0.0]),
           "1 − (expected stars − 1)/4 of a Yelp star classifier"),
          ("yelp-neutral", "yelp", np.array([0.0, 0.5, 1.0, 0.5, 0.0]),
           "1 − E|stars − 3|/2 of a Yelp star classifier"))
ROUND_NAMES = tuple(r[0] for r in ROUNDS)


def _round_list(value: str) -> bool:
  names = value.split(",")
  return len(names) >= 2 and len(set(names)) == len(names) and set(names) <= set(ROUND_NAMES)


cf.CHECK_WORDS[_round_list] = f"two or more distinct names of {', '.join(ROUND_NAMES)}, comma-separated"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The causal LM and its precision."""
  name: str = cf.option("HuggingFaceTB/SmolLM2-360M-Instruct",
                         "causal LM: hub id, directory, .gguf file, or 'smollm2' (the packaged SmolLM2-135M GGUF)")
  dtype: str = cf.option("bfloat16", "compute dtype", cf.one_of(*DTYPES))
  param_dtype: str = cf.option("auto", precision.PARAM_DTYPE_HELP, cf.one_of(*precision.PARAM_DTYPES))
  remat: bool = cf.option(False, "recompute each decoder layer's activations in the backward pass (less memory)")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """The reviews whose openings are the rounds' prompts, and the held-out text."""
  dir: str | None = cf.option(None, "folder with <task>/{train,test}.jsonl (none: the Hugging Face hub)")
  train_prompts: int = cf.option(2000, "training prompts per round (one pair each)", cf.positive)
  val_prompts: int = cf.option(200, "validation prompts per round (tuning), held out of training", cf.positive)
  test_prompts: int = cf.option(500, "test prompts per round (from the test split)", cf.positive)
  held_out_texts: int = cf.option(200, "test reviews per dataset for perplexity and KL to the base model",
                                  cf.positive)
  text_tokens: int = cf.option(64, "tokens of each held-out review", cf.positive)
  rounds: str = cf.option("imdb-positive,yelp-negative", "the rounds in order, comma-separated, from "
                          "imdb-positive, yelp-negative, yelp-neutral", _round_list)


@dataclasses.dataclass(frozen=True)
class Config(streams.StreamConfig):
  """Everything that determines a run's numbers (where it is written is not part of it)."""
  model: ModelConfig = cf.section(ModelConfig)
  data: DataConfig = cf.section(DataConfig)
  dpo: alignment.PreferenceConfig = cf.section(alignment.PreferenceConfig)
  rewards: rewards.ClassifierConfig = cf.section(rewards.ClassifierConfig)


_LLAMA_LORA = llama.LORA_TARGETS[0]
# The geodesic form of fip-geodesic-dpo: the adam form's corrector needs stored logits, which sequence models
# replace by top-k references.
_GEODESIC = {"geodesic.form": "gradient", "geodesic.cg_iters": 5}
PRESETS = {
    # A GPU: SmolLM2-360M from the hub, full datasets from the hub, longer rounds and completions.
    "paper": cf.with_values(Config(), {
        "optim.batch_size": 16, "optim.lr": 5e-6, "optim.dropout": False, "first.steps": 250, "stages.steps": 250,
        "stages.replay_batch_size": 8, "stages.buffer_size": 500, "lora.targets": _LLAMA_LORA, "lora.optim.lr": 2e-4,
        "dpo.response_tokens": 48, "dpo.prompt_tokens": 8, "run.eval_batch_size": 32, "run.checkpoint_every": 100,
        "run.record_every": 25, "run.probe_size": 32, "fip.beta": 1.0, **_GEODESIC}),
    # Offline, 2 CPU cores: the packaged SmolLM2-135M GGUF, ../shared/data, rounds sized for `--method all`.
    "cpu": cf.with_values(Config(), {
        "model.name": "smollm2", "model.dtype": "float32", "data.dir": str(DEFAULT_LOCAL_DATA),
        "data.train_prompts": 128, "data.val_prompts": 64, "data.test_prompts": 64, "data.held_out_texts": 24,
        "data.text_tokens": 48, "optim.batch_size": 4, "optim.lr": 5e-5, "optim.dropout": False, "first.steps": 32,
        "stages.steps": 32, "stages.replay_batch_size": 4, "stages.buffer_size": 64, "lora.targets": _LLAMA_LORA,
        "lora.optim.lr": 5e-4, "dpo.response_tokens": 24, "dpo.generate_batch_size": 64, "run.eval_batch_size": 16,
        "run.checkpoint_every": 32, "run.record_every": 8, "run.probe_size": 16,   # 32: between rounds only
        # (a mid-round checkpoint held 4 GiB more resident while written; a round is 32 steps, about 2 minutes)
        "fip.beta": 16.0,        # β chosen on validation rewards (docs/results-dpo-cpu.md)
        **_GEODESIC}),
}


def parse_args(argv=None):
  p = cf.ArgumentParser(prog="python -m experiments.continual_dpo", description=__doc__,
                        formatter_class=cf.argparse.RawDescriptionHelpFormatter)
  p.add_argument("--method", default="fip-dpo", type=lambda v: continual.method_argument(v, on_preferences=True),
                 help=f"round-2 method: any registry method on the preference loss (<method>-dpo, lora-<method>-dpo; "
                      f"dpo alone is DPO), several comma-separated, or 'all' ({', '.join(METHODS)}); all from the "
                      "same round-1 policy")
  p.add_argument("--preset", default="paper", choices=sorted(PRESETS),
                 help="'paper' (SmolLM2-360M from the hub, GPU) or 'cpu' (packaged SmolLM2-135M, local data)")
  p.add_argument("--frontier", action="store_true", help=frontier.FLAG_HELP)
  p.add_argument("--out", type=pathlib.Path, default=None, help="output directory (default runs/<timestamp>)")
  p.add_argument("--cache-dir", type=pathlib.Path, default=REPO / "runs" / "cache",
                 help="where reward classifiers, pairs and round-1 policies are kept for reuse")
  p.add_argument("--no-progress", action="store_true", help="log lines instead of progress bars")
  p.add_argument("--distributed", action="store_true", help=experiment.DISTRIBUTED_HELP)
  p.add_argument("--stop-after", type=int, default=None, help=cf.argparse.SUPPRESS)   # tests: simulate a kill
  return cf.parse(p, PRESETS, argv)


def check(cfg: Config, methods: list[str]) -> None:
  """The configuration's problems that need no data or model, raised before anything is loaded or written."""
  for flag, value in (("--optim.batch-size", cfg.optim.batch_size),
                      ("--stages.replay-batch-size", cfg.stages.replay_batch_size)):
    if cfg.data.train_prompts < value:
      raise runs.UsageError(f"--data.train-prompts {cfg.data.train_prompts} gives fewer pairs per round than one "
                            f"batch of {value} ({flag}); use more prompts or a smaller {flag}.")
  if cfg.stages.buffer_size < cfg.stages.replay_batch_size:
    raise runs.UsageError(f"--stages.buffer-size {cfg.stages.buffer_size} keeps fewer pairs than one replay batch "
                          f"of {cfg.stages.replay_batch_size} (--stages.replay-batch-size); raise it or lower the "
                          "batch.")
  problems = continual.check_methods(methods, cfg.method, "tokens", on_preferences=True)
  if problems:
    raise runs.UsageError("; ".join(problems) + ".")


def chosen_rounds(cfg: Config) -> list[tuple]:
  """The ``ROUNDS`` rows of ``--data.rounds``, in its order."""
  return [ROUNDS[ROUND_NAMES.index(n)] for n in cfg.data.rounds.split(",")]


def split_prompts(cfg: Config) -> tuple[list[dict[str, list[str]]], list[str]]:
  """Each round's train / val / test prompt texts (train and val from the training split less the reward
  classifier's training rows; test from the test split; all disjoint, also between rounds on one dataset), and
  held-out test reviews for KL and perplexity; every size is checked before anything trains."""
  n_train, n_val, n_test = cfg.data.train_prompts, cfg.data.val_prompts, cfg.data.test_prompts
  prompts, held_out, used = [], [], set()
  for name, task, _, _ in chosen_rounds(cfg):
    j = ROUND_NAMES.index(name)    # a round's draw depends on the round, not its place in --data.rounds
    train, test = (data.load_task(task, split, cfg.data.dir).texts for split in ("train", "test"))
    # The reward's classifier was fine-tuned on some training reviews; their openings are no prompts (nor are test
    # reviews that repeat a training one, nor reviews an earlier round took).
    seen, trained = set(rewards.classifier_rows(task, cfg.rewards, cfg.data.dir).texts), set(train)
    test = [t for t in dict.fromkeys(test) if t not in trained and t not in used]
    train = [t for t in dict.fromkeys(train) if t not in seen and t not in used]
    for split, want, have, flags in (("train", n_train + n_val, len(train),
                                      "--data.train-prompts + --data.val-prompts"),
                                     ("test", n_test + cfg.data.held_out_texts, len(test),
                                      "--data.test-prompts + --data.held-out-texts")):
      if want > have:
        raise runs.UsageError(f"{task} {split}: {flags} = {want} rows are asked for, but it holds {have} (less "
                              "the reward classifier's training rows and repeated reviews); choose smaller values.")
    order = np.random.default_rng([cfg.seed, 31 + j]).permutation(len(train))
    test_order = np.random.default_rng([cfg.seed, 41 + j]).permutation(len(test))
    pick = lambda texts, idx: [texts[i] for i in idx]
    prompts.append({"train": pick(train, order[:n_train]), "val": pick(train, order[n_train:n_train + n_val]),
                    "test": pick(test, test_order[:n_test])})
    held_out += pick(test, test_order[n_test:n_test + cfg.data.held_out_texts])
    used.update(*prompts[-1].values(), held_out)
  return prompts, held_out


def load_rounds(cfg: Config, tokenizer, cache: runs.StageCache, progress: bool):
  """(the rounds of ``--data.rounds``, held-out text)."""
  prompts, held_out = split_prompts(cfg)
  rounds = []
  for j, ((name, task, weights, what), texts) in enumerate(zip(chosen_rounds(cfg), prompts)):
    classifier, info = rewards.sentiment_classifier(task, cfg.rewards, data_dir=cfg.data.dir,
                                                    cache=cache, progress=progress)
    runs.log(f"round {j + 1} ({name}): reward = {what}; classifier test accuracy {info['test_accuracy']:.3f} "
             f"({info['test_rows']} rows)")
    rounds.append(alignment.Round(
        name, {s: alignment.encode_prompts(t, tokenizer, cfg.dpo.prompt_tokens) for s, t in texts.items()},
        rewards.Reward(classifier, weights),
        {"reward": what, "classifier": info, "weights": weights.tolist(), "config": cf.to_dict(cfg.rewards)}))
  return rounds, alignment.encode_texts(held_out, tokenizer, cfg.data.text_tokens)


def build(cfg: Config, args):
  """(runner, the base policy's parameters): loads the model, the data and the rewards; input errors are raised
  here."""
  cache = runs.StageCache(args.cache_dir)
  model = models.load(cfg.model.name, dtype=DTYPES[cfg.model.dtype], remat=cfg.model.remat,
                      param_dtype=precision.PARAM_DTYPES[cfg.model.param_dtype])
  runs.log(str(model.report))
  if not hasattr(model.family, "generate"):
    raise runs.UsageError(f"--model.name {cfg.model.name} is a {model.family.__name__.split('.')[-1]} model, not a "
                          "causal LM; continual alignment samples completions from a decoder (Llama, Qwen2, Mistral, "
                          "a GGUF file or 'smollm2').")
  tokenizer = models.load_llama_tokenizer(cfg.model.name)
  rounds, held_out = load_rounds(cfg, tokenizer, cache, not args.no_progress)
  runner = alignment.AlignmentRunner(
      model.graphdef, tokenizer, rounds, held_out, family=model.family, **cfg.runner_args(), pref=cfg.dpo,
      model_key={k: v for k, v in cf.to_dict(cfg.model).items() if k != "remat"},   # remat: the same numbers
      cache=cache, progress=not args.no_progress, stop_after=args.stop_after)
  return runner, model.params


def main(argv=None) -> int:
  cfg, args = parse_args(argv)
  methods = continual.method_list(args.method, METHODS)
  if args.frontier:
    return frontier.from_experiment("continual_dpo", argv, cfg, methods, args.out, REPO / "runs", args.cache_dir)
  return experiment.experiment_main(
      "experiments.continual_dpo", argv, cfg, args, methods, lambda: build(cfg, args),
      title="Continual DPO: IMDB positive → Yelp negative", runs_root=REPO / "runs",
      before=lambda: check(cfg, methods), user_errors=(models.CheckpointError,))


if __name__ == "__main__":
  sys.exit(main())
