"""What the benchmark commands share: typed options read from the command line, timing of compiled programs, and
a result written as it grows.

Each benchmark declares its options as a frozen dataclass whose fields are :func:`flag` s; its ``main`` parses argv
into that dataclass (:func:`parse_args`), and one benchmark calls another's ``run`` with the other's dataclass.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import pathlib
import statistics
import sys
import time
import typing
from typing import Any, Callable, Sequence, TypeVar

import jax
import jax.numpy as jnp

from fipjax.models import hub

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
Options = TypeVar("Options")


class OptionError(ValueError):
  """An option whose value names nothing a benchmark can build (a model spec, a method's variant)."""


def random_spec(spec: str) -> tuple[int, int]:
  """``'random:L:H'`` → (L layers, width H), H a multiple of 64 (heads of 64); OptionError otherwise."""
  try:
    _, layers, hidden = spec.split(":")
    layers, hidden = int(layers), int(hidden)
  except ValueError:
    raise OptionError(f"model spec {spec!r}: expected 'random:LAYERS:HIDDEN', e.g. 'random:12:768'") from None
  if hidden % 64:
    raise OptionError(f"model spec {spec!r}: the width must be a multiple of 64 (heads of 64)")
  return layers, hidden


def compiled_call(jitted, *args):
  """(zero-argument call that runs the program on ``args`` and waits for it, the compiled program), compiled once
  so that its timings, memory and FLOP figures all come from the same executable."""
  compiled = jitted.lower(*args).compile()
  return lambda: jax.block_until_ready(compiled(*args)), compiled


def interleaved_times(calls: dict, repeats: int) -> dict[str, float]:
  """Median seconds of each zero-argument call, timed in rounds of one call each (after a warm-up call each), so
  that drifts of the machine's speed over minutes touch every entry alike and ratios between them stay fair."""
  for call in calls.values():
    call()
  samples = {name: [] for name in calls}
  for _ in range(repeats):
    for name, call in calls.items():
      t0 = time.perf_counter()
      call()
      samples[name].append(time.perf_counter() - t0)
  return {name: statistics.median(v) for name, v in samples.items()}


def flag(default, help: str, **argparse_kw):
  """An options field that is also the flag ``--name-with-dashes``: a bool is a switch (default False), a
  ``tuple[T, ...]`` takes several values (``nargs`` ``*`` unless given), anything else one value of its type."""
  return dataclasses.field(default=default, metadata={"help": help, **argparse_kw})


def parser(options: type, doc: str, prog: str) -> argparse.ArgumentParser:
  """The command line of ``options`` (a dataclass of :func:`flag` fields) and ``--json``."""
  p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
  hints = typing.get_type_hints(options)
  for f in dataclasses.fields(options):
    kw, kind = dict(f.metadata), hints[f.name]
    if kind is bool:
      kw["action"] = "store_true"
    elif typing.get_origin(kind) is tuple:
      kw = {"type": typing.get_args(kind)[0], "nargs": "*", **kw}
    else:
      kw["type"] = kind
    p.add_argument("--" + f.name.replace("_", "-"), default=f.default, **kw)
  p.add_argument("--json", type=pathlib.Path, default=None, help="write the result here (after each part)")
  return p


def parse_args(options: type[Options], doc: str, prog: str, argv=None) -> tuple[Options, pathlib.Path | None]:
  """(``options`` from argv, the ``--json`` path or None)."""
  args = vars(parser(options, doc, prog).parse_args(argv))
  out = args.pop("json")
  return options(**{k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}), out


def write_json(path: pathlib.Path, result: dict) -> None:
  """``result`` to ``path`` atomically (a ``.tmp`` beside it, then renamed over it)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(result, indent=1))
  os.replace(tmp, path)


class Progress:
  """A result built part by part: after each part its figures join ``result``, and ``result`` with the parts done,
  pending (and failed, with the error) is written to ``path``, so that a crash late keeps what was measured."""

  def __init__(self, path: pathlib.Path | None, parts: Sequence[str], **result: Any):
    self.path = path
    self.result = {**result, "parts": {"done": [], "pending": list(parts)}}
    self.write()

  def write(self) -> None:
    if self.path is not None:
      write_json(self.path, self.result)

  @contextlib.contextmanager
  def part(self, name: str):
    """Yields a dict for the part's figures; they join the result when the block ends without an error."""
    figures: dict[str, Any] = {}
    try:
      yield figures
    except BaseException as e:
      self.result["parts"]["failed"] = {"part": name, "error": f"{type(e).__name__}: {e}"}
      self.write()
      raise
    self.result.update(figures)
    self.result["parts"]["pending"].remove(name)
    self.result["parts"]["done"].append(name)
    self.write()


def cli(measure: Callable[[], dict], table: Callable[[dict], str], out: pathlib.Path | None) -> int:
  """Measure, print the table, write the JSON; a model that cannot be loaded or built exits 2 with the reason."""
  try:
    result = measure()
  except (hub.CheckpointError, OptionError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(table(result))
  if out is not None:
    write_json(out, result)
  return 0
