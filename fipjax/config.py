"""Configuration as code: nested frozen dataclasses whose leaf fields carry a help sentence and a check.

A configuration is a tree of dataclasses (sections) with scalar leaves. :func:`option` declares a leaf with its
help text and validity check; :func:`add_flags` turns every leaf into one ``--section.leaf`` flag (its dotted
path; sections marked ``inline`` add no name), grouped by section in ``--help``; :func:`apply_flags` folds
parsed flags into a preset, :func:`problems` lists every invalid value, and :func:`describe`
prints the whole tree. Presets are plain values of the config type.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from typing import Any, Callable, Iterator, Mapping, NamedTuple

Check = Callable[[Any], bool]

positive: Check = lambda v: v > 0
non_negative: Check = lambda v: v >= 0
CHECK_WORDS = {positive: "> 0", non_negative: "≥ 0"}


def interval(lo, hi, *, closed: bool = False) -> Check:
  """``lo ≤ v < hi`` (``closed``: ``lo ≤ v ≤ hi``)."""
  check = (lambda v: lo <= v <= hi) if closed else (lambda v: lo <= v < hi)
  CHECK_WORDS[check] = f"in [{lo}, {hi}{']' if closed else ')'}"
  return check


def one_of(*choices) -> Check:
  check = lambda v: v in choices
  CHECK_WORDS[check] = "one of " + ", ".join(map(str, choices))
  return check


def option(default, help: str, check: Check | None = None):
  """A configuration leaf: its default, one help sentence, and an optional check (None always passes)."""
  return dataclasses.field(default=default, metadata={"help": help, "check": check})


def section(cls, *, inline: bool = False):
  """A nested section defaulting to ``cls()``. An ``inline`` section adds no name to its leaves' flags (the
  methods' sections sit under one field of the code's configuration but are flags of their own: ``--fip.beta``)."""
  return dataclasses.field(default_factory=cls, metadata={"inline": inline})


class Leaf(NamedTuple):
  """One scalar leaf: its attribute ``path``, the dotted ``flag`` path, its field, type annotation and value."""
  path: tuple[str, ...]
  flag: tuple[str, ...]
  field: dataclasses.Field
  kind: Any
  value: Any


def leaves(cfg, _path: tuple[str, ...] = (), _flag: tuple[str, ...] = ()) -> Iterator[Leaf]:
  """Every scalar leaf, depth first in declaration order."""
  hints = typing.get_type_hints(type(cfg))
  for f in dataclasses.fields(cfg):
    value = getattr(cfg, f.name)
    if dataclasses.is_dataclass(value):
      yield from leaves(value, _path + (f.name,), _flag if f.metadata.get("inline") else _flag + (f.name,))
    else:
      yield Leaf(_path + (f.name,), _flag + (f.name,), f, hints[f.name], value)


def flag_name(flag: tuple[str, ...]) -> str:
  """``("fip", "beta")`` → ``--fip.beta``: sections joined by dots, words of a name by dashes."""
  return "--" + ".".join(part.replace("_", "-") for part in flag)


def _scalar_type(kind) -> tuple[type, bool]:
  """(int/float/str/bool, whether None is allowed) of a leaf's annotation."""
  args = [a for a in typing.get_args(kind) if a is not type(None)]
  optional = type(None) in typing.get_args(kind)
  base = args[0] if args else kind
  return (base if base in (int, float, bool) else str), optional


def parse_value(text: str, kind):
  base, optional = _scalar_type(kind)
  if optional and text.lower() == "none":
    return None
  if base is bool:
    if text.lower() in ("1", "true", "yes"):
      return True
    if text.lower() in ("0", "false", "no"):
      return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
  try:
    return base(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected {'an integer' if base is int else 'a number'}"
                                     f"{' or none' if optional else ''}, got {text!r}") from None


def _sections(cfg) -> dict[str, Any]:
  """The sections that name the first part of a flag (an inline section's own sections), by that name."""
  out = {}
  for f in dataclasses.fields(cfg):
    value = getattr(cfg, f.name)
    if dataclasses.is_dataclass(value):
      out.update(_sections(value) if f.metadata.get("inline") else {f.name: value})
  return out


def add_flags(parser: argparse.ArgumentParser, presets: dict[str, Any]) -> None:
  """One ``--section.leaf`` flag per leaf (:func:`flag_name`), grouped by top-level section in ``--help``, its help
  the leaf's sentence plus every preset's value."""
  first = next(iter(presets.values()))
  sections, groups = _sections(first), {}
  seen = set()
  for leaf in leaves(first):
    name = flag_name(leaf.flag)
    assert name not in seen, f"two configuration leaves share the flag {name}"
    seen.add(name)
    top = leaf.flag[0] if len(leaf.flag) > 1 else ""
    if top not in groups:
      doc = (type(sections[top]).__doc__ or "").strip().split("\n")[0] if top else None
      groups[top] = parser.add_argument_group(f"--{top}.*" if top else "configuration", doc)
    values = "; ".join(f"{p}: {get(cfg, leaf.path)}" for p, cfg in presets.items())
    groups[top].add_argument(name, dest="cfg__" + "__".join(leaf.path), default=argparse.SUPPRESS,
                             metavar=kind_word(leaf.kind), type=lambda s, kind=leaf.kind: parse_value(s, kind),
                             help=f"{leaf.field.metadata.get('help', '')} ({values})")


def kind_word(kind) -> str:
  base, optional = _scalar_type(kind)
  word = {int: "INT", float: "X", bool: "BOOL"}.get(base, "TEXT")
  return word + ("|none" if optional else "")


def get(cfg, path: tuple[str, ...]):
  for p in path:
    cfg = getattr(cfg, p)
  return cfg


def replace(cfg, path: tuple[str, ...], value):
  if len(path) == 1:
    return dataclasses.replace(cfg, **{path[0]: value})
  return dataclasses.replace(cfg, **{path[0]: replace(getattr(cfg, path[0]), path[1:], value)})


def apply_flags(cfg, args: argparse.Namespace):
  """``cfg`` with every flag the user gave folded in (``none`` sets an optional leaf to None)."""
  for leaf in list(leaves(cfg)):
    dest = "cfg__" + "__".join(leaf.path)
    if hasattr(args, dest):
      cfg = replace(cfg, leaf.path, getattr(args, dest))
  return cfg


def problems(cfg) -> list[str]:
  """One sentence per leaf whose value fails its check."""
  out = []
  for leaf in leaves(cfg):
    check = leaf.field.metadata.get("check")
    if leaf.value is not None and check is not None and not check(leaf.value):
      out.append(f"{flag_name(leaf.flag)} must be {CHECK_WORDS.get(check, 'valid')}, got {leaf.value!r}")
  return out


def to_dict(cfg) -> dict:
  return dataclasses.asdict(cfg)


def describe(cfg) -> str:
  """The whole configuration, one section per line."""
  lines = []
  for f in dataclasses.fields(cfg):
    value = getattr(cfg, f.name)
    text = json.dumps(dataclasses.asdict(value)) if dataclasses.is_dataclass(value) else repr(value)
    lines.append(f"  {f.name}: {text}")
  return "\n".join(lines)


def with_values(cfg, values: Mapping[str, Any]):
  """``cfg`` with leaves replaced by their dotted flag path (``{"optim.lr": 5e-5, "fip.beta": 16.0}``, dashes or
  underscores alike): how presets are written."""
  paths = {".".join(leaf.flag): leaf.path for leaf in leaves(cfg)}
  norm = {name.replace("-", "_"): value for name, value in values.items()}
  unknown = sorted(set(norm) - set(paths))
  if unknown:
    raise KeyError(f"no configuration leaf named {unknown}")
  for name, value in norm.items():
    cfg = replace(cfg, paths[name], value)
  return cfg


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose errors are one paragraph (no usage dump), exit code 2; flags are never abbreviated (``--fip``
  is not ``--fip.beta``)."""

  def __init__(self, *args, **kw):
    super().__init__(*args, **{"allow_abbrev": False, **kw})

  def error(self, message):
    self.exit(2, f"error: {message}. See `{self.prog} --help`.\n")


def parse(parser: ArgumentParser, presets: dict[str, Any], argv=None) -> tuple[Any, argparse.Namespace]:
  """(the chosen ``--preset`` with every flag folded in and checked, the parsed namespace)."""
  add_flags(parser, presets)
  args = parser.parse_args(argv)
  cfg = apply_flags(presets[getattr(args, "preset", next(iter(presets)))], args)
  bad = problems(cfg)
  if bad:
    parser.error("; ".join(bad))
  return cfg, args
