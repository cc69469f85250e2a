"""Configuration as code: nested frozen dataclasses whose leaf fields carry a help sentence and a check.

A configuration is a tree of dataclasses (sections) with scalar leaves. :func:`option` declares a leaf with its
help text and validity check; :func:`add_flags` turns every leaf into one ``--flag`` (leaf names are unique across
sections), :func:`apply_flags` folds parsed flags into a preset, :func:`problems` lists every invalid value, and
:func:`describe` prints the whole tree. Presets are plain values of the config type.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from typing import Any, Callable, Iterator

Check = Callable[[Any], bool]

positive: Check = lambda v: v > 0
non_negative: Check = lambda v: v >= 0
CHECK_WORDS = {positive: "> 0", non_negative: "≥ 0"}


def one_of(*choices) -> Check:
  check = lambda v: v in choices
  CHECK_WORDS[check] = "one of " + ", ".join(map(str, choices))
  return check


def option(default, help: str, check: Check | None = None):
  """A configuration leaf: its default, one help sentence, and an optional check (None always passes)."""
  return dataclasses.field(default=default, metadata={"help": help, "check": check})


def section(cls):
  """A nested section defaulting to ``cls()``."""
  return dataclasses.field(default_factory=cls)


def leaves(cfg) -> Iterator[tuple[tuple[str, ...], dataclasses.Field, Any, Any]]:
  """(path, field, type, value) for every scalar leaf, depth first in declaration order."""
  hints = typing.get_type_hints(type(cfg))
  for f in dataclasses.fields(cfg):
    value = getattr(cfg, f.name)
    if dataclasses.is_dataclass(value):
      for path, leaf, kind, v in leaves(value):
        yield (f.name,) + path, leaf, kind, v
    else:
      yield (f.name,), f, hints[f.name], value


def flag_name(path: tuple[str, ...]) -> str:
  return "--" + path[-1].replace("_", "-")


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


def add_flags(parser: argparse.ArgumentParser, presets: dict[str, Any]) -> None:
  """One ``--flag`` per leaf, its help the leaf's sentence plus every preset's value."""
  seen = set()
  for path, f, kind, _ in leaves(next(iter(presets.values()))):
    name = flag_name(path)
    assert name not in seen, f"two configuration leaves share the flag {name}"
    seen.add(name)
    values = "; ".join(f"{p}: {get(cfg, path)}" for p, cfg in presets.items())
    parser.add_argument(name, dest="cfg__" + "__".join(path), default=argparse.SUPPRESS, metavar=kind_word(kind),
                        type=lambda s, kind=kind: parse_value(s, kind),
                        help=f"{f.metadata.get('help', '')} ({values})")


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
  for path, *_ in list(leaves(cfg)):
    dest = "cfg__" + "__".join(path)
    if hasattr(args, dest):
      cfg = replace(cfg, path, getattr(args, dest))
  return cfg


def problems(cfg) -> list[str]:
  """One sentence per leaf whose value fails its check."""
  out = []
  for path, f, _, value in leaves(cfg):
    check = f.metadata.get("check")
    if value is not None and check is not None and not check(value):
      out.append(f"{flag_name(path)} must be {CHECK_WORDS.get(check, 'valid')}, got {value!r}")
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


def with_values(cfg, **values):
  """``cfg`` with leaves replaced by name (leaf names are unique): how presets are written."""
  paths = {path[-1]: path for path, *_ in leaves(cfg)}
  unknown = sorted(set(values) - set(paths))
  if unknown:
    raise KeyError(f"no configuration leaf named {unknown}")
  for name, value in values.items():
    cfg = replace(cfg, paths[name], value)
  return cfg


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose errors are one paragraph (no usage dump), exit code 2."""

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
