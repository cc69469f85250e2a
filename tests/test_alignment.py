"""Continual alignment's pieces: prompts, batching, pairs ranked by a reward with their stored reference
log-probabilities, held-out statistics, and FIP for token distributions through the method registry."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fipjax import alignment, continual, dpo, sequences
from fipjax import config as cf
from fipjax.models import llama

VOCAB = 61


class Tokenizer:
  """Whitespace-separated integers: enough of a tokenizer for the policy's bookkeeping."""
  pad_token_id, eos_token_id = 0, 1

  def __call__(self, texts):
    return {"input_ids": [[int(w) for w in t.split()] for t in texts]}

  def decode(self, ids, skip_special_tokens=True):
    return " ".join(str(int(i)) for i in ids if not (skip_special_tokens and i in (0, 1)))


@pytest.fixture(scope="module")
def policy():
  cfg = llama.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
  graphdef, params = llama.split_params(llama.LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)))
  pref = alignment.PreferenceConfig(prompt_tokens=4, response_tokens=5, top_k=8, generate_batch_size=3)
  return alignment.Policy(graphdef, Tokenizer(), pref), params


def test_prompts_keep_the_first_tokens_left_padded_and_texts_right_padded():
  p = alignment.encode_prompts(["5 6 7 8 9", "3 4"], Tokenizer(), 4)
  np.testing.assert_array_equal(p.input_ids, [[5, 6, 7, 8], [0, 0, 3, 4]])
  np.testing.assert_array_equal(p.attention_mask, [[1, 1, 1, 1], [0, 0, 1, 1]])
  t = alignment.encode_texts(["5 6 7 8 9", "3 4"], Tokenizer(), 4)
  np.testing.assert_array_equal(t["input_ids"], [[5, 6, 7, 8], [3, 4, 0, 0]])
  np.testing.assert_array_equal(t["attention_mask"], [[1, 1, 1, 1], [1, 1, 0, 0]])


def test_in_batches_equals_one_call_and_compiles_one_shape():
  rows = {"x": np.arange(14.0).reshape(7, 2)}
  shapes = set()

  def fn(b, i):
    shapes.add(b["x"].shape)
    return {"y": b["x"].sum(-1), "i": np.full(len(b["x"]), i)}

  out = alignment.in_batches(fn, rows, 3)
  np.testing.assert_array_equal(out["y"], rows["x"].sum(-1))
  np.testing.assert_array_equal(out["i"], [0, 0, 0, 1, 1, 1, 2])
  assert shapes == {(3, 2)}


def test_method_names_map_to_the_registry():
  names = ("dpo", "lora-dpo", "replay-dpo", "fip-dpo", "lora-fip-dpo")
  parsed = [continual.parse_name(m, on_preferences=True) for m in names]
  assert [(p.method, p.in_lora) for p in parsed] == [("naive", False), ("naive", True), ("replay", False),
                                                      ("fip", False), ("fip", True)]
  assert [str(p) for p in parsed] == list(names) and all(p.on_preferences for p in parsed)
  with pytest.raises(ValueError, match="named <method>-dpo"):
    continual.parse_name("fip", on_preferences=True)


def test_pairs_are_ranked_by_the_reward_and_store_the_policy_log_probabilities(policy):
  pol, params = policy
  prompts = alignment.encode_prompts(["5 6 7", "8 9 10 11 12", "13", "14 15", "16 17 18"], Tokenizer(), 4)
  reward = lambda texts: np.array([sum(int(w) for w in t.split()) for t in texts], np.float32)   # token id sum
  pairs = pol.pairs(params, prompts, reward, jax.random.PRNGKey(0))
  assert (pairs["reward_chosen"] >= pairs["reward_rejected"]).all()
  assert (pairs["reward_chosen"] > pairs["reward_rejected"]).any()
  for side in ("chosen", "rejected"):
    seq = pairs[side]
    chex.assert_shape(seq["input_ids"], (5, 9))
    np.testing.assert_array_equal(seq["input_ids"][:, :4], prompts.input_ids)       # the prompt, then the response
    np.testing.assert_array_equal(seq["response_mask"][:, :4], 0)
    np.testing.assert_array_equal(seq["response_mask"][:, 4:], seq["attention_mask"][:, 4:])
    texts = pol.texts(seq["input_ids"][:, 4:], seq["response_mask"][:, 4:])
    np.testing.assert_allclose(reward(texts), pairs[f"reward_{side}"])
    logp = dpo.sequence_logprob(pol.apply(params, seq), seq)
    np.testing.assert_allclose(pairs[f"ref_{side}"], logp, rtol=1e-5, atol=1e-5)
  # At the reference policy every implicit margin is zero: nothing is preferred yet.
  margins = jax.jit(lambda p, b: dpo.implicit_margins(pol.apply, p, b))(params, pairs)
  np.testing.assert_allclose(margins, 0.0, atol=1e-4)


def test_held_out_statistics(policy):
  pol, params = policy
  texts = alignment.encode_texts(["5 6 7 8 9 10", "3 4", "11 12 13"], Tokenizer(), 6)
  base = pol.full_logprobs(params, texts, batch_size=2)        # the base model's distributions, not its weights
  same = pol.text_statistics(params, base, texts, batch_size=2)
  assert abs(same["kl_to_base"]) < 1e-6
  logits = pol.apply(params, texts)
  m = texts["attention_mask"][:, 1:]
  nll = -np.sum(np.asarray(llama.token_logprobs(logits, texts["input_ids"])) * m) / m.sum()
  np.testing.assert_allclose(same["perplexity"], np.exp(nll), rtol=1e-5)
  other = jax.tree.map(lambda a: a * 1.1, params)
  # KL(π ‖ π_base) per token from both models' logits in float64, independently of the stored distributions.
  logp, logq = (np.asarray(jax.nn.log_softmax(np.asarray(pol.apply(p, texts), np.float64)[:, :-1], -1))
                for p in (other, params))
  kl = np.sum(np.sum(np.exp(logp) * (logp - logq), -1) * m) / m.sum()
  got = pol.text_statistics(other, base, texts, batch_size=2)["kl_to_base"]
  assert got > 1e-4
  np.testing.assert_allclose(got, kl, rtol=1e-4)
  # The base model given by its weights rather than its stored distributions: the same numbers.
  from_weights = pol.text_statistics(other, params, texts, batch_size=2)
  np.testing.assert_allclose(from_weights["kl_to_base"], got, rtol=1e-5)
  assert base.shape == pol.full_logprobs_shape(params, texts) and base.dtype == np.float32
  np.testing.assert_allclose(base[:], jax.nn.log_softmax(pol.apply(params, texts)[:, :-1], -1), atol=1e-5)


def test_fip_on_token_distributions_through_the_registry(policy):
  """The registry's fip uses an old task's reference_distance when it has one: zero with zero gradient at the
  reference, positive away from it, and equal to the compressed Bhattacharyya penalty (inside LoRA at
  --lora-beta)."""
  pol, params = policy
  prompts = alignment.encode_prompts(["5 6 7", "8 9 10 11", "13", "14 15"], Tokenizer(), 4)
  seqs = alignment.response_sequences(prompts, *pol.sample(params, prompts, jax.random.PRNGKey(1)))
  rows = {"anchor": seqs, "ref": pol.reference_topk(params, seqs)}
  distance = lambda p, b, d: sequences.fip_penalty(pol.apply, beta=1.0, distance=d)(
      p, {**b["inputs"]["anchor"], "ref": b["inputs"]["ref"]})
  old = continual.OldTask(alignment.fip_outputs(pol.apply), alignment.fip_outputs(pol.apply), None,
                          lambda n: rows, reference_distance=distance)
  task = lambda p, b, rng=None: jnp.sum(p["model"]["norm"]["scale"] ** 2)
  ctx = continual.StageContext(task, {"old": old}, params, None, (), 0)
  method = continual.build("fip", ctx, cf.with_values(continual.MethodConfig(), {"fip.beta": 3.0}),
                           continual.OptimConfig())
  batch = {"replay": {"old": {"inputs": rows}}}
  value, grads = jax.value_and_grad(lambda p: method.replay_loss(p, batch)[0])(params)
  assert abs(float(value)) < 1e-6
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads)) < 1e-5
  moved = jax.tree.map(lambda a: a * 1.2, params)
  expected = 3.0 * sequences.fip_penalty(pol.apply, beta=1.0)(moved, {**seqs, "ref": rows["ref"]})
  np.testing.assert_allclose(method.replay_loss(moved, batch)[0], expected, rtol=1e-6)
  assert float(expected) > 0
  hp = cf.with_values(continual.MethodConfig(), {"fip.beta": 3.0, "lora.fip.beta": 0.5,   # LoRA's own weight
                                                 "lora.targets": llama.LORA_TARGETS[0]})
  in_lora = continual.build("lora-fip", ctx, hp, continual.OptimConfig())
  np.testing.assert_allclose(in_lora.replay_loss(moved, batch)[0], expected / 6, rtol=1e-6)


def test_geodesic_direction_through_token_distributions_keeps_old_outputs(policy):
  """G pulled back through the old rounds' next-token distributions (fip_outputs): a step along
  (G + λI)⁻¹ ∇L_new moves the old distributions far less than a gradient step of the same length."""
  from fipjax import paths
  from fipjax import tree as tu
  pol, params = policy
  old = alignment.encode_prompts(["5 6 7", "8 9 10 11"], Tokenizer(), 4)
  old_rows = {"anchor": alignment.response_sequences(old, *pol.sample(params, old, jax.random.PRNGKey(2)))}
  probe = {**old_rows["anchor"], "ref": pol.reference_topk(params, old_rows["anchor"])}
  new = alignment.encode_texts(["20 21 22 23 24 25 26", "30 31 32 33 34 35 36"], Tokenizer(), 7)
  grads = jax.grad(lambda p: -jnp.mean(llama.token_logprobs(pol.apply(p, new), new["input_ids"])))(params)
  transform = paths.geodesic_direction(alignment.fip_outputs(pol.apply), damping=1e-4, cg_iters=50)
  direction, _ = jax.jit(lambda g, p, x: transform.update(g, transform.init(p), p, ref_inputs=x))(
      grads, params, old_rows)
  step = lambda d: tu.tree_axpy(-0.1 / float(tu.tree_norm(d)), d, params)
  drift_geodesic = pol.mean_distance(step(direction), probe)
  drift_gradient = pol.mean_distance(step(grads), probe)
  assert drift_geodesic < 0.1 * drift_gradient, (drift_geodesic, drift_gradient)


def tiny_runner(pol, n_rounds, pref=None, **kwargs):
  """A runner of ``n_rounds`` rounds on 12 short prompts, each preferring completions with more of one digit."""
  from fipjax import streams
  texts = [" ".join(str(2 + (7 * i + j) % 58) for j in range(3 + i % 3)) for i in range(12)]
  reward = lambda digit: (lambda out: np.array([t.count(digit) for t in out], np.float32))
  rounds = [alignment.Round(f"r{k}", {s: alignment.encode_prompts(texts, Tokenizer(), 4)
                                      for s in ("train", "val", "test")}, reward(str(k + 3)), {"digit": k + 3})
            for k in range(n_rounds)]
  sections = streams.StreamConfig(
      optim=continual.OptimConfig(lr=1e-2, batch_size=4, dropout=False),
      first=streams.FirstStageConfig(steps=2),
      stages=streams.StageConfig(steps=3, replay_batch_size=2, buffer_size=6),
      run=streams.RunConfig(eval_batch_size=4, checkpoint_every=1, record_every=1, probe_size=2))
  return alignment.AlignmentRunner(pol.graphdef, Tokenizer(), rounds, alignment.encode_texts(texts[:4], Tokenizer(), 6),
                                   **sections.runner_args(), pref=pref or pol.pref, model_key={"tiny": 1},
                                   progress=False, **kwargs)


def test_the_runner_keeps_the_base_models_statistics_not_its_weights(policy, tmp_path):
  """After the first stage nothing in the runner holds the base model's weights (its held-out distributions are kept
  for KL to base, a weak reference remembers its digest), so a caller that drops them frees them."""
  import gc
  import weakref
  from fipjax import runs
  pol, params = policy
  runner = tiny_runner(pol, 2, cache=runs.StageCache(tmp_path / "cache"))
  base = jax.tree.map(jnp.copy, params)
  alive = weakref.ref(jax.tree.leaves(base)[0])
  first = runner.first_stage(base)
  assert first[2][1]["kl_to_base"] > 0 and first[2][0]["kl_to_base"] == pytest.approx(0.0, abs=1e-6)
  del base
  gc.collect()
  assert alive() is None


def test_the_first_stages_evaluation_rows_are_cached_with_its_policy(policy, tmp_path):
  """A second first stage with the same cache reads the base model's and the round-1 policy's evaluation rows
  rather than sampling again; a change the evaluation reads (more samples per prompt) evaluates anew."""
  from fipjax import runs
  pol, params = policy
  cache = runs.StageCache(tmp_path / "cache")
  first = tiny_runner(pol, 2, cache=cache).first_stage(params)
  again = tiny_runner(pol, 2, cache=cache)
  again.evaluate = lambda *a, **k: pytest.fail("evaluated again")
  assert again.first_stage(params)[2] == first[2]
  more = dataclasses.replace(pol.pref, eval_samples=2)
  calls = []
  other = tiny_runner(pol, 2, cache=cache, pref=more)
  real = other.evaluate
  other.evaluate = lambda *a, **k: calls.append(1) or real(*a, **k)
  other.first_stage(params)
  assert len(calls) == 2


def test_three_rounds_resume_after_a_kill_in_the_last_round(policy, tmp_path):
  """The runner is not bound to two rounds: three rounds with replay-dpo, killed in round 3 (after round 2's
  checkpoint), resume to the uninterrupted run's numbers."""
  from fipjax import runs
  pol, params = policy

  def run(out, stop_after=None):
    runner = tiny_runner(pol, 3, cache=runs.StageCache(out / "cache"), stop_after=stop_after)
    run_dir, _ = runs.RunDir.open(out / "run", {"test": 1})
    return runner.run_all(["replay-dpo"], params, run_dir)["methods"]["replay-dpo"]

  whole = run(tmp_path / "whole")
  with pytest.raises(KeyboardInterrupt):
    run(tmp_path / "killed", stop_after=2 + 3 + 2)      # round 1, round 2, two steps of round 3
  assert (tmp_path / "killed" / "run" / "checkpoints" / "replay-dpo" / "after_round2").exists()
  resumed = run(tmp_path / "killed")
  assert whole["rounds"] == ["r0", "r1", "r2"] and np.array(whole["reward_matrix"]).shape == (4, 3)
  assert whole["steps"] == [3, 3] and len(whole["loss_curve"]) == 6
  for key in ("loss_curve", "reward_matrix", "kl_to_base", "reward_forgetting"):
    np.testing.assert_allclose(resumed[key], whole[key], rtol=1e-5, err_msg=key)


@pytest.mark.parametrize("anchor", alignment.ANCHORS)
def test_fip_anchors_are_the_chosen_completions_or_the_entering_policys_own(policy, anchor):
  """The buffer's anchor sequences share the buffered pairs' prompts; with 'policy' their completions are sampled
  from the policy entering the round, whose top-k distributions on them are the stored reference."""
  pol, params = policy
  runner = tiny_runner(pol, 2, dataclasses.replace(pol.pref, anchor=anchor))
  pairs = runner.policy.pairs(params, runner.rounds[0].prompts["train"], runner.rounds[0].reward,
                              jax.random.PRNGKey(3))
  entering = jax.tree.map(lambda a: a * 1.1, params)
  olds, buffers, probes, stored = runner._old_rounds(entering, {"r0": pairs}, 1)
  rows = olds["r0"].buffer_inputs(6)
  chex.assert_shape(rows["anchor"]["input_ids"], rows["chosen"]["input_ids"].shape)
  np.testing.assert_array_equal(rows["anchor"]["input_ids"][:, :4], rows["chosen"]["input_ids"][:, :4])
  same = [np.array_equal(rows["anchor"][k], rows["chosen"][k]) for k in rows["chosen"]]
  if anchor == "chosen":
    assert all(same)
  else:
    assert not all(same)
    prompts = alignment.Prompts(rows["chosen"]["input_ids"][:, :4], rows["chosen"]["attention_mask"][:, :4])
    again = pol.sample(entering, prompts, jax.random.fold_in(jax.random.PRNGKey(runner.seed), 1100))
    np.testing.assert_array_equal(rows["anchor"]["input_ids"][:, 4:], again[0])
  for got, want in zip(rows["ref"], pol.reference_topk(entering, rows["anchor"])):
    np.testing.assert_array_equal(got, want)
  assert pol.mean_distance(entering, probes["r0"]) < 1e-6 < pol.mean_distance(params, probes["r0"])
  assert stored == sum(a.nbytes for a in rows["ref"])
  # the held-out anchors: completions sampled from the entering policy to the old round's first test prompts
  held = runner._held_out_anchors(entering, 1, 3)["r0"]
  test = runner.rounds[0].prompts["test"]
  np.testing.assert_array_equal(held["input_ids"][:, :4], test.input_ids[:3])
  assert pol.mean_distance(entering, held) < 1e-6 < pol.mean_distance(params, held)


def test_pairs_and_the_first_round_are_cached_without_the_buffer_only_options(policy):
  pol, _ = policy
  key = alignment.pair_key(pol.pref)
  assert alignment.pair_key(dataclasses.replace(pol.pref, anchor="policy", top_k=3)) == key
  assert alignment.pair_key(dataclasses.replace(pol.pref, temperature=0.5)) != key


def test_interp_dpo_is_the_round_1_policy_at_0_and_dpo_at_1(policy, tmp_path):
  """Weight interpolation on preference rounds: α = 0 keeps the policy entering round 2, α = 1 is DPO's, exactly."""
  from fipjax import runs
  pol, params = policy
  results = {}
  for alpha in (0.0, 1.0):
    runner = tiny_runner(pol, 2, cache=runs.StageCache(tmp_path / "cache"))
    runner.hp = cf.with_values(runner.hp, {"interp.alpha": alpha})
    run_dir, _ = runs.RunDir.open(tmp_path / f"run{alpha}", {"test": alpha})
    results[alpha] = runner.run_all(["dpo", "interp-dpo"], params, run_dir)["methods"]
  at0, at1 = results[0.0]["interp-dpo"], results[1.0]["interp-dpo"]
  assert at0["weight_change"] == 0.0 and at0["reward_matrix"][2] == at0["reward_matrix"][1]
  assert at1["reward_matrix"] == results[1.0]["dpo"]["reward_matrix"]
  assert at1["weight_change"] == results[1.0]["dpo"]["weight_change"] > 0
  # the old round's token distributions: unchanged at α = 0, moved by DPO on its buffer and its test prompts
  assert max(at0["old_round_distance"][0].values()) < 1e-6
  assert min(results[1.0]["dpo"]["old_round_distance"][0].values()) > 1e-5


def test_evaluation_rewards_average_several_samples_a_prompt_the_first_with_the_one_sample_keys(policy):
  pol, params = policy
  one = tiny_runner(pol, 2)
  three = tiny_runner(pol, 2, pref=dataclasses.replace(pol.pref, eval_samples=3))
  r1, r3 = one.evaluate(params, {}, "val")["reward"], three.evaluate(params, {}, "val")["reward"]
  assert alignment.pair_key(three.pref) == alignment.pair_key(one.pref)      # pairs and round 1 are shared
  key = jax.random.fold_in(jax.random.PRNGKey(one.seed + 7), 0)
  rnd = one.rounds[0]
  scores = [rnd.reward(pol.texts(*pol.sample(params, rnd.prompts["val"], k)))
            for k in (key, jax.random.fold_in(key, 1), jax.random.fold_in(key, 2))]
  assert r1[0] == pytest.approx(float(np.mean(scores[0])))
  assert r3[0] == pytest.approx(float(np.mean(scores))) and len({float(np.mean(s)) for s in scores}) > 1
