"""Larger example months for ``fipjax.align``, drawn from the offline reviews the same way as ``m1``–``m3``.

    python examples/align/make_months.py --out runs/months --train 128 --test 64

writes ``OUT/film/``, ``OUT/restaurant/`` and ``OUT/opening/``, each a month directory with ``train.jsonl`` (from
the reviews' training split) and ``test.jsonl`` (from their test split, so no review is in both):

* ``film`` (conversational): "Give me a one-sentence opinion of a film you watched." — chosen the first sentence of
  a positive IMDB review, rejected that of a negative one;
* ``restaurant`` (conversational): "In one sentence, how was the restaurant?" — chosen a 1-star Yelp review's first
  sentence, rejected a 5-star one's (a preference that pulls against ``film``'s);
* ``opening`` (standard, no chat template): "Review opening: " — chosen positive, rejected negative IMDB.

First sentences of 3 to ``--max-words`` words only; the draw is seeded by ``--seed``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re

import numpy as np

DATA = pathlib.Path(__file__).resolve().parents[3] / "shared" / "data"
SENTENCE = re.compile(r"^(.+?[.!?])(\s|$)")

# (month, dataset, chosen label, rejected label, prompt; a string prompt is TRL's standard format)
MONTHS = (("film", "imdb", 1, 0, "Give me a one-sentence opinion of a film you watched."),
          ("restaurant", "yelp", 0, 4, "In one sentence, how was the restaurant?"),
          ("opening", "imdb", 1, 0, None))


def first_sentences(path: pathlib.Path, label: int, max_words: int) -> list[str]:
  """First sentences (3 to ``max_words`` words, HTML breaks removed) of the reviews with ``label``, in file order."""
  out = []
  for line in path.read_text().split("\n"):     # not splitlines: reviews hold U+2028 inside their strings
    row = json.loads(line) if line.strip() else {"label": None}
    if row["label"] != label:
      continue
    m = SENTENCE.match(row["text"].replace("<br />", " ").strip())
    if m and 3 <= len(m.group(1).split()) <= max_words:
      out.append(m.group(1))
  return out


def month_rows(dataset: str, split: str, chosen: int, rejected: int, prompt: str | None, n: int, rng,
               data_dir: pathlib.Path, max_words: int) -> list[dict]:
  good, bad = (first_sentences(data_dir / dataset / f"{split}.jsonl", c, max_words) for c in (chosen, rejected))
  if min(len(good), len(bad)) < n:
    raise SystemExit(f"{dataset} {split} has {min(len(good), len(bad))} usable first sentences of a class, fewer than "
                     f"the {n} pairs asked for; ask for fewer.")
  good, bad = ([texts[i] for i in rng.choice(len(texts), n, replace=False)] for texts in (good, bad))
  if prompt is None:
    return [{"prompt": "Review opening: ", "chosen": c, "rejected": r} for c, r in zip(good, bad)]
  message = lambda role, text: [{"role": role, "content": text}]
  return [{"prompt": message("user", prompt), "chosen": message("assistant", c), "rejected": message("assistant", r)}
          for c, r in zip(good, bad)]


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", type=pathlib.Path, required=True, help="folder for the month directories (must not exist)")
  p.add_argument("--train", type=int, default=128, help="training pairs per month")
  p.add_argument("--test", type=int, default=64, help="test pairs per month")
  p.add_argument("--max-words", type=int, default=25, help="longest first sentence kept, in words")
  p.add_argument("--seed", type=int, default=0, help="seed of the draw")
  p.add_argument("--data-dir", type=pathlib.Path, default=DATA, help="the reviews (../shared/data)")
  args = p.parse_args(argv)
  if args.out.exists():
    raise SystemExit(f"{args.out} exists; choose a new folder (nothing was written).")
  for j, (name, dataset, chosen, rejected, prompt) in enumerate(MONTHS):
    for split, n in (("train", args.train), ("test", args.test)):
      rng = np.random.default_rng([args.seed, j, split == "test"])
      rows = month_rows(dataset, split, chosen, rejected, prompt, n, rng, args.data_dir, args.max_words)
      path = args.out / name / f"{split}.jsonl"
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{args.out / name}: {args.train} training and {args.test} test pairs")


if __name__ == "__main__":
  main()
