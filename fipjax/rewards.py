"""Reward models: sentiment classifiers fine-tuned with fipjax's own BERT pipeline, scoring generated text.

:func:`sentiment_classifier` fine-tunes a BERT (the packaged MiniLM offline) on one labelled task with the one
training loop, reports its test accuracy, and keeps it in the stage cache; a :class:`Classifier` maps texts to
class probabilities, and a :class:`Reward` to one number per text: ``probs @ weights``. :func:`from_spec` loads a
user's reward (``module:function`` or ``path/to/file.py:function``: texts → scores) and checks what it returns.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import inspect
import pathlib
import time
from typing import Callable, Sequence

import jax
import numpy as np
import optax

from fipjax import continual, data, runs
from fipjax import config as cf
from fipjax import models


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
  """How a reward classifier is fine-tuned (offline defaults: MiniLM on ../shared/data, about 2 minutes)."""
  model: str = cf.option("minilm", "BERT the reward classifiers fine-tune: hub id, directory or 'minilm'")
  train_rows: int = cf.option(2400, "labelled training rows per classifier", cf.positive)
  test_rows: int = cf.option(1000, "labelled test rows on which its accuracy is reported", cf.positive)
  max_len: int = cf.option(64, "tokens per text the classifiers read (truncated)", cf.positive)
  steps: int = cf.option(150, "fine-tuning steps (batch 16, AdamW)", cf.positive)
  lr: float = cf.option(5e-5, "fine-tuning learning rate", cf.positive)
  seed: int = cf.option(0, "seed of the classifiers' data and training: the environment, the same for every "
                        "run's --seed", cf.non_negative)


class Classifier:
  """``probs(texts) -> [N, K]`` of a fine-tuned BERT classifier, ``apply(params, inputs)["cls"]`` its logits
  (jitted per length bucket)."""

  def __init__(self, apply, params, tokenizer, max_len: int, batch_size: int = 64):
    self._probs = jax.jit(lambda p, x: jax.nn.softmax(apply(p, x)["cls"], -1))
    self.params, self.tokenizer, self.max_len, self.batch_size = params, tokenizer, max_len, batch_size

  def encode(self, texts: Sequence[str], labels: np.ndarray | None = None) -> data.Encoded:
    ids = self.tokenizer(list(texts), truncation=True, max_length=self.max_len)["input_ids"]
    labels = np.zeros(len(ids), np.int32) if labels is None else np.asarray(labels, np.int32)
    return data.Encoded([np.asarray(x, np.int32) for x in ids], labels, self.max_len)

  def probs(self, texts: Sequence[str] | data.Encoded) -> np.ndarray:
    enc = texts if isinstance(texts, data.Encoded) else self.encode(texts)
    out = None
    for batch, idx in data.eval_batches(enc, self.batch_size):
      p = np.asarray(self._probs(self.params, batch["inputs"]))
      out = np.empty((len(enc), p.shape[-1]), np.float32) if out is None else out
      out[idx] = p[:len(idx)]
    return out


@dataclasses.dataclass
class Reward:
  """A text's reward ``probs(text) @ weights`` (e.g. P(positive), or 1 − expected stars rescaled to [0, 1])."""
  classifier: Classifier
  weights: np.ndarray

  def __call__(self, texts: Sequence[str]) -> np.ndarray:
    return self.classifier.probs(texts) @ np.asarray(self.weights, np.float32)


def classifier_rows(task: str, cfg: ClassifierConfig, data_dir: str | None) -> data.TaskData:
  """The labelled training rows a reward classifier of ``task`` is fine-tuned on (what prompts must avoid)."""
  return data.subsample(data.load_task(task, "train", data_dir), cfg.train_rows, cfg.seed)


def sentiment_classifier(task: str, cfg: ClassifierConfig, *, data_dir: str | None, cache: runs.StageCache | None,
                         progress: bool = True) -> tuple[Classifier, dict]:
  """(classifier, {"task", "test_accuracy", "train_rows", "test_rows", "steps"}) for ``task`` ('imdb' or 'yelp'),
  fine-tuned once per configuration and kept in ``cache``."""
  train, test = (data.load_task(task, split, data_dir) for split in ("train", "test"))
  seed = cfg.seed
  tokenizer = models.load_tokenizer(cfg.model)
  k = train.num_labels
  model = models.load(cfg.model, family="bert", heads={"cls": k}, seed=seed)
  init = model.params
  clf = Classifier(model.apply, init, tokenizer, cfg.max_len)
  train_enc = data.encode(classifier_rows(task, cfg, data_dir), tokenizer, cfg.max_len)
  test_rows = data.subsample(test, cfg.test_rows, seed)
  parts = {"task": task, "config": cf.to_dict(cfg), "data": train_enc.digest()}

  def fit(ckpt_dir: pathlib.Path | None):
    apply = model.apply

    def loss(params, batch, rng=None):
      z = apply(params, batch["inputs"], deterministic=rng is None, rng=rng)["cls"]
      return optax.softmax_cross_entropy_with_integer_labels(z, batch["labels"]).mean()

    method = continual.naive(loss, continual.adamw(continual.OptimConfig(lr=cfg.lr, weight_decay=0.01)))
    batches = lambda s: ({"new": b} for b in data.train_batches(train_enc, 16, seed, start_step=s))
    params, _, _ = runs.train(method, init, batches,
                              cfg.steps, name=f"reward classifier ({task})", ckpt_dir=ckpt_dir,
                              checkpoint_every=100, rng=jax.random.PRNGKey(seed), progress=progress)
    clf.params = params
    acc = float(np.mean(np.argmax(clf.probs(test_rows.texts), -1) == test_rows.labels))
    return params, {"task": task, "test_accuracy": acc, "train_rows": len(train_enc),
                    "test_rows": len(test_rows.texts), "steps": cfg.steps, "classes": k}

  def compute(ckpt_dir):
    t0 = time.perf_counter()
    params, info = fit(ckpt_dir)
    runs.log(f"reward classifier ({task}): test accuracy {info['test_accuracy']:.3f} on {info['test_rows']} rows "
             f"({time.perf_counter() - t0:.0f} s)")
    return params, {"info": info}

  clf.params, meta = runs.cached(cache, f"reward-{task}", parts, compute, template=init)
  return clf, meta["info"]


def spec_id(spec: str, reward: Callable | None = None) -> dict:
  """What identifies a ``--reward`` spec in cache keys and results: the spec and the sha256 of the file its function
  is defined in (so that an edited reward is not mistaken for the old one); ``reward``, the spec already loaded by
  :func:`from_spec`, spares importing it again."""
  fn = (reward or from_spec(spec, probe=False)).__wrapped__
  try:
    source = pathlib.Path(inspect.getfile(fn)).read_bytes()
  except (TypeError, OSError):      # a builtin or a function without a file: the spec alone
    return {"reward": spec, "source_sha256": None}
  return {"reward": spec, "source_sha256": hashlib.sha256(source).hexdigest()}


def from_spec(spec: str, probe: bool = True) -> Callable[[Sequence[str]], np.ndarray]:
  """The reward ``texts -> scores [N]`` named by ``module:function`` (an importable module) or
  ``path/to/file.py:function``, wrapped so that anything but N finite numbers is a one-paragraph error; called once
  on two texts here (``probe``), so that a broken reward is reported before anything is loaded; ``__wrapped__``
  is the user's function."""
  module, sep, name = spec.rpartition(":")
  if not sep or not module or not name:
    raise runs.UsageError(f"--reward {spec!r} is not module:function; write e.g. --reward my_rewards:brevity or "
                          "--reward path/to/rewards.py:brevity (a function of a list of texts returning one score "
                          "per text).")
  try:
    if module.endswith(".py"):
      loader = importlib.util.spec_from_file_location(pathlib.Path(module).stem, module)
      if loader is None or not pathlib.Path(module).is_file():
        raise FileNotFoundError(f"no file {module}")
      mod = importlib.util.module_from_spec(loader)
      loader.loader.exec_module(mod)
    else:
      mod = importlib.import_module(module)
  except Exception as e:      # the user's module: any error it raises on import is theirs to fix
    raise runs.UsageError(f"--reward {spec}: {module} cannot be imported ({type(e).__name__}: {e}); pass an "
                          "importable module or a .py file.") from None
  fn = getattr(mod, name, None)
  if not callable(fn):
    raise runs.UsageError(f"--reward {spec}: {module} has no function {name!r}.")

  def reward(texts: Sequence[str]) -> np.ndarray:
    try:
      scores = np.asarray(fn(list(texts)), np.float64)
    except Exception as e:    # the user's function failing is a usage error, reported without our traceback
      raise runs.UsageError(f"--reward {spec} failed on {len(texts)} completions ({type(e).__name__}: {e}).") from None
    if scores.shape != (len(texts),) or not np.all(np.isfinite(scores)):
      got = f"shape {scores.shape}" if scores.shape != (len(texts),) else "a score that is not finite"
      raise runs.UsageError(f"--reward {spec} returned {got} for {len(texts)} texts; it must return one finite "
                            "number per text.")
    return scores.astype(np.float32)

  if probe:
    reward(["A short completion.", "A completion of a few more words, to check the reward before anything runs."])
  reward.__wrapped__ = fn
  return reward
