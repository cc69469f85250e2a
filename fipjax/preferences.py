"""Your own preference data: TRL's formats read, checked, templated, tokenised and encoded as DPO pairs.

A round's file is JSON Lines in one of TRL's two preference formats (every row the same):

* standard: ``{"prompt": str, "chosen": str, "rejected": str}``, used as written;
* conversational: ``{"prompt": [{"role", "content"}, …], "chosen": [{"role": "assistant", …}], "rejected": […]}``,
  rendered with the tokenizer's chat template as TRL does (``maybe_apply_chat_template``): the prompt with the
  generation prompt added, each completion as the text the template adds after the prompt.

Tokenised as TRL's ``DPOTrainer.tokenize_row`` does for a decoder-only model: no special tokens added to the prompt,
the end-of-sequence token appended to each completion. Truncation: ``max_prompt_length`` keeps a prompt's last tokens
(its start is cut, TRL's ``keep_end`` for prompts); ``max_length`` then cuts each completion's end so that prompt and
completion fit (TRL's ``keep_start`` on the sequence past the prompt).

Encoded pairs are fixed-width arrays: the prompt left-padded to ``P`` tokens, the completion right-padded to ``R``
(:func:`encode_pairs`), the layout of :func:`fipjax.alignment.response_sequences`, so that offline and sampled pairs
go through the same DPO, replay and FIP code.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np

from fipjax.data import DataError

FIELDS = ("prompt", "chosen", "rejected")
ROLES = ("system", "user", "assistant", "tool")


def _problem(path: pathlib.Path, line: int, what: str) -> DataError:
  return DataError(f"{path}, line {line}: {what}. Each line must be a JSON object with exactly the fields "
                   f"{', '.join(FIELDS)}, in TRL's standard format (three strings) or conversational format (lists "
                   "of {\"role\", \"content\"} messages); fix or remove the line.")


def _messages(value: Any, path: pathlib.Path, line: int, field: str) -> list[dict]:
  if not isinstance(value, list) or not value:
    raise _problem(path, line, f"'{field}' must be a non-empty list of messages in the conversational format")
  for m in value:
    if not isinstance(m, dict) or set(m) != {"role", "content"} or not isinstance(m["content"], str):
      raise _problem(path, line, f"'{field}' holds {json.dumps(m)[:80]}, not a {{\"role\", \"content\"}} message "
                                 "with text content")
    if m["role"] not in ROLES:
      raise _problem(path, line, f"'{field}' has a message of unknown role {m['role']!r} (roles: {', '.join(ROLES)})")
  if field != "prompt" and any(m["role"] != "assistant" for m in value):
    raise _problem(path, line, f"'{field}' must hold the assistant's messages only")
  return value


def _text(value: Any, conversational: bool) -> str:
  return json.dumps(value, sort_keys=True) if conversational else value


def read_pairs(path: str | pathlib.Path, *, prompt_only: bool = False) -> list[dict]:
  """The rows of a preference file, checked: one format throughout, no empty, identical or missing completion.
  With ``prompt_only`` (pairs sampled on-policy) a row may also be TRL's prompt-only ``{"prompt": …}``."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise DataError(f"{path} does not exist or is not a file; pass a JSON Lines file of prompt / chosen / "
                    "rejected rows (or a directory with train.jsonl and test.jsonl).")
  rows, kind = [], None
  for n, raw in enumerate(path.read_bytes().splitlines(), 1):
    if not raw.strip():
      continue
    try:
      row = json.loads(raw)
    except ValueError as e:
      raise _problem(path, n, f"not valid JSON ({getattr(e, 'msg', e)})") from None
    if not isinstance(row, dict):
      raise _problem(path, n, f"not a JSON object (got {type(row).__name__})")
    fields = ("prompt",) if prompt_only and set(row) == {"prompt"} else FIELDS
    missing, extra = [f for f in fields if f not in row], sorted(set(row) - set(fields))
    if missing or extra:
      raise _problem(path, n, (f"missing {', '.join(missing)}" if missing else "") + ("; " if missing and extra
                              else "") + (f"unexpected field(s) {', '.join(extra)}" if extra else ""))
    this = "conversational" if isinstance(row["prompt"], list) else "standard"
    if kind not in (None, this):
      raise _problem(path, n, f"a {this} row in a file whose earlier rows are {kind}")
    kind = this
    if this == "standard":
      bad = [f for f in fields if not isinstance(row[f], str)]
      if bad:
        raise _problem(path, n, f"{', '.join(bad)} must be text in the standard format")
    else:
      for f in fields:
        _messages(row[f], path, n, f)
    if fields == FIELDS:
      _check_completions(row, this == "conversational", path, n)
    rows.append(row)
  if not rows:
    raise DataError(f"{path} holds no preference rows; each line must be a JSON object with {', '.join(FIELDS)}.")
  return rows


def _check_completions(row: Mapping, conversational: bool, path: pathlib.Path, line: int) -> None:
  for f in ("chosen", "rejected"):
    if not (any(m["content"].strip() for m in row[f]) if conversational else row[f].strip()):
      raise _problem(path, line, f"'{f}' is empty")
  if _text(row["chosen"], conversational) == _text(row["rejected"], conversational):
    raise _problem(path, line, "'chosen' and 'rejected' are identical: the pair prefers neither")


def load_round(path: str | pathlib.Path, *, test_fraction: float, seed: int,
               prompt_only: bool = False) -> dict[str, list[dict]]:
  """``{"train", "test"}`` rows of a round: a directory's ``train.jsonl`` and ``test.jsonl``, or one file's rows
  split by a seeded draw of ``test_fraction`` of them (at least one of each); ``prompt_only``: see
  :func:`read_pairs`."""
  path = pathlib.Path(path)
  if path.is_dir():
    missing = [f for f in ("train.jsonl", "test.jsonl") if not (path / f).is_file()]
    if missing:
      raise DataError(f"{path} is a directory without {' and '.join(missing)}; a round is a JSON Lines file or a "
                      "directory holding train.jsonl and test.jsonl.")
    return {s: read_pairs(path / f"{s}.jsonl", prompt_only=prompt_only) for s in ("train", "test")}
  rows = read_pairs(path, prompt_only=prompt_only)
  n_test = int(round(test_fraction * len(rows)))
  if len(rows) < 2 or not 0 < n_test < len(rows):
    raise DataError(f"{path} has {len(rows)} pairs: a --test-fraction of {test_fraction} leaves "
                    f"{n_test} for testing and {len(rows) - n_test} for training; each needs at least one (add "
                    "pairs, change --test-fraction, or pass a directory with train.jsonl and test.jsonl).")
  order = np.random.default_rng([seed, 29]).permutation(len(rows))
  test = set(order[:n_test].tolist())
  return {"train": [r for i, r in enumerate(rows) if i not in test],
          "test": [r for i, r in enumerate(rows) if i in test]}


def _template(tokenizer) -> None:
  if not getattr(tokenizer, "chat_template", None):
    raise DataError("the rows are conversational but the tokenizer has no chat template (tokenizer_config.json's "
                    "chat_template, or a GGUF file's tokenizer.chat_template); give the rows in the standard "
                    "format, or use a model whose tokenizer has a template.")


def render_prompts(rows: Sequence[Mapping], tokenizer) -> list[str]:
  """Each row's prompt text: a standard prompt as written, a conversational one through the chat template with the
  generation prompt added."""
  if any(not isinstance(row["prompt"], str) for row in rows):
    _template(tokenizer)
  return [row["prompt"] if isinstance(row["prompt"], str) else tokenizer.apply_chat_template(
      list(row["prompt"]), tokenize=False, add_generation_prompt=True) for row in rows]


def render(rows: Sequence[Mapping], tokenizer) -> list[tuple[str, str, str]]:
  """(prompt, chosen, rejected) texts: standard rows as written; conversational rows through the tokenizer's chat
  template (TRL's ``maybe_apply_chat_template``)."""
  out = []
  for row, prompt in zip(rows, render_prompts(rows, tokenizer)):
    if isinstance(row["prompt"], str):
      out.append((prompt, row["chosen"], row["rejected"]))
      continue
    full = lambda c: tokenizer.apply_chat_template(list(row["prompt"]) + list(c), tokenize=False)
    texts = [full(row[f]) for f in ("chosen", "rejected")]
    if not all(t.startswith(prompt) for t in texts):
      raise DataError("the chat template renders a conversation that does not begin with its rendered prompt, so "
                      "prompt and completion cannot be told apart; use the standard format for this model.")
    out.append((prompt, *(t[len(prompt):] for t in texts)))
  return out


def _prompt_ids(prompt: str, encode, *, max_prompt_length: int, max_length: int) -> list[int]:
  kept = encode(prompt)[-max_prompt_length:]
  if len(kept) >= max_length:
    raise DataError(f"a prompt of {len(kept)} tokens (after --max-prompt-length {max_prompt_length}) fills "
                    f"--max-length {max_length} before its completion starts ({prompt[:60]!r}…); raise --max-length "
                    "or lower --max-prompt-length.")
  return kept


def _encoder(tokenizer):
  return lambda t: list(tokenizer(t, add_special_tokens=False)["input_ids"])


def tokenize(texts: Sequence[tuple[str, str, str]], tokenizer, *, max_prompt_length: int,
             max_length: int) -> tuple[list[list[int]], list[list[int]], list[list[int]], int]:
  """(prompt ids, chosen ids, rejected ids, how many rows were truncated), TRL's tokenisation and truncation (see
  the module docstring)."""
  eos, encode = tokenizer.eos_token_id, _encoder(tokenizer)
  prompts, chosen, rejected, cut = [], [], [], 0
  for p, c, r in texts:
    kept = _prompt_ids(p, encode, max_prompt_length=max_prompt_length, max_length=max_length)
    room = max_length - len(kept)
    ids = [(encode(x) + ([eos] if eos is not None else [])) for x in (c, r)]
    cut += len(kept) < len(encode(p)) or any(len(i) > room for i in ids)
    prompts.append(kept)
    chosen.append(ids[0][:room])
    rejected.append(ids[1][:room])
  return prompts, chosen, rejected, cut


def tokenize_prompts(prompts: Sequence[str], tokenizer, *, max_prompt_length: int,
                     max_length: int) -> tuple[list[list[int]], int]:
  """(prompt ids, how many were truncated) of on-policy prompts, truncated as :func:`tokenize` truncates."""
  encode = _encoder(tokenizer)
  ids = [_prompt_ids(p, encode, max_prompt_length=max_prompt_length, max_length=max_length) for p in prompts]
  return ids, sum(len(i) < len(encode(p)) for i, p in zip(ids, prompts))


def encode_pairs(prompts: list[list[int]], chosen: list[list[int]], rejected: list[list[int]], *,
                 width: tuple[int, int], pad_id: int) -> dict[str, Any]:
  """``{"prompt": (ids, mask) [N, P], "chosen", "rejected": {"input_ids", "attention_mask", "response_mask"}
  [N, P + R], "reward_chosen", "reward_rejected" [N]}``: prompts left-padded, completions right-padded. The rows'
  own preference ranks chosen above rejected (reward 1 against 0)."""
  p_width, r_width = width
  n = len(prompts)
  ids, mask = left_padded(prompts, p_width, pad_id)

  def sequences(completions):
    tok = np.full((n, r_width), pad_id, np.int32)
    tmask = np.zeros((n, r_width), np.int32)
    for i, c in enumerate(completions):
      tok[i, :len(c)], tmask[i, :len(c)] = c, 1
    return {"input_ids": np.concatenate([ids, tok], 1), "attention_mask": np.concatenate([mask, tmask], 1),
            "response_mask": np.concatenate([np.zeros_like(mask), tmask], 1)}

  return {"prompt": (ids, mask), "chosen": sequences(chosen), "rejected": sequences(rejected),
          "reward_chosen": np.ones(n, np.float32), "reward_rejected": np.zeros(n, np.float32)}


def left_padded(prompts: Sequence[Sequence[int]], width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """(ids, mask) ``[N, width]`` int32 of prompts left-padded with ``pad_id``."""
  ids = np.full((len(prompts), width), pad_id, np.int32)
  mask = np.zeros((len(prompts), width), np.int32)
  for i, p in enumerate(prompts):
    ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
  return ids, mask


def repad(pairs: Mapping[str, Any], width: tuple[int, int], pad_id: int) -> dict[str, Any]:
  """Encoded pairs (or sequences with a ``response_mask``) of a narrower ``(P, R)`` padded out to ``width``."""
  def seq(s):
    p_old = int(np.argmax(s["response_mask"].any(0))) if s["response_mask"].any() else s["input_ids"].shape[1]
    left, right = width[0] - p_old, width[1] - (s["input_ids"].shape[1] - p_old)
    pad = lambda a, v: np.pad(a, ((0, 0), (left, right)), constant_values=v)
    return {"input_ids": pad(s["input_ids"], pad_id), "attention_mask": pad(s["attention_mask"], 0),
            "response_mask": pad(s["response_mask"], 0)}
  return {k: seq(v) if isinstance(v, Mapping) and "response_mask" in v else v for k, v in pairs.items()}
