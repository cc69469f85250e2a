"""Continual alignment: rounds ("months") of preference pairs learnt by DPO in order, by any method of the registry.

A :class:`Round` is a prompt set (train / val / test) and a reward on completions. Entering a round, the runner
samples two completions per prompt from the policy entering it, ranks them by the reward, and stores each pair with
that policy's log-probabilities (DPO's reference: no reference model is kept). The first round is learnt by DPO
once (cached and shared by every method); every later round by the chosen method, whose old rounds are

* their training pairs with their own stored reference log-probabilities (``replay``: DPO on old pairs), and
* anchor sequences on the prompts of a buffer of them (the pairs' chosen completions, or with ``--dpo.anchor policy``
  fresh completions sampled from the policy entering the round), for ``fip`` with that policy's token
  distributions stored as top-k (:mod:`fipjax.sequences`; the Bhattacharyya penalty on them), for ``fip-geodesic``
  as the inputs through whose next-token distributions (at the current weights) G is pulled back.

After every round each round's held-out prompts are answered by the policy and scored by that round's reward (the
R matrix of rewards), and the implicit-reward preference accuracy on held-out pairs, the per-token KL to the base
model and the perplexity on held-out text are measured.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fipjax import continual, data, dpo, memory, runs, sequences
from fipjax import config as cf
from fipjax import results as results_lib
from fipjax import stages as stages_lib
from fipjax import tree as tu
from fipjax.models import common, llama

PyTree = Any


class Prompts(NamedTuple):
  """Left-padded prompts: ``input_ids``, ``attention_mask`` ``[N, P]`` int32."""
  input_ids: np.ndarray
  attention_mask: np.ndarray

  def __len__(self) -> int:
    return len(self.input_ids)


def encode_prompts(texts: Sequence[str], tokenizer, length: int) -> Prompts:
  """The first ``length`` tokens of each text, left-padded with the tokenizer's pad (or end) token."""
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
  ids = np.full((len(texts), length), pad, np.int32)
  mask = np.zeros((len(texts), length), np.int32)
  for i, row in enumerate(tokenizer(list(texts))["input_ids"]):
    row = row[:length]
    ids[i, length - len(row):], mask[i, length - len(row):] = row, 1
  return Prompts(ids, mask)


def encode_texts(texts: Sequence[str], tokenizer, length: int) -> dict[str, np.ndarray]:
  """Right-padded ``{"input_ids", "attention_mask"}`` ``[N, length]`` (held-out text for KL and perplexity)."""
  p = encode_prompts(texts, tokenizer, length)
  order = np.argsort(p.attention_mask == 0, axis=1, kind="stable")     # padding to the right, tokens in order
  return {"input_ids": np.take_along_axis(p.input_ids, order, 1), "attention_mask": np.take_along_axis(
      p.attention_mask, order, 1)}


@dataclasses.dataclass(frozen=True)
class Round:
  """One round of preferences: its prompts, and either the reward that ranks two completions sampled from the policy
  entering the round, or the round's own pairs (a preference file), or both.

  Attributes:
    name: the round's name (reports, cache keys).
    prompts: split → :class:`Prompts` (``train`` and ``test``; ``val`` where a reward is evaluated on it).
    reward: ``completion texts -> rewards [N]`` (higher is preferred), or None.
    reward_id: what the reward is (reports, cache keys; JSON): e.g. its description, classifier and configuration.
    pairs: split → ``{"chosen", "rejected"}`` sequences (:func:`fipjax.preferences.encode_pairs`): the round's
      pairs as given, their reference log-probabilities taken from the policy entering the round; None: sampled.
  """
  name: str
  prompts: Mapping[str, Prompts]
  reward: Callable[[Sequence[str]], np.ndarray] | None
  reward_id: Any = None
  pairs: Mapping[str, Mapping[str, Any]] | None = None


ANCHORS = ("chosen", "policy")


@dataclasses.dataclass(frozen=True)
class PreferenceConfig:
  """DPO: its loss, the pairs (prompts and sampled completions) and the stored references of old rounds."""
  beta: float = cf.option(0.1, "DPO's β (the implicit reward's scale)", cf.positive)
  loss: str = cf.option("sigmoid", "preference loss (TRL's loss_type): 'sigmoid' (DPO), 'ipo', 'hinge' (SLiC) or "
                        "'robust' (robust DPO)", cf.one_of(*dpo.KINDS))
  label_smoothing: float = cf.option(0.0, "ε: the probability that a preference label is flipped (conservative DPO "
                                     "for 'sigmoid', robust DPO's noise level)", cf.interval(0, 0.5))
  rpo_alpha: float | None = cf.option(None, "α of RPO's negative log-likelihood term on the chosen responses "
                                      "(none: no term)", cf.non_negative)
  prompt_tokens: int = cf.option(8, "tokens of each review that make its prompt (left-padded)", cf.positive)
  response_tokens: int = cf.option(24, "tokens sampled per completion", cf.positive)
  temperature: float = cf.option(1.0, "sampling temperature of pairs and evaluations", cf.positive)
  top_p: float = cf.option(1.0, "nucleus sampling's p", lambda v: 0 < v <= 1)
  top_k: int = cf.option(32, "stored reference tokens per position (FIP's compressed token distributions)",
                         cf.positive)
  generate_batch_size: int = cf.option(32, "prompts per generation call", cf.positive)
  eval_samples: int = cf.option(1, "completions sampled per evaluation prompt (its reward is their mean; the same "
                                "sampling keys for every policy, so differences are paired)", cf.positive)
  anchor: str = cf.option(
      "chosen", "FIP's sequences on earlier rounds' buffered prompts: 'chosen' (the pairs' preferred completions, "
      "sampled before that round) or 'policy' (a completion sampled from the policy entering the round, so the "
      "penalty holds its distributions where it goes itself)", cf.one_of(*ANCHORS))


# Fields of PreferenceConfig that only later rounds' buffers or the evaluation read: pairs and round 1 are cached
# without them.
_BUFFER_ONLY = ("top_k", "anchor", "eval_samples")


def pair_key(pref: PreferenceConfig) -> dict:
  """The preference configuration that determines pairs and the first round (cache keys)."""
  return {k: v for k, v in cf.to_dict(pref).items() if k not in _BUFFER_ONLY}


# ---------------------------------------------------------------------------------------------------------------
# Batched, jitted calls of the policy.


def in_batches(fn: Callable[[PyTree, int], PyTree], rows: PyTree, size: int, into: np.ndarray | None = None) -> PyTree:
  """``fn(batch, i)`` over ``rows`` (leaves ``[N, ...]``) in batches of ``size`` (the last one padded with its
  first row, so one shape compiles), outputs ``[N, ...]`` concatenated on the host, or written into ``into`` (one
  output array ``[N, ...]``, e.g. a memory map) batch by batch."""
  n = len(jax.tree.leaves(rows)[0])
  outs = []
  for i, start in enumerate(range(0, n, size)):
    idx = np.arange(start, min(start + size, n))
    padded = np.concatenate([idx, np.repeat(idx[:1], size - len(idx))])
    out = jax.device_get(fn(jax.tree.map(lambda a: a[padded], rows), i))
    out = jax.tree.map(lambda a: np.asarray(a)[:len(idx)], out)
    if into is None:
      outs.append(out)
    else:
      into[start:start + len(idx)] = out
  return into if into is not None else jax.tree.map(lambda *xs: np.concatenate(xs), *outs)


def response_sequences(prompts: Prompts, tokens: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
  """Prompt + completion as one sequence ``[N, P + R]`` with the completion's ``response_mask``."""
  return {"input_ids": np.concatenate([prompts.input_ids, tokens], 1).astype(np.int32),
          "attention_mask": np.concatenate([prompts.attention_mask, mask], 1).astype(np.int32),
          "response_mask": np.concatenate([np.zeros_like(prompts.attention_mask), mask], 1).astype(np.int32)}


def fip_outputs(apply: Callable) -> Callable:
  """``f(params, rows) -> [B, T−1, V]``: next-token logits on the anchor sequences' response positions (others
  zeroed, so they have no Jacobian): the outputs G is pulled back through in the geodesic form."""

  def f(params, rows):
    seq = rows["anchor"]
    return apply(params, seq)[:, :-1] * sequences.response_positions(seq)[..., None]

  return f


FULL_LOGPROBS_DTYPE = np.float32
"""The stored full-vocabulary log-probabilities' dtype (:meth:`Policy.full_logprobs`)."""


class Policy:
  """A causal LM's sampling, reference log-probabilities, stored top-k references and held-out statistics,
  each jitted once; ``family`` is its model family's module (:data:`fipjax.models.FAMILIES`). Completions are
  sampled ``pref.generate_batch_size`` prompts at a time; the teacher-forced passes over them (reference
  log-probabilities, top-k references) take ``score_batch_size`` sequences at a time (default the same): their
  full-vocabulary logits are the larger array (64 pairs × 32 tokens × 49,152 at SmolLM2: 0.8 GB)."""

  def __init__(self, graphdef, tokenizer, pref: PreferenceConfig, family=llama, score_batch_size: int | None = None):
    self.graphdef, self.apply, self.tokenizer, self.pref = graphdef, family.make_apply(graphdef), tokenizer, pref
    self.score_batch_size = score_batch_size or pref.generate_batch_size
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    self._generate = jax.jit(lambda p, ids, m, key: family.generate(
        graphdef, p, ids, m, key, max_new_tokens=pref.response_tokens, eos_id=tokenizer.eos_token_id, pad_id=pad,
        temperature=pref.temperature, top_p=pref.top_p)[:2])
    self._ref = jax.jit(lambda p, b: dpo.reference_logprobs(self.apply, p, b, kind=pref.loss))
    self._topk = jax.jit(lambda p, b: tuple(sequences.reference_topk(self.apply, p, b, pref.top_k)))
    distance = jax.jit(lambda p, b: sequences.bhattacharyya_topk(self.apply(p, b)[:, :-1], sequences.TopK(*b["ref"])))
    self._distance = lambda p, b: (distance(p, b), sequences.response_positions(b))

    def text_stats(p, b):
      """Per row: summed next-token NLL, summed KL(π ‖ π_base) (``b["base_logprobs"]``), predicted tokens ``[B]``."""
      logits = self.apply(p, b)
      logp = jax.nn.log_softmax(logits[:, :-1], -1)
      m = b["attention_mask"][:, 1:].astype(jnp.float32)
      nll = -common.token_logprobs(logits, b["input_ids"])
      kl = jnp.sum(jnp.exp(logp) * (logp - b["base_logprobs"]), -1)
      return jnp.sum(nll * m, -1), jnp.sum(kl * m, -1), jnp.sum(m, -1)

    self._text_stats = jax.jit(text_stats)
    self._logprobs = jax.jit(lambda p, b: jax.nn.log_softmax(self.apply(p, b)[:, :-1], -1))
    self._pair_stats = jax.jit(lambda p, b: dpo.pair_statistics(self.apply, p, b, kind=pref.loss))

  def sample(self, params, prompts: Prompts, key) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, mask) ``[N, R]`` of one sampled completion per prompt."""
    fn = lambda b, i: self._generate(params, b.input_ids, b.attention_mask, jax.random.fold_in(key, i))
    return in_batches(fn, prompts, self.pref.generate_batch_size)

  def completions(self, params, prompts: Prompts, key) -> dict[str, np.ndarray]:
    """Each prompt with one completion sampled from ``params``, as sequences (:func:`response_sequences`)."""
    return response_sequences(prompts, *self.sample(params, prompts, key))

  def texts(self, tokens: np.ndarray, mask: np.ndarray) -> list[str]:
    return [self.tokenizer.decode(t[m > 0], skip_special_tokens=True) for t, m in zip(tokens, mask)]

  def pairs(self, params, prompts: Prompts, reward: Callable, key) -> dict[str, Any]:
    """Two completions per prompt ranked by ``reward``, as DPO pairs with ``params``' stored log-probabilities:
    ``{"chosen", "rejected"}`` sequences, ``ref_chosen``/``ref_rejected`` and ``reward_chosen``/``reward_rejected``
    ``[N]``."""
    samples = [self.sample(params, prompts, jax.random.fold_in(key, i)) for i in range(2)]
    rewards = [np.asarray(reward(self.texts(*s)), np.float32) for s in samples]
    first = rewards[0] >= rewards[1]
    seqs = [response_sequences(prompts, *s) for s in samples]
    pick = lambda a, b: {k: np.where(first[:, None], a[k], b[k]) for k in a}
    out = {"chosen": pick(*seqs), "rejected": pick(*seqs[::-1]),
           "reward_chosen": np.where(first, *rewards), "reward_rejected": np.where(first, *rewards[::-1])}
    out.update(self.reference_logprobs(params, out))
    return out

  def reference_logprobs(self, params, pairs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``{"ref_chosen", "ref_rejected"} [N]`` of ``params`` on pairs (the reference stored with them)."""
    rows = {k: pairs[k] for k in ("chosen", "rejected")}
    return in_batches(lambda b, _: self._ref(params, b), rows, self.score_batch_size)

  def pair_statistics(self, params, pairs: Mapping[str, Any], batch_size: int) -> dict[str, float]:
    """Over the pairs whose rewards differ (a tie prefers neither): the share whose implicit reward ranks the chosen
    response first (``preference_accuracy``: margin Δ > 0), the mean implicit reward margin ``β Δ``
    (``reward_margin``), and the mean ``log π(chosen | prompt)`` (``chosen_logp``)."""
    rows = {k: pairs[k] for k in ("chosen", "rejected", "ref_chosen", "ref_rejected")}
    margins, chosen = in_batches(lambda b, _: self._pair_stats(params, b), rows, batch_size)
    keep = pairs["reward_chosen"] != pairs["reward_rejected"]
    if not keep.any():        # every sampled pair tied: no preference to rank (None, never a NaN)
      return {"preference_accuracy": None, "reward_margin": None, "chosen_logp": float(np.mean(chosen))}
    return {"preference_accuracy": float(np.mean((margins > 0)[keep])),
            "reward_margin": float(self.pref.beta * np.mean(margins[keep])), "chosen_logp": float(np.mean(chosen))}

  def reference_topk(self, params, seqs: Mapping[str, np.ndarray]) -> tuple[np.ndarray, ...]:
    """The stored top-k reference of ``params`` on sequences: (ids, logprobs, log_tail) ``[N, T−1(, k)]``."""
    return in_batches(lambda b, _: self._topk(params, b), dict(seqs), self.score_batch_size)

  def mean_distance(self, params, probe: Mapping[str, Any]) -> float:
    """Mean compressed Bhattacharyya distance to the stored reference (``probe["ref"]``) over the probe's response
    tokens, ``score_batch_size`` sequences at a time."""
    d, m = in_batches(lambda b, _: self._distance(params, b), dict(probe), self.score_batch_size)
    return float(np.sum(d * m) / max(np.sum(m), 1.0))

  def full_logprobs(self, params, texts: Mapping[str, np.ndarray], batch_size: int) -> memory.OnDisk:
    """log π(· | prefix) of ``params`` at every position of ``texts``: ``[N, T−1, V]`` float32, kept on disk (read a
    batch at a time)."""
    stored = memory.OnDisk(self.full_logprobs_shape(params, texts), FULL_LOGPROBS_DTYPE)
    return in_batches(lambda b, _: self._logprobs(params, b), dict(texts), batch_size, into=stored)

  def full_logprobs_shape(self, params, texts: Mapping[str, np.ndarray]) -> tuple[int, ...]:
    """The shape of :meth:`full_logprobs` (from shapes: nothing is computed)."""
    out = jax.eval_shape(self._logprobs, params, {k: v[:1] for k, v in texts.items()})
    return (len(next(iter(texts.values()))), *out.shape[1:])

  def text_statistics(self, params, base, texts: Mapping[str, np.ndarray], batch_size: int) -> dict[str, float]:
    """Perplexity of ``params`` and its per-token KL(π ‖ π_base) on held-out text (teacher-forced); ``base``: the base
    model's weights, or its distributions on ``texts`` (:meth:`full_logprobs`)."""
    if isinstance(base, memory.OnDisk):
      stats = in_batches(lambda b, _: self._text_stats(params, b), {**texts, "base_logprobs": base}, batch_size)
    else:
      stats = in_batches(lambda b, _: self._text_stats(params, {**b, "base_logprobs": self._logprobs(base, b)}),
                         dict(texts), batch_size)
    nll, kl, n = (float(np.sum(s)) for s in stats)
    return {"perplexity": float(np.exp(nll / n)), "kl_to_base": kl / n}


# ---------------------------------------------------------------------------------------------------------------
# Records along a round.


class DriftTracker(runs.Observer):
  """Every ``record_every`` steps: the new round's DPO loss and the mean compressed Bhattacharyya distance of the
  old rounds' token distributions (a probe of each buffer) to those of the network entering the round."""

  def __init__(self, policy: Policy, probes: Mapping[str, Mapping], to_model: Callable, record_every: int,
               step_offset: int = 0):
    self.policy, self.probes, self.to_model, self.every = policy, probes, to_model, record_every
    self.offset, self.rows = step_offset, []

  def observe(self, state, row, last):
    if self.probes and state is not None:
      params = self.to_model(state.train_params)
      d = np.mean([self.policy.mean_distance(params, p) for p in self.probes.values()])
      self.rows.append({"step": self.offset + row["step"], "new_loss": row["new_loss"], "distance": float(d)})

  def dump(self):
    return self.rows

  def restore(self, state):
    self.rows = list(state)


# ---------------------------------------------------------------------------------------------------------------
# The runner.


class AlignmentRunner(stages_lib.StageLoop):
  """Learns ``rounds`` in order with any method; see the module docstring.

  Args:
    graphdef, tokenizer, family: the causal LM and its family's module (its weights entering the first round are
      passed to :meth:`run_all`).
    rounds: the rounds in order (at least two).
    held_out_text: right-padded ``{"input_ids", "attention_mask"}`` for perplexity and KL to the base model
      (None: neither is measured, and the base model is not kept).
    pref: pairs, DPO and stored references.
    first_method: how the first round is learnt, a method with no old rounds (``dpo`` or ``lora-dpo``), shared by
      every method run.
    **kw: :class:`fipjax.stages.StageLoop`'s (first: round 1's length, stages: later rounds' length and buffers).
  """
  stage_word = "round"
  kind = results_lib.ALIGNMENT.kind

  def __init__(self, graphdef, tokenizer, rounds: Sequence[Round], held_out_text: Mapping[str, np.ndarray] | None,
               *, pref: PreferenceConfig, family=llama, first_method: str = "dpo", **kw):
    super().__init__(**kw)
    if len(rounds) < 2 or len({r.name for r in rounds}) != len(rounds):
      raise ValueError(f"continual alignment needs at least two rounds with distinct names, got "
                       f"{[r.name for r in rounds]}")
    self.check_rows({r.name: len(r.prompts["train"]) for r in rounds}, "prompts")
    for r in rounds:
      if len(r.prompts["train"]) < self.stages.replay_batch_size:
        raise runs.UsageError(f"round {r.name} keeps at most {len(r.prompts['train'])} pairs for replay, fewer "
                              f"than --stages.replay-batch-size {self.stages.replay_batch_size}; lower it.")
    self.rounds, self.held_out, self.base, self.pref = tuple(rounds), held_out_text, None, pref
    self.first_method = continual.parse_name(first_method, on_preferences=True)
    self.stage_names = tuple(r.name for r in rounds)
    self.policy = Policy(graphdef, tokenizer, pref, family, score_batch_size=self.run.eval_batch_size)
    self.task_loss = self._pair_loss()

  def _pair_loss(self) -> continual.TaskLoss:
    loss = dpo.task_loss(self.policy.apply, beta=self.pref.beta, kind=self.pref.loss,
                         label_smoothing=self.pref.label_smoothing, rpo_alpha=self.pref.rpo_alpha)
    return lambda params, batch, rng=None: loss(params, batch["inputs"])

  # -- pairs and evaluation ---------------------------------------------------------------------------------------

  def pairs(self, params, k: int, split: str) -> dict:
    """Round k's pairs on its ``split`` prompts with the log-probabilities of the policy ``params`` entering it:
    its own pairs, or two completions sampled from ``params`` and ranked by its reward (cached by its weights)."""
    rnd, prompts = self.rounds[k], self.rounds[k].prompts[split]
    key = jax.random.fold_in(jax.random.PRNGKey(self.seed), 1000 * k + {"train": 0, "val": 1, "test": 2}[split])

    def compute(_):
      if rnd.pairs is not None:
        given = dict(rnd.pairs[split])
        return {**given, **self.policy.reference_logprobs(params, given)}, {}
      runs.log(f"round {k + 1} ({rnd.name}): sampling 2 × {len(prompts)} {split} completions")
      return self.policy.pairs(params, prompts, rnd.reward, key), {}

    parts = {"round": rnd.name, "split": split, "prompts": data.digest_arrays(*prompts), "reward": rnd.reward_id,
             "policy": self.digest(params) if self.cache is not None else None, "pref": pair_key(self.pref),
             "seed": self.seed}
    with self.timings.phase("pairs"):
      return self.cached(f"pairs-{rnd.name}-{split}", parts, compute)[0]

  def evaluate(self, params, held_out_pairs: Mapping[str, dict], split: str = "test") -> dict:
    """Each round's mean reward on its ``split`` prompts (``pref.eval_samples`` sampled completions each, the same
    keys for every policy; None for a round without a reward); on the held-out pairs given, each round's preference
    accuracy, implicit reward margin and chosen log-probability (:meth:`Policy.pair_statistics`; None for rounds not yet
    entered); KL to base and perplexity on the held-out text."""
    with self.timings.phase(f"eval_{split}"):
      rewards = []
      for j, rnd in enumerate(self.rounds):
        key = jax.random.fold_in(jax.random.PRNGKey(self.seed + 7), j)
        # Sample 0 keeps the key of one-sample evaluations, so eval_samples 1 is the earlier number exactly.
        keys = [key] + [jax.random.fold_in(key, 1 + k) for k in range(self.pref.eval_samples - 1)]
        rewards.append(None if rnd.reward is None or split not in rnd.prompts else float(np.mean([rnd.reward(
            self.policy.texts(*self.policy.sample(params, rnd.prompts[split], k))) for k in keys])))
      out = {"reward": rewards}
      if split == "test":
        stats = {name: self.policy.pair_statistics(params, pairs, self.run.eval_batch_size)
                 for name, pairs in held_out_pairs.items()}
        for column in ("preference_accuracy", "reward_margin", "chosen_logp"):
          out[column] = [stats[r.name][column] if r.name in stats else None for r in self.rounds]
        if self.held_out is not None:
          out.update(self.policy.text_statistics(params, self.base, self.held_out, self.run.eval_batch_size))
    return out

  # -- training ----------------------------------------------------------------------------------------------------

  def _batches(self, pairs: dict, seed: int, buffers: Mapping[str, data.ReplayBuffer] | None):
    """:meth:`batches` of the DPO pairs (the step's inputs: sequences and their stored reference log-probabilities)."""
    rows = data.Arrays({k: pairs[k] for k in ("chosen", "rejected", "ref_chosen", "ref_rejected")},
                       np.zeros(len(pairs["ref_chosen"]), np.int32))
    return self.batches(rows, seed, buffers)

  def _train(self, method, params, pairs, steps, seed, ckpt_dir, buffers=None, observer=None, name="",
             on_compiled=None):
    return self.train(method, params, self._batches(pairs, seed, buffers if method.needs_replay else None), steps,
                      seed, ckpt_dir, observer, name, data_key={"pairs": data.digest_arrays(*jax.tree.leaves(pairs)),
                                                                "pref": pair_key(self.pref)}, on_compiled=on_compiled)

  def first_stage(self, base_params: PyTree) -> tuple[PyTree, dict, list[dict], dict]:
    """(the policy after DPO on the first round, ``{round: training pairs}`` of the rounds learnt, the evaluation
    rows of the base model and of that policy, ``{round: held-out pairs}``); the policy trained once per key.
    Nothing here keeps ``base_params`` afterwards (:meth:`remember_base`)."""
    self.remember_base(base_params)
    pairs = self.pairs(base_params, 0, "train")
    steps = self.first_steps(len(pairs["ref_chosen"]))
    ctx = continual.StageContext(self.task_loss, {}, base_params, None, (), self.seed)
    try:
      method = continual.build(self.first_method, ctx, self.hp, self.optim, steps)
    except ValueError as e:
      raise runs.UsageError(str(e)) from None
    name = f"round 1 ({self.rounds[0].name})"

    def compute(ckpt_dir):
      runs.log(f"{name}: DPO for {steps} steps on {len(pairs['ref_chosen'])} pairs")
      with self.timings.phase("round1"):
        params, history, _ = self._train(method, base_params, pairs, steps, self.seed, ckpt_dir, name=name)
      return params, {"history": history}

    parts = {"init": self.digest(base_params) if self.cache is not None else None, "method": str(self.first_method),
             "pairs": data.digest_arrays(*jax.tree.leaves(pairs)), "optim": cf.to_dict(self.optim),
             "first": cf.to_dict(self.first), "pref": pair_key(self.pref), "seed": self.seed}
    params, _ = self.cached("round1", parts, compute, template=base_params, label=name)
    held_out = {self.rounds[0].name: self.pairs(base_params, 0, "test")}
    rows01 = self._first_rows(base_params, params, held_out, parts)
    if any(x is not None for x in rows01[1]["reward"]):
      runs.log("round 1: reward " + ", ".join(f"{r.name} {a:.3f} → {b:.3f}" for r, a, b in
                                              zip(self.rounds, rows01[0]["reward"], rows01[1]["reward"])
                                              if b is not None))
    if (accuracy := rows01[1]["preference_accuracy"][0]) is not None:
      runs.log(f"round 1: preference accuracy on its test pairs {accuracy:.3f}")
    return params, {self.rounds[0].name: pairs}, rows01, held_out

  def _first_rows(self, base_params, params, held_out: Mapping[str, dict], round1_key: dict) -> list[dict]:
    """The evaluation rows of the base model and of the round-1 policy, cached with that policy's key and everything
    the evaluation reads: every method and run with the same key gets the same rows, and a cached round 1 never
    samples from the base model again (its weights beside the policy's were the peak of a cached LoRA run)."""
    key = {**round1_key, "rows": {
        "rounds": [(r.name, r.reward_id, {s: data.digest_arrays(*p) for s, p in r.prompts.items()})
                   for r in self.rounds],
        "held_out_pairs": data.digest_arrays(*jax.tree.leaves(held_out)),
        "held_out_text": None if self.held_out is None else data.digest_arrays(*jax.tree.leaves(self.held_out)),
        "eval_samples": self.pref.eval_samples, "eval_batch_size": self.run.eval_batch_size}}
    # orbax saves no empty tree: a one-byte marker beside the rows (the entry's meta)
    compute = lambda _: ({"evaluated": np.ones(1, np.int8)},
                         {"rows": [self.evaluate(base_params, {}), self.evaluate(params, held_out)]})
    return self.cached("round1-rows", key, compute)[1]["rows"]

  def remember_base(self, base_params: PyTree) -> None:
    """What later evaluations need of the base model for KL to base on the held-out text (``self.base``): its
    distributions there, kept on disk and read a batch at a time by each evaluation, where they take fewer bytes
    than its weights (``N·(T−1)·V·4``: the cpu preset's 48 texts of 48 tokens are 0.44 GB against SmolLM2-135M's
    0.54 GB; the paper preset's 400 texts of 64 tokens would be 4.9 GB), else the weights; nothing without held-out
    text. A caller that drops its own reference to ``base_params`` then frees them."""
    if self.held_out is None:
      self.base = None
    elif (np.prod(self.policy.full_logprobs_shape(base_params, self.held_out)) * np.dtype(FULL_LOGPROBS_DTYPE).itemsize
          < tu.tree_bytes(base_params)):
      self.base = self.policy.full_logprobs(base_params, self.held_out, self.run.eval_batch_size)
    else:
      self.base = base_params

  def describe(self) -> dict:
    return {"rewards": {r.name: r.reward_id for r in self.rounds}}

  def _old_rounds(self, params, old_pairs: Mapping[str, dict], k: int):
    """(OldTask per earlier round, its replay buffer, its anchor sequences with their references, the bytes of the
    stored top-k references): each buffer holds pairs with their own reference log-probabilities and anchor sequences
    (``--dpo.anchor``) with the top-k distributions of ``params`` (the policy entering round k) at every position."""
    olds, buffers, anchored, stored = {}, {}, {}, 0
    for j, (name, pairs) in enumerate(old_pairs.items()):
      n = len(pairs["ref_chosen"])
      idx = np.sort(np.random.default_rng([self.seed, 11 + j]).choice(n, size=min(self.stages.buffer_size, n),
                                                                      replace=False))
      rows = jax.tree.map(lambda a: a[idx], {k_: pairs[k_] for k_ in ("chosen", "rejected", "ref_chosen",
                                                                         "ref_rejected")})
      rows["anchor"] = self._anchors(params, rows["chosen"], k, j)
      rows["ref"] = self.policy.reference_topk(params, rows["anchor"])
      stored += tu.tree_bytes(rows["ref"])
      buffers[name] = data.ReplayBuffer(data.Arrays(rows, np.zeros(len(idx), np.int32)), None, seed=self.seed + j)
      anchored[name] = {**rows["anchor"], "ref": rows["ref"]}
      olds[name] = continual.OldTask(
          fip_outputs(self.policy.apply), fip_outputs(self.policy.apply), self.task_loss,
          lambda m, rows=rows: jax.tree.map(lambda a: a[:m], rows), reference_distance=self._reference_distance)
    return olds, buffers, anchored, stored

  def _held_out_anchors(self, params, k: int, size: int) -> dict[str, dict]:
    """Per earlier round: a completion sampled from ``params`` (the policy entering round k) to each of its first
    ``size`` test prompts, with ``params``' top-k references: where the round-k change of the old rounds' token
    distributions is measured on prompts no method trained or anchored on."""
    out = {}
    for j, rnd in enumerate(self.rounds[:k]):
      prompts = Prompts(*(a[:size] for a in rnd.prompts["test"]))
      key = jax.random.fold_in(jax.random.PRNGKey(self.seed), 1000 * k + 500 + j)
      with self.timings.phase("anchors"):
        seqs = self.policy.completions(params, prompts, key)
        out[rnd.name] = {**seqs, "ref": self.policy.reference_topk(params, seqs)}
    return out

  def old_round_distance(self, params, anchored: Mapping[str, dict], held_out: Mapping[str, dict]) -> dict:
    """The mean compressed Bhattacharyya distance of ``params``' token distributions to those of the policy entering
    the round, over the earlier rounds: on their buffered anchor sequences (``buffer``: what FIP's penalty holds) and
    on completions to their unseen test prompts (``held_out``: whether holding the buffer generalises)."""
    mean = lambda probes: float(np.mean([self.policy.mean_distance(params, p) for p in probes.values()]))
    return {"buffer": mean(anchored), "held_out": mean(held_out)}

  def _anchors(self, params, chosen: Mapping[str, np.ndarray], k: int, j: int) -> dict[str, np.ndarray]:
    """Round j's anchor sequences entering round k: its buffered chosen sequences, or (``--dpo.anchor policy``) a
    completion of each one's prompt sampled from ``params``."""
    if self.pref.anchor == "chosen":
      return dict(chosen)
    n = self.pref.prompt_tokens
    prompts = Prompts(chosen["input_ids"][:, :n], chosen["attention_mask"][:, :n])
    key = jax.random.fold_in(jax.random.PRNGKey(self.seed), 1000 * k + 100 + j)
    with self.timings.phase("anchors"):
      return self.policy.completions(params, prompts, key)

  def _reference_distance(self, params, batch, distance: str) -> jax.Array:
    if distance not in sequences.DISTANCES:
      raise ValueError(f"--fip.distance {distance} has no compressed form for token distributions; choose one of "
                       f"{', '.join(sequences.DISTANCES)}")
    seq = {**batch["inputs"]["anchor"], "ref": batch["inputs"]["ref"]}
    return sequences.fip_penalty(self.policy.apply, beta=1.0, distance=distance)(params, seq)

  # -- the stage loop's hooks ----------------------------------------------------------------------------------------

  def start(self, first) -> stages_lib.StageState:
    params, pairs, rows, held_out = first
    log = {"rows": list(rows), "history": [], "drift": [], "steps": [], "peaks": [], "stored": [], "train_s": 0.0}
    return stages_lib.StageState(params, dict(pairs), log, {"first": params, "held_out": dict(held_out)})

  def enter(self, k, state):
    """Round k's training and test pairs from the policy entering it (cached: a resumed run draws the same)."""
    state.scratch["pairs"] = self.pairs(state.params, k, "train")
    if self.rounds[k].name not in state.scratch["held_out"]:
      state.scratch["held_out"][self.rounds[k].name] = self.pairs(state.params, k, "test")

  def restored(self, k, state, memory, meta):
    state.memory[self.rounds[k].name] = state.scratch["pairs"]

  def stage(self, name, k, state, ckpt_dir):
    rnd, pairs, log = self.rounds[k], state.scratch["pairs"], state.log
    olds, buffers, anchored, stored_bytes = self._old_rounds(state.params, state.memory, k)
    probes = {n: jax.tree.map(lambda a: a[:self.run.probe_size], rows) for n, rows in anchored.items()}
    held_out = self._held_out_anchors(state.params, k, max(len(r["input_ids"]) for r in anchored.values()))
    ctx = continual.StageContext(self.task_loss, olds, state.params, None, (), self.seed)
    steps = self.stage_steps(len(pairs["ref_chosen"]))
    try:
      parsed = continual.parse_name(name, on_preferences=True)
      method = continual.build(parsed, ctx, self.hp, self.optim, steps)
    except ValueError as e:
      raise runs.UsageError(str(e)) from None
    peaks = []      # the training step's own compiled program (no second compilation to measure it)
    log["stored"].append(stored_bytes if parsed.spec.replays(self.hp) == "outputs" else 0)
    tracker = DriftTracker(self.policy, probes, method.to_model, self.run.record_every, len(log["history"]))
    runs.log(f"round {k + 1} ({name}): {steps} steps on {len(pairs['ref_chosen'])} {rnd.name} pairs")
    t_train = time.perf_counter()
    start = state.params
    state.params, hist, _ = self._train(method, state.params, pairs, steps, self.seed + 100 * k, ckpt_dir, buffers,
                                        tracker, name=f"{name} ({rnd.name})",
                                        on_compiled=lambda c: peaks.append(continual.peak_bytes(c)))
    if not peaks:           # no step ran here (a cached fine-tuning): the step compiled from shapes alone
      batches = self._batches(pairs, self.seed + 100 * k, buffers if method.needs_replay else None)
      peaks.append(continual.step_peak_bytes(method, start, next(batches(0))))
    log["peaks"].append(peaks[0])
    log["train_s"] += time.perf_counter() - t_train
    log["steps"].append(steps)
    log["history"] += hist
    log["drift"] += [{**r, "round": k + 1} for r in tracker.rows]
    log["rows"].append(self.evaluate(state.params, state.scratch["held_out"]))
    log.setdefault("distance", []).append(self.old_round_distance(state.params, anchored, held_out))
    state.memory[rnd.name] = pairs

  def result(self, name, state):
    names, rows, log, params = list(self.stage_names), state.log["rows"], state.log, state.params
    column = lambda key: [r.get(key) for r in rows]          # row 0: the base model; row i: after round i
    reward, accuracy = column("reward"), column("preference_accuracy")
    drop = lambda m, j: None if m[j + 1][j] is None or m[-1][j] is None else float(m[j + 1][j] - m[-1][j])
    return {
        "rounds": names,
        "reward_matrix": reward,
        "preference_accuracy_matrix": accuracy,
        "reward_margin_matrix": column("reward_margin"),
        "chosen_logp_matrix": column("chosen_logp"),
        "forgetting": [drop(accuracy, j) for j in range(len(names) - 1)],
        "kl_to_base": column("kl_to_base"),
        "perplexity": column("perplexity"),
        "reward_forgetting": [drop(reward, j) for j in range(len(names) - 1)],
        "validation_reward": dict(zip(names, self.evaluate(params, {}, "val")["reward"])),
        "weight_change": continual.fractional_weight_change(params, state.scratch["first"]),
        "steps": log["steps"],
        "train_time_s": log["train_s"],            # the training loops (a round resumed mid-way: its resumed part)
        "wall_time_s": state.scratch["wall_time_s"],      # this process: pairs, references, evaluations included
        "peak_step_memory_bytes": max(log["peaks"]),
        "stored_reference_bytes": int(max(log["stored"])),
        "final_loss": log["history"][-1]["loss"],
        "loss_curve": [r["loss"] for r in log["history"]],
        **continual.solver_curves(log["history"]),
        "drift": {k_: [r[k_] for r in log["drift"]] for k_ in ("step", "distance", "new_loss")},
        "old_round_distance": log.get("distance", []),      # after each later round (round 2 on)
    }

  def summary(self, name, result):
    names, t = result["rounds"], len(result["rounds"])
    key = "reward_matrix" if result["reward_matrix"][1][0] is not None else "preference_accuracy_matrix"
    m = result[key]
    kl = result["kl_to_base"][-1]
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"
    return (f"{name}: {key.replace('_matrix', '').replace('_', ' ')} after its round → after round {t}: " +
            ", ".join(f"{n} {fmt(m[j + 1][j])} → {fmt(m[-1][j])}" for j, n in enumerate(names)
                      if m[j + 1][j] is not None)
            + ("" if kl is None else f"; KL to base {kl:.4f}") + _distance_summary(result)
            + continual.solver_summary(result))


def _distance_summary(result: dict) -> str:
  d = (result.get("old_round_distance") or [None])[-1]
  return "" if d is None else f"; old rounds' distance buffer {d['buffer']:.4f}, held-out {d['held_out']:.4f}"
