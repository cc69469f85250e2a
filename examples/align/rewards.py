"""Example rewards for ``fipjax.align --reward`` (a function of a list of completion texts, one score each).

    python -m fipjax.align --model smollm2 --method lora-fip-dpo --pairs on-policy \
        --reward examples/align/rewards.py:brevity --round m1=examples/align/m1.jsonl \
        --round m2=examples/align/m2.jsonl --max-new-tokens 24 --max-steps 4 --out runs/align-on-policy
"""

import re

POSITIVE = frozenset("good great excellent wonderful amazing best love loved lovely enjoyable fun fantastic "
                     "perfect delicious friendly beautiful brilliant superb nice favorite recommend".split())
NEGATIVE = frozenset("bad worst terrible awful boring poor rude disappointing waste horrible dull bland "
                     "cold slow dirty mediocre overpriced never hate hated".split())


def brevity(texts):
  """Shorter is better: minus the number of characters."""
  return [-float(len(t)) for t in texts]


def positivity(texts):
  """A word-list sentiment score: (positive − negative words) per word, in [−1, 1]."""
  scores = []
  for t in texts:
    words = re.findall(r"[a-z']+", t.lower())
    scores.append((sum(w in POSITIVE for w in words) - sum(w in NEGATIVE for w in words)) / max(len(words), 1))
  return scores
