import hashlib
import json

import numpy as np
import pytest

from fipjax import data
from fipjax.models import hub


@pytest.fixture(scope="module")
def tokenizer():
  return hub.load_tokenizer("minilm")


def test_real_tasks_load(data_dir):
  yelp = data.load_task("yelp", "test", data_dir)
  imdb = data.load_task("imdb", "test", data_dir)
  assert len(yelp.texts) == 2575 and yelp.num_labels == 5 and yelp.dropped == 0
  assert sorted(np.unique(yelp.labels).tolist()) == [0, 1, 2, 3, 4]
  assert len(imdb.texts) == 5000 and sorted(np.unique(imdb.labels).tolist()) == [0, 1]
  assert yelp.labels.dtype == np.int32


def test_subsample_is_deterministic_and_balanced(data_dir):
  yelp = data.load_task("yelp", "test", data_dir)
  a = data.subsample(yelp, 100, seed=3, balanced=True)
  b = data.subsample(yelp, 100, seed=3, balanced=True)
  c = data.subsample(yelp, 100, seed=4, balanced=True)
  assert a.texts == b.texts and a.texts != c.texts
  assert np.bincount(a.labels).tolist() == [20] * 5
  assert len(data.subsample(yelp, 37, seed=0).texts) == 37


def test_same_code_path_for_csv_and_parquet(tmp_path):
  import pandas as pd
  frame = pd.DataFrame({"text": ["good", "bad", "fine"], "label": [1, 0, 1]})
  (tmp_path / "imdb").mkdir()
  frame.to_csv(tmp_path / "imdb" / "train.csv", index=False)
  frame.to_parquet(tmp_path / "imdb" / "test.parquet")
  for split in ("train", "test"):
    task = data.load_task("imdb", split, tmp_path)
    assert task.texts == ["good", "bad", "fine"] and task.labels.tolist() == [1, 0, 1]


def _write(tmp_path, task, rows, name="train.jsonl"):
  (tmp_path / task).mkdir(exist_ok=True)
  (tmp_path / task / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("rows, message", [
    ([{"text": "ok", "label": 7}], r"labels must lie in 0\.\.4.*rows \[0\] hold \[7\]"),
    ([{"text": "ok", "stars": 1}], r"missing column\(s\) \['label'\]"),
    ([{"text": 5, "label": 1}, {"text": "x", "label": 1}], r"non-text values in column 'text' at rows \[0\]"),
])
def test_bad_rows_are_errors_naming_the_file(tmp_path, rows, message):
  _write(tmp_path, "yelp", rows)
  with pytest.raises(data.DataError, match=message) as err:
    data.load_task("yelp", "train", tmp_path)
  assert "yelp/train.jsonl" in str(err.value)


def test_bad_inputs(tmp_path):
  with pytest.raises(data.DataError, match="unknown task 'mnist'"):
    data.load_task("mnist", "train", tmp_path)
  with pytest.raises(data.DataError, match="does not exist"):
    data.load_task("yelp", "train", tmp_path / "nope")
  with pytest.raises(data.DataError, match="no train file for task 'yelp'"):
    data.load_task("yelp", "train", tmp_path)
  (tmp_path / "yelp").mkdir()
  (tmp_path / "yelp" / "train.jsonl").write_text("")
  with pytest.raises(data.DataError, match="is empty"):
    data.load_task("yelp", "train", tmp_path)


def test_empty_texts_are_dropped_and_counted(tmp_path):
  _write(tmp_path, "imdb", [{"text": "fine", "label": 1}, {"text": "   ", "label": 0}, {"text": "bad", "label": 0}])
  task = data.load_task("imdb", "train", tmp_path)
  assert task.texts == ["fine", "bad"] and task.dropped == 1


def test_tokenise_bucket_and_batch(data_dir, tokenizer):
  yelp = data.subsample(data.load_task("yelp", "train", data_dir), 64, seed=0)
  enc = data.encode(yelp, tokenizer, max_len=128, label_offset=0)
  assert max(len(x) for x in enc.ids) <= 128 and all(x[0] == tokenizer.cls_token_id for x in enc.ids)
  batches = data.train_batches(enc, 8, seed=1)
  first = [next(batches) for _ in range(10)]
  for b in first:
    assert b["inputs"]["input_ids"].shape == (8, 128) and b["inputs"]["input_ids"].dtype == np.int32   # one shape
    assert b["inputs"]["attention_mask"].sum(1).max() <= 128
  # Resuming at step 9 yields the same batch as the uninterrupted stream; epochs are reshuffled.
  resumed = next(data.train_batches(enc, 8, seed=1, start_step=9))
  np.testing.assert_array_equal(resumed["inputs"]["input_ids"], first[9]["inputs"]["input_ids"])
  assert not np.array_equal(first[0]["labels"], first[8]["labels"]) or \
      not np.array_equal(first[0]["inputs"]["input_ids"], first[8]["inputs"]["input_ids"])
  evaluated = list(data.eval_batches(enc, 10))
  assert sorted(np.concatenate([idx for _, idx in evaluated]).tolist()) == list(range(64))
  assert {b["inputs"]["input_ids"].shape[1] for b, _ in evaluated} <= {32, 64, 128}    # length buckets
  assert enc.digest() == enc.take(np.arange(64)).digest() != enc.take(np.arange(63)).digest()
  relabelled = data.Encoded(enc.ids, (enc.labels + 1) % 5, enc.max_len)     # labels rewritten in place: a new key
  assert relabelled.digest() != enc.digest()


def test_label_offset_and_replay_buffer(data_dir, tokenizer):
  imdb = data.subsample(data.load_task("imdb", "train", data_dir), 20, seed=0)
  enc = data.encode(imdb, tokenizer, max_len=64, label_offset=5)
  assert set(enc.labels.tolist()) <= {5, 6}
  ref = np.arange(20 * 3, dtype=np.float32).reshape(20, 3)
  buf = data.ReplayBuffer(enc, ref, seed=2)
  a, b = buf.sample(7, 4), buf.sample(7, 4)
  np.testing.assert_array_equal(a["inputs"]["input_ids"], b["inputs"]["input_ids"])
  rows = (a["ref_outputs"][:, 0] / 3).astype(int)
  np.testing.assert_array_equal(a["labels"], enc.labels[rows])


def test_array_rows_batch_like_text():
  ds = data.Arrays({"x": np.arange(20.0).reshape(10, 2)}, np.arange(10) % 3)
  b = next(data.train_batches(ds, 4, seed=0))
  np.testing.assert_array_equal(b["inputs"]["x"][:, 0] / 2, b["labels"] + 3 * ((b["inputs"]["x"][:, 0] / 2) // 3))
  evaluated = list(data.eval_batches(ds, 4))
  assert [len(idx) for _, idx in evaluated] == [4, 4, 2] and evaluated[-1][0]["labels"].shape == (4,)
  assert ds.take([1, 2]).digest() != ds.take([2, 1]).digest()


@pytest.mark.parametrize("labels, shown", [
    ([1, 2.5, 3], r"rows \[1\] hold \[2\.5\]"),
    ([True, False], r"rows \[0, 1\] hold \[True, False\]"),
    (["1", "2"], r"rows \[0, 1\] hold \['1', '2'\]"),
])
def test_non_integer_labels_are_errors(tmp_path, labels, shown):
  _write(tmp_path, "yelp", [{"text": "ok", "label": v} for v in labels])
  with pytest.raises(data.DataError, match=r"yelp/train\.jsonl: labels must be integers; " + shown):
    data.load_task("yelp", "train", tmp_path)


def test_integral_float_labels_are_accepted(tmp_path):
  _write(tmp_path, "yelp", [{"text": "ok", "label": 1.0}, {"text": "ok", "label": 4}])
  assert data.load_task("yelp", "train", tmp_path).labels.tolist() == [1, 4]


def test_all_texts_empty_is_an_error(tmp_path):
  _write(tmp_path, "imdb", [{"text": "", "label": 1}, {"text": " \n", "label": 0}])
  with pytest.raises(data.DataError, match=r"imdb/train\.jsonl: every row has an empty text \(2 rows\)"):
    data.load_task("imdb", "train", tmp_path)


@pytest.mark.parametrize("name, body, message", [
    ("train.jsonl", '{"text": "a", "label": 1}\n\n{"text": "b", "label": 0\n',
     r"train\.jsonl, line 3: not valid JSON \(Expecting ',' delimiter\)"),
    ("train.jsonl", '{"text": "a", "label": 1}\n[1, 2]\n', r"train\.jsonl, line 2: not a JSON object \(got list\)"),
    ("train.json", '[{"text": "a", "label": 1},\n {"text": "b" "label": 0}]\n',
     r"train\.json, line 2: not valid JSON \(Expecting ',' delimiter\)"),
])
def test_malformed_json_names_the_line(tmp_path, name, body, message):
  (tmp_path / "imdb").mkdir()
  (tmp_path / "imdb" / name).write_text(body)
  with pytest.raises(data.DataError, match=message):
    data.load_task("imdb", "train", tmp_path)


def test_json_array_file_loads(tmp_path):
  (tmp_path / "imdb").mkdir()
  (tmp_path / "imdb" / "train.json").write_text(json.dumps([{"text": "a", "label": 1}, {"text": "b", "label": 0}]))
  assert data.load_task("imdb", "train", tmp_path).labels.tolist() == [1, 0]


def test_digest_follows_content_not_path(tmp_path):
  rows = [{"text": "good", "label": 1}, {"text": "bad", "label": 0}]
  for d in "ab":
    (tmp_path / d).mkdir()
    _write(tmp_path / d, "imdb", rows)
  a, b = data.load_task("imdb", "train", tmp_path / "a"), data.load_task("imdb", "train", tmp_path / "b")
  assert a.digest == b.digest and len(a.digest) == 64
  assert a.digest == hashlib.sha256((tmp_path / "a" / "imdb" / "train.jsonl").read_bytes()).hexdigest()
  rows[1]["label"] = 1
  _write(tmp_path / "a", "imdb", rows)
  changed = data.load_task("imdb", "train", tmp_path / "a")
  assert changed.digest != a.digest and changed.labels.tolist() == [1, 1]


def test_hub_digest_is_the_dataset_fingerprint(monkeypatch):
  import datasets
  ds = datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]})
  monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: ds)
  assert data.load_task("imdb", "test").digest == f"imdb:{ds._fingerprint}"
