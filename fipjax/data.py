"""Tasks, tokenisation, bucketed batches and replay buffers for text classification (Yelp stars, IMDB).

A task is read from the Hugging Face hub (``yelp_review_full``, ``imdb``) or from a local directory laid out as
``<data_dir>/<task>/{train,test}.{jsonl,json,csv,parquet}`` with ``text`` and ``label`` columns; both go through
``datasets`` builders. Bad input raises :class:`DataError` naming the file and the problem; rows dropped (empty
text) are counted in :class:`TaskData.dropped`, never silently.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from typing import Any, Iterator, Protocol, Sequence

import jax
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
  digest: str                 # sha256 of the file's bytes, or "<hub id>:<datasets fingerprint>"
  dropped: int = 0            # rows removed (empty text), reported


def _local_file(data_dir: pathlib.Path, task: str, split: str) -> pathlib.Path:
  folder = data_dir / task
  candidates = [folder / f"{split}{ext}" for ext in _FORMATS]
  found = [c for c in candidates if c.exists()]
  if not found:
    raise DataError(f"no {split} file for task {task!r}: looked for {', '.join(str(c) for c in candidates)}")
  return found[0]


def _sha256(path: pathlib.Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(1 << 20):
      h.update(chunk)
  return h.hexdigest()


def _json_problem(path: pathlib.Path) -> str | None:
  """Where a .json/.jsonl file stops being readable rows, or None when every line is a JSON object."""
  with open(path, "rb") as f:
    head = f.read(4096).lstrip()
  if path.suffix == ".json" and head.startswith(b"["):
    # One JSON array (datasets accepts it): a line-by-line scan would reject its first line.
    try:
      json.loads(path.read_bytes())
    except json.JSONDecodeError as e:
      return f"{path}, line {e.lineno}: not valid JSON ({e.msg})"
    except ValueError as e:
      return f"{path}: not valid JSON ({e})"
    return None
  with open(path, "rb") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except ValueError as e:   # JSONDecodeError, or UnicodeDecodeError on bytes that are not UTF-8
        return f"{path}, line {n}: not valid JSON ({getattr(e, 'msg', e)})"
      if not isinstance(row, dict):
        return f"{path}, line {n}: not a JSON object (got {type(row).__name__})"
  return None


def _bad_labels(labels: Sequence[Any]) -> list[int]:
  """Rows whose label is not an integer value (integral floats such as 3.0 pass)."""
  def bad(v):
    if isinstance(v, (bool, np.bool_)):
      return True
    if isinstance(v, (int, np.integer)):
      return False
    return not (isinstance(v, (float, np.floating)) and float(v).is_integer())
  return [i for i, v in enumerate(labels) if bad(v)]


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
      raise DataError(f"could not load {source!r} ({split}) from the Hugging Face hub ({type(e).__name__}: "
                      f"{str(e).splitlines()[0][:160] if str(e) else ''}); offline, run the offline preset "
                      "(--preset cpu) or pass --data.dir with <task>/{train,test}.jsonl files") from e
    digest = f"{source}:{ds._fingerprint}"
  else:
    data_dir = pathlib.Path(data_dir)
    if not data_dir.is_dir():
      raise DataError(f"data directory {data_dir} does not exist")
    path = _local_file(data_dir, task, split)
    source = str(path)
    if path.stat().st_size == 0:
      raise DataError(f"{path} is empty")
    digest = _sha256(path)
    # JSON is checked first: datasets logs a traceback per failed parser before it raises.
    problem = _json_problem(path) if _FORMATS[path.suffix] == "json" else None
    if problem:
      raise DataError(problem)
    try:
      ds = datasets.load_dataset(_FORMATS[path.suffix], data_files={split: str(path)}, split=split)
    except Exception as e:
      raise DataError(f"could not read {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from e
  missing = {"text", "label"} - set(ds.column_names)
  if missing:
    raise DataError(f"{source}: missing column(s) {sorted(missing)}; found {ds.column_names}")
  if len(ds) == 0:
    raise DataError(f"{source} holds no rows")
  try:
    texts, labels = list(ds["text"]), list(ds["label"])
  except UnicodeDecodeError as e:   # arrow keeps invalid UTF-8 bytes and fails only when they are read
    problem = _json_problem(path) if data_dir is not None and _FORMATS[path.suffix] == "json" else None
    raise DataError(problem or f"{source}: text is not valid UTF-8 ({e})") from e
  bad_text = [i for i, t in enumerate(texts) if not isinstance(t, str)]
  if bad_text:
    raise DataError(f"{source}: non-text values in column 'text' at rows {bad_text[:10]}"
                    f"{' …' if len(bad_text) > 10 else ''}")
  num_labels = TASKS[task]["num_labels"]
  bad_labels = _bad_labels(labels)
  if bad_labels:
    raise DataError(f"{source}: labels must be integers; rows {bad_labels[:10]} hold "
                    f"{[labels[i] for i in bad_labels[:10]]}{' …' if len(bad_labels) > 10 else ''}")
  try:
    labels = np.asarray([int(v) for v in labels], dtype=np.int64)
  except OverflowError as e:
    raise DataError(f"{source}: labels out of the int64 range ({e})") from e
  out_of_range = np.flatnonzero((labels < 0) | (labels >= num_labels))
  if out_of_range.size:
    raise DataError(f"{source}: labels must lie in 0..{num_labels - 1} for task {task!r}; rows "
                    f"{out_of_range[:10].tolist()} hold {sorted(set(labels[out_of_range].tolist()))[:10]}")
  keep = [i for i, t in enumerate(texts) if t.strip()]
  if not keep:
    raise DataError(f"{source}: every row has an empty text ({len(texts)} rows)")
  return TaskData(task, split, [texts[i] for i in keep], labels[keep].astype(np.int32), num_labels, source,
                  digest=digest, dropped=len(texts) - len(keep))


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


class Dataset(Protocol):
  """Rows a task trains or is evaluated on. ``batch(idx)`` is ``{"inputs": pytree [B, ...], "labels": [B]}``;
  ``bucketed`` lets variable-length rows pad to a length bucket (evaluation) instead of one fixed shape."""
  labels: np.ndarray

  def __len__(self) -> int: ...
  def batch(self, idx: Sequence[int], *, bucketed: bool = False) -> dict[str, Any]: ...
  def take(self, idx: Sequence[int]) -> "Dataset": ...
  def lengths(self) -> np.ndarray | None: ...
  def digest(self) -> str: ...


def digest_arrays(*arrays: np.ndarray) -> str:
  h = hashlib.sha256()
  for a in arrays:
    a = np.ascontiguousarray(a)
    h.update(f"{a.dtype}{a.shape}".encode())
    h.update(a.tobytes())
  return h.hexdigest()[:16]


@dataclasses.dataclass
class Arrays:
  """Fixed-size rows: ``inputs [N, ...]`` (a pytree of arrays) and integer ``labels [N]``."""
  inputs: Any
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)

  def batch(self, idx, *, bucketed: bool = False) -> dict[str, Any]:
    idx = np.asarray(idx)
    return {"inputs": jax.tree.map(lambda x: x[idx], self.inputs), "labels": self.labels[idx]}

  def take(self, idx) -> "Arrays":
    return Arrays(**self.batch(idx))

  def lengths(self) -> None:
    return None

  def digest(self) -> str:
    return digest_arrays(*jax.tree.leaves(self.inputs), self.labels)


@dataclasses.dataclass
class Encoded:
  """Tokenised rows, unpadded: ``ids[i]`` is a 1-D int32 array (with [CLS]/[SEP]); batches pad to ``max_len``
  (training: one compiled shape) or to the length bucket of their longest row (evaluation)."""
  ids: list[np.ndarray]
  labels: np.ndarray
  max_len: int = 512

  def __len__(self) -> int:
    return len(self.ids)

  def take(self, idx: Sequence[int]) -> "Encoded":
    return Encoded([self.ids[i] for i in idx], self.labels[np.asarray(idx, dtype=np.int64)], self.max_len)

  def batch(self, idx, *, bucketed: bool = False) -> dict[str, Any]:
    b = collate(self, idx, self.max_len, DEFAULT_BUCKETS if bucketed else (self.max_len,))
    return {"inputs": model_inputs(b), "labels": b["labels"]}

  def lengths(self) -> np.ndarray:
    return np.array([len(x) for x in self.ids])

  def digest(self) -> str:
    return digest_arrays(np.concatenate(self.ids) if self.ids else np.zeros(0, np.int32), self.lengths(),
                          self.labels, np.asarray(self.max_len))


def encode(data: TaskData, tokenizer, max_len: int, label_offset: int = 0) -> Encoded:
  """Tokenise with truncation to ``max_len``; labels shifted by ``label_offset`` (a shared head's label range)."""
  enc = tokenizer(data.texts, truncation=True, max_length=max_len)
  return Encoded([np.asarray(x, np.int32) for x in enc["input_ids"]], data.labels + label_offset, max_len)


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


def train_batches(ds: Dataset, batch_size: int, seed: int, *, start_step: int = 0) -> Iterator[dict[str, Any]]:
  """Endless shuffled epochs of full batches; batch k is a function of (seed, k) alone, so a resumed run
  (``start_step``) sees exactly the batches an uninterrupted run would."""
  if len(ds) < batch_size:
    raise DataError(f"{len(ds)} training rows are fewer than one batch of {batch_size}")
  per_epoch = len(ds) // batch_size
  step = start_step
  while True:
    epoch, k = divmod(step, per_epoch)
    order = epoch_order(len(ds), seed, epoch)
    yield ds.batch(order[k * batch_size:(k + 1) * batch_size])
    step += 1


def eval_batches(ds: Dataset, batch_size: int) -> Iterator[tuple[dict[str, Any], np.ndarray]]:
  """(batch, row indices) covering every row once, sorted by length (if rows have one) for fewer padded tokens.
  The last batch is padded with repeats of its first row to keep the shape: only its first ``len(indices)`` rows
  are real."""
  lengths = ds.lengths()
  order = np.arange(len(ds)) if lengths is None else np.argsort(lengths, kind="stable")
  for i in range(0, len(order), batch_size):
    idx = order[i:i + batch_size]
    padded = np.concatenate([idx, np.repeat(idx[:1], batch_size - len(idx))])
    yield ds.batch(padded, bucketed=True), idx


def model_inputs(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The arrays a BERT apply takes from a collated batch."""
  return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


@dataclasses.dataclass
class ReplayBuffer:
  """Old-task rows kept for replay, with the old network's stored outputs on them (FIP's reference)."""
  data: Dataset
  ref_outputs: np.ndarray | None = None   # [N, K] float32
  seed: int = 0

  def sample(self, step: int, batch_size: int) -> dict[str, Any]:
    """``{"inputs", "labels"[, "ref_outputs"]}`` drawn without replacement, a function of (seed, step):
    resumable and reproducible."""
    idx = np.random.default_rng([self.seed, 1_000_003, step]).choice(len(self.data), size=batch_size,
                                                                     replace=False)
    batch = self.data.batch(idx)
    if self.ref_outputs is not None:
      batch["ref_outputs"] = self.ref_outputs[idx]
    return batch
