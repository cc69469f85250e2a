"""End to end: python -m fipjax.align on the shipped example months with a one-layer random Llama (SmolLM2's
tokenizer and chat template): two months, a third continued from the stored state, the exports loaded by
transformers, a kill and resume, and the bad-input table."""

import hashlib
import json
import pathlib

import numpy as np
import pytest

from fipjax import align, checkpoint, models

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples" / "align"
TINY = ["--method", "lora-fip-dpo", "--max-steps", "2", "--per-device-train-batch-size", "4", "--learning-rate",
        "1e-2", "--max-length", "48", "--max-prompt-length", "32", "--replay.buffer-size", "8", "--replay.batch-size",
        "2", "--fip.top-k", "4", "--eval.batch-size", "8", "--eval.checkpoint-every", "1", "--eval.record-every", "1",
        "--eval.probe-size", "2", "--no-progress"]
MONTHS = ["--round", f"m1={EXAMPLES / 'm1.jsonl'}", "--round", f"m2={EXAMPLES / 'm2.jsonl'}"]
MODEL = []


@pytest.fixture(scope="module", autouse=True)
def _model(small_llama):
  MODEL[:] = ["--model", str(small_llama)]


def run(out, *extra):
  return align.main([*MODEL, *TINY, "--out", str(out), *extra])


@pytest.fixture(scope="module")
def two_months(tmp_path_factory, _model):
  out = tmp_path_factory.mktemp("align") / "run"
  assert run(out, *MONTHS) == 0
  return out


def result(out):
  return json.loads((out / "results.json").read_text())["methods"]["lora-fip-dpo"]


def test_two_months_report_every_month_after_every_month(two_months):
  m = result(two_months)
  assert m["rounds"] == ["m1", "m2"] and m["steps"] == [2]
  acc = np.array(m["preference_accuracy_matrix"], dtype=float)      # rows: base, after m1, after m2
  assert acc.shape == (3, 2) and np.isnan(acc[0]).all() and np.isnan(acc[1, 1]) and np.isfinite(acc[2]).all()
  for key in ("reward_margin_matrix", "chosen_logp_matrix"):
    assert np.isfinite(np.array(m[key][2], dtype=float)).all()
  assert len(m["forgetting"]) == 1 and m["stored_state_bytes"] > 0 and m["stored_reference_bytes"] > 0
  assert m["drift"]["step"] == [1, 2] and np.isfinite(m["loss_curve"]).all()
  assert "Table 1b" in (two_months / "report.md").read_text()
  assert sorted(p.name for p in (two_months / "export").iterdir()) == ["m1", "m2"]      # the base: a directory
  assert (two_months / "export" / "m2" / "adapter" / "adapter_config.json").exists()       # PEFT's, for LoRA


def test_the_export_is_the_final_policy_and_loads_in_transformers(two_months):
  torch = pytest.importorskip("torch")
  import transformers
  exported = models.load(two_months / "export" / "m2")
  tree = checkpoint.restore_tree(two_months / "state")
  assert "params" not in tree          # a LoRA method's state: the low-rank change of each target kernel
  stored = align.stored_policy(tree, models.load(MODEL[1]).params)
  for a, b in zip(*(jax_leaves(t) for t in (stored, exported.params))):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
  weights = (two_months / "export" / "m2" / "model.safetensors").stat().st_size
  assert result(two_months)["stored_state_bytes"] < weights / 2
  ids = np.array([[1, 5, 9, 300, 7000, 12, 44, 2]], np.int32)
  ours = np.asarray(exported.apply(exported.params, {"input_ids": ids, "attention_mask": np.ones_like(ids)}))
  model = transformers.AutoModelForCausalLM.from_pretrained(two_months / "export" / "m2", attn_implementation="eager")
  with torch.no_grad():
    theirs = model(torch.tensor(ids, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=1e-5)
  tok = transformers.AutoTokenizer.from_pretrained(two_months / "export" / "m2")
  assert "<|im_start|>assistant" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                             add_generation_prompt=True)


def jax_leaves(tree):
  import jax
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_a_third_month_continues_from_the_stored_state(two_months, tmp_path):
  out, text = tmp_path / "m3", tmp_path / "held_out.jsonl"
  text.write_text("\n".join(json.dumps({"text": t}) for t in ("A quiet film about a lighthouse.",
                                                               "The soup was cold and the service slow.")))
  assert run(out, "--resume-from", str(two_months), "--round", f"m3={EXAMPLES / 'm3.jsonl'}",
             "--held-out-text", str(text)) == 0
  before, after = result(two_months), result(out)
  assert after["kl_to_base"][:3] == [None] * 3 and after["kl_to_base"][3] > 0 and after["perplexity"][3] > 1
  assert after["rounds"] == ["m1", "m2", "m3"] and after["steps"] == [2]
  acc = np.array(after["preference_accuracy_matrix"], dtype=float)
  assert acc.shape == (4, 3) and np.isfinite(acc[3]).all()
  np.testing.assert_array_equal(acc[:3, :2], np.array(before["preference_accuracy_matrix"], dtype=float))
  assert len(after["forgetting"]) == 2 and sorted(p.name for p in (out / "export").iterdir()) == ["m3"]


def test_a_killed_run_resumes_to_the_same_numbers(two_months, tmp_path):
  out = tmp_path / "killed"
  assert run(out, *MONTHS, "--stop-after", "3") == 130          # in the second month
  assert not (out / "results.json").exists()
  assert run(out, *MONTHS) == 0
  a, b = result(two_months), result(out)
  for key in ("loss_curve", "preference_accuracy_matrix", "reward_margin_matrix", "chosen_logp_matrix", "drift"):
    assert a[key] == b[key], key



def test_bfloat16_weights_align_export_exactly_and_resume_only_as_bfloat16(tmp_path):
  out = tmp_path / "bf16"
  assert run(out, *MONTHS, "--param-dtype", "bfloat16") == 0
  m = result(out)
  assert np.isfinite(np.array(m["preference_accuracy_matrix"][2], dtype=float)).all()
  assert np.isfinite(m["loss_curve"]).all()
  # LoRA on bfloat16 weights: the base the adapters were trained on (the checkpoint rounded) is exported in bfloat16,
  # the policy (float32 merged kernels on it) in float32: the stored policy (its changes factored exactly by SVD).
  config = lambda d: json.loads((out / "export" / d / "config.json").read_text())["torch_dtype"]
  assert (config("base"), config("m2")) == ("bfloat16", "float32")
  from safetensors.numpy import load_file
  assert {str(x.dtype) for x in load_file(out / "export" / "base" / "model.safetensors").values()} == {"bfloat16"}
  base = models.load(out / "export" / "base").params          # widened to float32 exactly
  stored = align.stored_policy(checkpoint.restore_tree(out / "state"), base)
  for a, b in zip(*(jax_leaves(t) for t in (stored, models.load(out / "export" / "m2").params))):
    np.testing.assert_allclose(a.astype(np.float32), b, rtol=0, atol=1e-6)
  assert run(tmp_path / "m3", "--resume-from", str(out), "--round", f"m3={EXAMPLES / 'm3.jsonl'}") == 2
  assert not (tmp_path / "m3").exists()


REWARDS = EXAMPLES / "rewards.py"


def test_on_policy_months_ranked_by_a_reward_give_the_reward_matrix(tmp_path):
  out = tmp_path / "on-policy"
  assert run(out, *MONTHS, "--pairs", "on-policy", "--reward", f"{REWARDS}:brevity", "--reward",
             f"m2={REWARDS}:positivity", "--max-new-tokens", "6", "--no-export") == 0
  m = result(out)
  reward = np.array(m["reward_matrix"], dtype=float)   # rows: base, after m1, after m2: every month's test prompts
  assert reward.shape == (3, 2) and np.isfinite(reward).all()
  assert np.isfinite(np.array(m["chosen_logp_matrix"][2], dtype=float)).all() and len(m["reward_forgetting"]) == 1
  assert not (out / "export").exists()
  state = checkpoint.restore_tree(out / "state")
  pairs = state["pairs"]["m2"]     # sampled: 6 completion tokens, ranked by the month's own reward
  assert pairs["chosen"]["input_ids"].shape[1] - int(np.argmax(pairs["chosen"]["response_mask"].any(0))) == 6
  assert (pairs["reward_chosen"] >= pairs["reward_rejected"]).all()
  described = json.loads((out / "results.json").read_text())["rewards"]
  assert {n: d["reward"] for n, d in described.items()} == {"m1": f"{REWARDS}:brevity", "m2": f"{REWARDS}:positivity"}
  assert described["m1"]["source_sha256"] == hashlib.sha256(REWARDS.read_bytes()).hexdigest()


def test_a_reward_on_file_pairs_adds_the_reward_of_sampled_completions(two_months, tmp_path):
  out = tmp_path / "rewarded"
  assert run(out, "--resume-from", str(two_months), "--round", f"m3={EXAMPLES / 'm3.jsonl'}", "--reward",
             f"m3={REWARDS}:positivity", "--no-export") == 0
  m = result(out)
  assert [row[:2] for row in m["reward_matrix"]] == [[None, None]] * 4      # m1, m2: no reward
  assert [row[2] for row in m["reward_matrix"][:3]] == [None] * 3          # the stored rows knew no m3
  assert np.isfinite(m["reward_matrix"][3][2])
  np.testing.assert_array_equal(np.array(m["preference_accuracy_matrix"][:3], dtype=float)[:, :2],
                                np.array(result(two_months)["preference_accuracy_matrix"], dtype=float))


def spoil(tmp_path, line):
  path = tmp_path / "bad.jsonl"
  path.write_text("\n".join([line] * 3) + "\n")
  return f"bad={path}"


# (extra flags, words the one-paragraph message holds); {tmp}: the test's folder, {m1}: the first example month.
CASES = [
    (["--round", "m1"], "is not NAME=PATH"),
    (["--round", "m1={m1}", "--round", "m1={m1}"], "is given twice"),
    ([], "at least one --round"),
    (["--round", "m1={m1}"], "at least two months"),
    (["--round", "m1={m1}", "--round", "m2={m1}", "--test-fraction", "1.5"], "between 0 and 1"),
    (["--round", "m1={m1}", "--beta", "-1"], "--beta must be > 0"),
    (["--round", "m1={m1}", "--loss-type", "exponential"], "--loss-type must be one of"),
    (["--round", "m1={m1}", "--label-smoothing", "0.5"], "--label-smoothing must be in [0, 0.5)"),
    (["--round", "m1={m1}", "--method", "fip"], "named <method>-dpo"),
    (["--round", "m1={m1}", "--method", "lora-si-dpo"], "no LoRA form"),
    (["--round", "m1={m1}", "--resume-from", "{tmp}/nowhere"], "not a finished fipjax.align run"),
    (["--round", "m1={m1}", "--round", "m2={tmp}/missing.jsonl"], "does not exist"),
    (["--round", "m1={m1}", "--round", "m2={tmp}"], "without train.jsonl and test.jsonl"),
    (["--round", "m1={m1}", "--round", "SPOIL", '{"prompt": "p", "chosen": "a"}'], "missing rejected"),
    (["--round", "m1={m1}", "--round", "SPOIL", '{"prompt": "p", "chosen": "a", "rejected": "b", "x": 1}'],
     "unexpected field(s) x"),
    (["--round", "m1={m1}", "--round", "SPOIL", '{"prompt": "p", "chosen": "", "rejected": "b"}'], "is empty"),
    (["--round", "m1={m1}", "--round", "SPOIL", '{"prompt": "p", "chosen": "a", "rejected": "a"}'], "identical"),
    (["--round", "m1={m1}", "--round", "SPOIL", '{"prompt": [{"role": "bot", "content": "x"}], "chosen": [], '
      '"rejected": []}'], "unknown role 'bot'"),
    (["--round", "m1={m1}", "--round", "SPOIL", "{not json"], "not valid JSON"),
    (["--round", "m1={m1}", "--round", "m2={m1}", "--max-prompt-length", "300", "--max-length", "20"],
     "fills --max-length"),
    (["--round", "m1={m1}", "--round", "m2={m1}", "--lora-target-modules", "attention"], "not a linear module"),
    (["--round", "m1={m1}", "--round", "m2={m1}", "--per-device-train-batch-size", "64"], "fewer than one batch"),
    (["--round", "m1={m1}", "--round", "m2={m1}", "--held-out-text", "{m1}"], "holds no {\"text\""),
    (["MODEL", "{tmp}/broken.gguf", "--round", "m1={m1}", "--round", "m2={m1}"], "gguf"),
    (["MODEL", "minilm", "--round", "m1={m1}", "--round", "m2={m1}"], "not a causal LM"),
    (["--round", "m1={m1}", "--round", "m2={m1}", "--reward", "brevity"], "is not module:function"),
    (["--round", "m1={m1}", "--round", "m2={m1}", "--reward", "no_such_module_here:f"], "cannot be imported"),
    (["--round", "m1={m1}", "--round", "m2={m1}", "--reward", "{rewards}:missing"], "has no function 'missing'"),
    (["--round", "m1={m1}", "--round", "m2={m1}", "--reward", "numpy:shape"], "one finite number per text"),
    (["--round", "m1={m1}", "--round", "m2={m1}", "--reward", "m9={rewards}:brevity"], "not among the months"),
    (["--round", "m1={m1}", "--round", "m2={m1}", "--reward", "m1={rewards}:brevity", "--reward",
      "m1={rewards}:positivity"], "two rewards"),
    (["--round", "m1={m1}", "--round", "m2={m1}", "--pairs", "on-policy", "--reward", "m1={rewards}:brevity"],
     "month(s) m2 have none"),
    (["--round", "m1={m1}", "--round", "SPOIL", '{"prompt": "p"}'], "missing chosen, rejected"),
    (["--round", "m1={m1}", "--round", "m2={m1}", "--replay.buffer-size", "1"], "--replay.buffer-size 1 keeps fewer"),
]


@pytest.mark.parametrize("flags,words", CASES, ids=[w[:30] for _, w in CASES])
def test_bad_input_is_one_paragraph_and_writes_nothing(flags, words, tmp_path, capsys):
  (tmp_path / "broken.gguf").write_bytes(b"GGUF\x03\x00\x00\x00 not really")
  fill = lambda f: f.replace("{tmp}", str(tmp_path)).replace("{m1}", str(EXAMPLES / "m1.jsonl")).replace(
      "{rewards}", str(REWARDS))
  flags = [fill(f) for f in flags]
  if "SPOIL" in flags:
    i = flags.index("SPOIL")
    flags[i:i + 2] = [spoil(tmp_path, flags[i + 1])]
  model = MODEL
  if flags[:1] == ["MODEL"]:
    model, flags = ["--model", flags[1]], flags[2:]
  try:
    code = align.main([*model, *TINY, "--out", str(tmp_path / "out"), *flags])
  except SystemExit as e:
    code = e.code
  err = capsys.readouterr().err
  assert code == 2, err
  assert words in err and "Traceback" not in err, err
  assert not (tmp_path / "out").exists()


def test_make_months_writes_directory_months_the_tool_reads(tmp_path):
  import runpy, sys
  from fipjax import preferences
  argv, sys.argv = sys.argv, ["make_months.py", "--out", str(tmp_path / "m"), "--train", "3", "--test", "2"]
  try:
    runpy.run_path(str(EXAMPLES / "make_months.py"), run_name="__main__")
  finally:
    sys.argv = argv
  for month, conversational in (("film", True), ("restaurant", True), ("opening", False)):
    rows = preferences.load_round(tmp_path / "m" / month, test_fraction=0.1, seed=0)
    assert [len(rows["train"]), len(rows["test"])] == [3, 2]
    assert isinstance(rows["train"][0]["prompt"], list) == conversational
    assert not {r["chosen"] if isinstance(r["chosen"], str) else r["chosen"][0]["content"] for r in rows["train"]} & {
        r["chosen"] if isinstance(r["chosen"], str) else r["chosen"][0]["content"] for r in rows["test"]}


def test_a_reward_shared_by_months_is_imported_once_and_identified_by_its_file(tmp_path):
  counter = tmp_path / "imports.txt"
  module = tmp_path / "counted.py"
  module.write_text(f"import pathlib\nc = pathlib.Path({str(counter)!r})\nc.write_text(c.read_text() + 'x' "
                    "if c.exists() else 'x')\ndef short(texts):\n  return [-len(t) for t in texts]\n")
  got = align.month_rewards([f"{module}:short"], ["m1", "m2", "m3"])
  assert counter.read_text() == "x"
  assert got["m1"] is got["m2"] is got["m3"]
  fn, ident = got["m1"]
  np.testing.assert_array_equal(fn(["ab", "abcd"]), [-2.0, -4.0])
  assert ident == {"reward": f"{module}:short", "source_sha256": hashlib.sha256(module.read_bytes()).hexdigest()}
