"""Tasks, tokenisation, bucketed batches and replay buffers for text classification (Yelp stars, IMDB).

A task is read from the Hugging Face hub (``yelp_review_full``, ``imdb``) or from a local directory laid out as
``<data_dir>/<task>/{train,test}.{jsonl,json,csv,parquet}`` with ``text`` and ``label`` columns; both go through
``datasets`` builders. Bad input raises :class:`DataError` naming the file and the problem; rows dropped (empty
text) are counted in :class:`TaskData.dropped`, never silently.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, Iterator, Sequence

import numpy as np

TASKS = {"yelp": {"hub": "yelp_review_full", "num_labels": 5},
         "imdb": {"hub": "imdb", "num_labels": 2}}
_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
DEFAULT_BUCKETS = (32, 64, 128, 256, 512)


class DataError(ValueError):
  """Input data that cannot be used as given."""


@dataclasses.dataclass
class TaskData:
  name: str
  split: str
  texts: list[str]
  labels: np.ndarray          # int32 [N]
  num_labels: int
  source: str                 # file path or hub id
  dropped: int = 0            # rows removed (empty text), reported


def _local_file(data_dir: pathlib.Path, task: str, split: str) -> pathlib.Path:
  folder = data_dir / task
  candidates = [folder / f"{split}{ext}" for ext in _FORMATS]
  found = [c for c in candidates if c.exists()]
  if not found:
    raise DataError(f"no {split} file for task {task!r}: looked for {', '.join(str(c) for c in candidates)}")
  return found[0]


def load_task(task: str, split: str, data_dir: str | os.PathLike | None = None) -> TaskData:
  """All rows of one split, validated.

  Args:
    task: 'yelp' or 'imdb'.
    split: 'train' or 'test'.
    data_dir: a local directory (see module docstring); None reads the hub dataset.
  """
  if task not in TASKS:
    raise DataError(f"unknown task {task!r}; choose one of {sorted(TASKS)}")
  import datasets
  datasets.disable_progress_bars()
  if data_dir is None:
    source = TASKS[task]["hub"]
    try:
      ds = datasets.load_dataset(source, split=split)
    except Exception as e:
      raise DataError(f"could not load {source!r} ({split}) from the Hugging Face hub ({type(e).__name__}: {e}); "
                      "offline, pass --data-dir with <task>/{train,test}.jsonl files") from e
  else:
    data_dir = pathlib.Path(data_dir)
    if not data_dir.is_dir():
      raise DataError(f"data directory {data_dir} does not exist")
    path = _local_file(data_dir, task, split)
    source = str(path)
    if path.stat().st_size == 0:
      raise DataError(f"{path} is empty")
    try:
      ds = datasets.load_dataset(_FORMATS[path.suffix], data_files={split: str(path)}, split=split)
    except Exception as e:
      raise DataError(f"could not read {path}: {type(e).__name__}: {e}") from e
  missing = {"text", "label"} - set(ds.column_names)
  if missing:
    raise DataError(f"{source}: missing column(s) {sorted(missing)}; found {ds.column_names}")
  if len(ds) == 0:
    raise DataError(f"{source} holds no rows")
  texts, labels = ds["text"], ds["label"]
  bad_text = [i for i, t in enumerate(texts) if not isinstance(t, str)]
  if bad_text:
    raise DataError(f"{source}: non-text values in column 'text' at rows {bad_text[:10]}"
                    f"{' …' if len(bad_text) > 10 else ''}")
  num_labels = TASKS[task]["num_labels"]
  try:
    labels = np.asarray(labels, dtype=np.int64)
  except (TypeError, ValueError) as e:
    raise DataError(f"{source}: labels must be integers ({e})") from e
  out_of_range = np.flatnonzero((labels < 0) | (labels >= num_labels))
  if out_of_range.size:
    raise DataError(f"{source}: labels must lie in 0..{num_labels - 1} for task {task!r}; rows "
                    f"{out_of_range[:10].tolist()} hold {sorted(set(labels[out_of_range].tolist()))[:10]}")
  keep = [i for i, t in enumerate(texts) if t.strip()]
  return TaskData(task, split, [texts[i] for i in keep], labels[keep].astype(np.int32), num_labels, source,
                  dropped=len(texts) - len(keep))


def subsample(data: TaskData, n: int | None, seed: int, *, balanced: bool = False) -> TaskData:
  """A deterministic random subset of ``n`` rows (all rows when None); ``balanced`` takes n/K per class."""
  total = len(data.texts)
  if n is None or n >= total:
    return data
  rng = np.random.default_rng(seed)
  if balanced:
    k = data.num_labels
    per = n // k
    idx = []
    for c in range(k):
      rows = np.flatnonzero(data.labels == c)
      if rows.size < per:
        raise DataError(f"{data.source}: class {c} has {rows.size} rows, fewer than the {per} a balanced "
                        f"subsample of {n} needs")
      idx.append(rng.choice(rows, size=per, replace=False))
    idx = np.sort(np.concatenate(idx))
  else:
    idx = np.sort(rng.choice(total, size=n, replace=False))
  return dataclasses.replace(data, texts=[data.texts[i] for i in idx], labels=data.labels[idx])


@dataclasses.dataclass
class Encoded:
  """Tokenised rows, unpadded: ``ids[i]`` is a 1-D int32 array (with [CLS]/[SEP])."""
  ids: list[np.ndarray]
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.ids)

  def take(self, idx: Sequence[int]) -> "Encoded":
    return Encoded([self.ids[i] for i in idx], self.labels[np.asarray(idx, dtype=np.int64)])


def encode(data: TaskData, tokenizer, max_len: int, label_offset: int = 0) -> Encoded:
  """Tokenise with truncation to ``max_len``; labels shifted by ``label_offset`` (a shared head's label range)."""
  enc = tokenizer(data.texts, truncation=True, max_length=max_len)
  return Encoded([np.asarray(x, np.int32) for x in enc["input_ids"]], data.labels + label_offset)


def bucket_length(length: int, max_len: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> int:
  """The smallest bucket ≥ length (capped at max_len): jit compiles one shape per bucket."""
  for b in buckets:
    if b >= length:
      return min(b, max_len)
  return max_len


def collate(enc: Encoded, idx: Sequence[int], max_len: int, buckets: Sequence[int] = DEFAULT_BUCKETS,
            pad_id: int = 0) -> dict[str, np.ndarray]:
  """A numpy batch {input_ids, attention_mask [B, T], labels [B]} padded to the bucket of its longest row."""
  rows = [enc.ids[i] for i in idx]
  t = bucket_length(max(len(r) for r in rows), max_len, buckets)
  ids = np.full((len(rows), t), pad_id, np.int32)
  mask = np.zeros((len(rows), t), np.int32)
  for j, r in enumerate(rows):
    ids[j, :len(r)] = r
    mask[j, :len(r)] = 1
  return {"input_ids": ids, "attention_mask": mask, "labels": enc.labels[np.asarray(idx)].astype(np.int32)}


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(n)


def train_batches(enc: Encoded, batch_size: int, seed: int, max_len: int, *, start_step: int = 0,
                  buckets: Sequence[int] = DEFAULT_BUCKETS) -> Iterator[dict[str, np.ndarray]]:
  """Endless shuffled epochs of full batches; batch k is a function of (seed, k) alone, so a resumed run
  (``start_step``) sees exactly the batches an uninterrupted run would."""
  if len(enc) < batch_size:
    raise DataError(f"{len(enc)} training rows are fewer than one batch of {batch_size}")
  per_epoch = len(enc) // batch_size
  step = start_step
  while True:
    epoch, k = divmod(step, per_epoch)
    order = epoch_order(len(enc), seed, epoch)
    yield collate(enc, order[k * batch_size:(k + 1) * batch_size], max_len, buckets)
    step += 1


def eval_batches(enc: Encoded, batch_size: int, max_len: int,
                 buckets: Sequence[int] = DEFAULT_BUCKETS) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
  """(batch, row indices) covering every row once, sorted by length for fewer padded tokens. The last batch is
  padded with repeats of its first row to keep the shape: only its first ``len(indices)`` rows are real."""
  order = np.argsort([len(x) for x in enc.ids], kind="stable")
  for i in range(0, len(order), batch_size):
    idx = order[i:i + batch_size]
    padded = np.concatenate([idx, np.repeat(idx[:1], batch_size - len(idx))])
    yield collate(enc, padded, max_len, buckets), idx


def model_inputs(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The arrays a BERT apply takes from a collated batch."""
  return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


@dataclasses.dataclass
class ReplayBuffer:
  """Old-task inputs kept for replay, with the old network's stored outputs on them (FIP's reference)."""
  enc: Encoded
  ref_outputs: np.ndarray | None = None   # [N, K] float32
  seed: int = 0

  def sample(self, step: int, batch_size: int, max_len: int,
             buckets: Sequence[int] = DEFAULT_BUCKETS) -> dict[str, np.ndarray]:
    """A batch drawn without replacement, a function of (seed, step): resumable and reproducible."""
    idx = np.random.default_rng([self.seed, 1_000_003, step]).choice(len(self.enc), size=batch_size,
                                                                     replace=False)
    batch = collate(self.enc, idx, max_len, buckets)
    if self.ref_outputs is not None:
      batch["ref_outputs"] = self.ref_outputs[idx]
    return batch
