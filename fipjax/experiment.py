"""An experiment's command line around a stage loop: parse, check, build, run, report.

:func:`experiment_main` is every experiment's ``main`` once its flags are parsed; :func:`run_experiment` is what it
runs (also called directly by tests): the run directory opened or resumed, the loop's ``run_all``, ``results.json``
and the report written last.
"""

from __future__ import annotations

import pathlib
import sys
from typing import Any, Callable, Sequence

import jax

from fipjax import config as cf
from fipjax import data, parallel, report, runs

PyTree = Any


DISTRIBUTED_HELP = ("one process of a multi-host run: call jax.distributed.initialize() first (one process a host; "
                    "the coordinator from the cluster's environment: TPU slice, SLURM, or JAX_COORDINATOR_ADDRESS, "
                    "JAX_NUM_PROCESSES, JAX_PROCESS_ID; docs/scaling.md)")


def experiment_main(module: str, argv: Sequence[str] | None, cfg, args, methods: Sequence[str],
                    build: Callable[[], tuple[Any, PyTree]], *, title: str, runs_root: pathlib.Path,
                    before: Callable[[], None] = lambda: None, user_errors: tuple[type[Exception], ...] = (),
                    write: Callable[[pathlib.Path, dict, str], str] = report.write) -> int:
  """An experiment's ``main`` once ``argv`` is parsed into ``cfg`` and ``args``: ``jax.distributed.initialize()``
  with ``--distributed`` (:data:`DISTRIBUTED_HELP`), ``before()`` (checks that need no data, set-up), then
  :func:`run_experiment` into ``args.out`` (else the unfinished run of this configuration under ``runs_root``, else
  a new one). Returns the exit code; failures are one paragraph on stderr (:func:`runs.cli_main`,
  ``user_errors`` exiting 2 beside :class:`fipjax.data.DataError`)."""
  command = " ".join([f"python -m {module}"] + list(sys.argv[1:] if argv is None else argv))
  config = cf.to_dict(cfg)

  def run():
    if getattr(args, "distributed", False):
      parallel.initialize_distributed()
    before()
    out = args.out or runs.default_out(runs_root, {"config": config, "methods": list(methods)})
    runs.log(f"configuration (preset {args.preset}):\n{cf.describe(cfg)}")
    run_experiment(build, methods=methods, config=config, out=out, cache_dir=getattr(args, "cache_dir", None),
                   title=title, command=command, write=write)

  return runs.cli_main(run, user_errors=(data.DataError, *user_errors))


def run_experiment(build: Callable[[], tuple[Any, PyTree]], *, methods: Sequence[str], config: dict,
                   out: pathlib.Path, cache_dir: pathlib.Path | None, title: str, command: str,
                   write: Callable[[pathlib.Path, dict, str], str] = report.write) -> dict:
  """Everything an experiment's command line does after parsing: check ``out`` and ``cache_dir`` (writing
  nothing), ``build()`` the stage loop and the initial parameters (loading the model and data: bad input fails
  here), open the run directory, the loop's first stage and then its methods (``run_all``, the initial parameters
  dropped in between), write ``results.json`` (last, atomically), and ``write`` ``report.md`` and the figures (a
  :class:`fipjax.stages.StageLoop`)."""
  identity = {"config": config, "methods": list(methods)}
  runs.RunDir.check(out, identity)
  if cache_dir is not None:
    runs.check_writable_dir(cache_dir, "--cache-dir")
    runs.use_compilation_cache(pathlib.Path(cache_dir) / "xla")
  loop, init_params = build()
  run_dir, resuming = runs.RunDir.open(pathlib.Path(out), identity)
  runs.log(f"{'resuming' if resuming else 'writing'} {out}; devices: {jax.device_count()} "
           f"({jax.devices()[0].device_kind})")
  first = loop.first_stage(init_params)
  del init_params          # the alignment runner keeps the base model's statistics, not its weights
  results = loop.run_methods(methods, first, run_dir)
  results = {"config": config, "seed": loop.seed, "command": command, "versions": report.versions(), **results}
  print(write(run_dir.path, results, title))
  run_dir.finish(results)
  runs.log(f"wrote {run_dir.path / 'results.json'}, {run_dir.path / 'report.md'}")
  return results
