"""Every command of README.md and docs/ parses with today's command line, so the docs never drift from the CLI."""

import importlib
import pathlib
import re
import shlex

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
START = re.compile(r"python -m ((?:experiments|benchmarks|fipjax)(?:\.[a-z0-9_]+)+)")
PLACEHOLDER = re.compile(r"^(\$?[A-Z]|\"\$[A-Z]\")$")      # S, K, $S, "$T": a value the text names in words


def commands() -> list[tuple[str, str, list[str]]]:
  """(where, module, argv) of every ``python -m`` command (continued over lines ending in a backslash), cut at the
  end of its inline code span, a comment or a table cell; commands elided with ``...`` are left out."""
  out = []
  for path in DOCS:
    lines = path.read_text().split("\n")
    for i, line in enumerate(lines):
      for match in START.finditer(line):
        text, j = line[match.end():], i
        while text.rstrip().endswith("\\") and j + 1 < len(lines):
          j += 1
          text = text.rstrip()[:-1] + " " + lines[j]
        if line[:match.start()].count("`") % 2 and "`" not in text and j + 1 < len(lines):   # inline code wraps
          text += " " + lines[j + 1]
        text = re.split(r"`|\s#|\s\|", text)[0]
        if "..." in text or "…" in text:
          continue
        # a bracketed [--optional flag] is read without its brackets; a bracket inside a word (fip-dpo[k=v]) stays
        words = shlex.split(re.sub(r"(?:(?<=\s)|^)\[|\](?=\s|$)", " ", text))
        words = ["1" if PLACEHOLDER.match(w) else re.sub(r"\{([^,}]*),[^}]*\}", r"\1", w) for w in words]
        out.append((f"{path.name}:{i + 1}", match.group(1), words))
  return out


def parse(module: str, argv: list[str]):
  mod = importlib.import_module(module)
  if hasattr(mod, "parse_args"):
    return mod.parse_args(argv)
  return mod.parser().parse_args(argv)


def test_the_docs_hold_commands_of_every_experiment():
  modules = {m for _, m, _ in commands()}
  assert {"experiments.yelp_imdb", "experiments.continual_dpo", "experiments.split_digits"} <= modules


@pytest.mark.parametrize("where,module,argv", commands(), ids=lambda x: x if isinstance(x, str) else None)
def test_documented_command_parses(where, module, argv, capsys):
  if module.startswith("experiments.summarize"):
    pytest.skip("takes results files, no flags")
  if not argv:          # the module named in prose: it exists and has a command line
    mod = importlib.import_module(module)
    assert hasattr(mod, "parse_args") or hasattr(mod, "parser"), module
    return
  try:
    parse(module, argv)
  except SystemExit as e:
    if e.code == 0:       # --help
      return
    pytest.fail(f"{where}: python -m {module} {' '.join(argv)}: exit {e.code}: {capsys.readouterr().err}")


def test_help_lists_flags_by_section(capsys):
  from experiments import yelp_imdb
  with pytest.raises(SystemExit) as e:
    yelp_imdb.parse_args(["--preset", "cpu", "--fip.beta", "4", "--lora.rank", "4", "--help"])
  text = capsys.readouterr().out
  assert e.value.code == 0
  for section in ("--optim.*", "--fip.*", "--lora.*", "--geodesic.*", "--ewc.*", "--si.*", "--gem.*", "--bir.*",
                  "--model.*", "--data.*", "--run.*"):
    assert f"\n{section}:" in text, section
  fip = text[text.index("\n--fip.*:"):text.index("\n--geodesic.*:")]
  assert "--fip.beta X" in fip and "--fip.distance TEXT" in fip and "--lora.rank" not in fip
