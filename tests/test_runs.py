"""Run directories, the stage cache under concurrent runs, file-system faults, and configuration as code."""

import dataclasses
import errno
import json
import os
import pathlib
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fipjax import checkpoint, memory, report, runs
from fipjax import config as cf


def test_run_dir_resumes_the_same_run_and_refuses_another_once_it_has_progress(tmp_path):
  a, b = {"config": {"lr": 1}}, {"config": {"lr": 2}}
  run, resuming = runs.RunDir.open(tmp_path / "run", a)
  assert not resuming
  with pytest.raises(runs.UsageError, match="another process is writing"):
    runs.RunDir.open(tmp_path / "run", a)                  # held by `run`
  run._lock.close()
  # A failed start (no progress yet) does not block the corrected command...
  run, resuming = runs.RunDir.open(tmp_path / "run", b)
  assert not resuming and json.loads((tmp_path / "run" / "run.json").read_text())["identity"] == b
  run.save_part("naive", {"done": True})
  run._lock.close()
  # ...but once a part is done, only the same configuration may resume it.
  with pytest.raises(runs.UsageError, match="another run"):
    runs.RunDir.check(tmp_path / "run", a)
  run, resuming = runs.RunDir.open(tmp_path / "run", b)
  assert resuming and run.part("naive") == {"done": True}
  run.finish({"x": 1})
  with pytest.raises(runs.UsageError, match="never overwritten"):
    runs.RunDir.check(tmp_path / "run", b)


def test_results_are_strict_json(tmp_path):
  with pytest.raises(ValueError):
    runs.write_json(tmp_path / "r.json", {"acc": float("nan")})
  assert not (tmp_path / "r.json").exists() and not list(tmp_path.iterdir())


def test_stage_cache_key_follows_contents_and_version(monkeypatch):
  cache = runs.StageCache("unused")
  k = cache.key("stage1", {"data": "abc", "lr": 1e-3})
  assert k == cache.key("stage1", {"lr": 1e-3, "data": "abc"})
  assert k != cache.key("stage1", {"data": "abd", "lr": 1e-3})
  monkeypatch.setattr(runs, "VERSION", "9.9.9")
  assert k != cache.key("stage1", {"data": "abc", "lr": 1e-3})


def test_two_runs_sharing_a_cache_compute_the_first_stage_once(tmp_path):
  code = ("import pathlib, sys; sys.path.insert(0, sys.argv[3]); from test_streams import run; "
          "sys.exit(run(pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), methods=('naive',)))")
  procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / f"run{i}"), str(tmp_path / "cache"),
                             str(pathlib.Path(__file__).parent)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
  out = "".join(o for o, _ in outs)
  assert out.count("stage 1 (A): training") == 1 and out.count("stage 1 (A): reusing") == 1, out[-3000:]
  r0, r1 = (json.loads((tmp_path / f"run{i}" / "results.json").read_text())["methods"]["naive"] for i in (0, 1))
  assert r0["accuracy_matrix"] == r1["accuracy_matrix"]


def test_compilation_cache_goes_beside_the_stage_cache_unless_one_is_configured(tmp_path):
  """In a fresh process (this one's cache is the test session's): the cache goes where asked, or stays where the
  user configured it."""
  code = ("import pathlib, sys, jax, jax.numpy as jnp; from fipjax import runs; "
          "print(runs.use_compilation_cache(pathlib.Path(sys.argv[1]))); "
          "jax.jit(lambda x: jnp.sin(x) * 3.0 + 1.0)(jnp.ones(7)).block_until_ready()")
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  for configured in (None, tmp_path / "mine"):
    if configured is not None:
      env["JAX_COMPILATION_CACHE_DIR"] = str(configured)
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "xla")], capture_output=True, text=True,
                          env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    used = configured or tmp_path / "xla"
    assert done.stdout.strip() == str(used) and len(list(used.iterdir())) > 0


def test_timings_nest_phases_and_count_compilation_apart():
  t = runs.Timings()
  with t.phase("stage"):
    with t.phase("train"):
      jax.jit(lambda x: x * 3.0 + 1.0).lower(jnp.ones(7)).compile()
    with t.phase("train"):
      pass
  assert set(t) == {"stage", "stage/compile", "stage/train", "stage/train/compile"}
  assert 0 < t["stage/train/compile"] <= t["stage/train"] <= t["stage"]
  assert t["stage/compile"] == pytest.approx(t["stage/train/compile"])
  line = report.timings_line(t)                   # the report names the outermost phases alone
  assert line == f"Timings (s; compilation in brackets): stage {t['stage']:.0f} ({t['stage/compile']:.0f})"


def test_checkpoint_writer_writes_behind_and_raises_its_failure_in_the_caller(tmp_path, monkeypatch):
  tree = {"w": jnp.arange(6.0)}
  rows = ["a"]
  with checkpoint.Writer() as w:
    w.submit(tmp_path, 1, tree, {"rows": rows})
    w.submit(tmp_path, 2, tree, {"rows": rows})       # waits for step 1, then drops it (keep=1)
    rows.append("after")                              # the metadata is the one at submit time
  assert checkpoint.latest_step(tmp_path).name == "step_00000002"
  assert checkpoint.load_meta(tmp_path / "step_00000002")["rows"] == ["a"]
  assert [p.name for p in tmp_path.iterdir()] == ["step_00000002"]
  chex.assert_trees_all_equal(checkpoint.restore(tmp_path / "step_00000002", tree), tree)
  usage = checkpoint.shutil.disk_usage
  monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: usage(p)._replace(free=10))
  w = checkpoint.Writer()
  w.submit(tmp_path, 3, tree)
  with pytest.raises(OSError, match="No space left"):
    w.wait()
  assert checkpoint.latest_step(tmp_path).name == "step_00000002"


def test_full_disk_is_one_paragraph_and_exit_1(tmp_path, monkeypatch, capsys):
  from test_streams import run
  usage = checkpoint.shutil.disk_usage
  monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: usage(p)._replace(free=1000))
  assert run(tmp_path / "run", tmp_path / "cache", methods=("naive",)) == 1
  err = capsys.readouterr().err
  assert "the disk is full" in err and "resume" in err and "Traceback" not in err
  assert runs.os_error_message(OSError(errno.EROFS, "Read-only file system", "/x")).exit_code == 1


@dataclasses.dataclass(frozen=True)
class Inner:
  rate: float = cf.option(0.1, "a rate", cf.positive)
  name: str = cf.option("a", "a choice", cf.one_of("a", "b"))


@dataclasses.dataclass(frozen=True)
class Outer:
  inner: Inner = cf.section(Inner)
  steps: int | None = cf.option(None, "how many", cf.positive)
  flag: bool = cf.option(False, "a switch")


def test_config_flags_help_presets_and_checks(capsys):
  presets = {"small": Outer(), "big": cf.with_values(Outer(), {"inner.rate": 0.5, "steps": 10})}
  assert presets["big"].inner.rate == 0.5 and presets["big"].steps == 10
  p = cf.ArgumentParser(prog="x")
  p.add_argument("--preset", default="small", choices=sorted(presets))
  cfg, _ = cf.parse(p, presets, ["--preset", "big", "--steps", "none", "--flag", "true", "--inner.name", "b"])
  assert cfg == Outer(Inner(0.5, "b"), None, True)
  with pytest.raises(SystemExit) as e:
    cf.parse(cf.ArgumentParser(prog="x"), presets, ["--inner.rate", "-1"])
  assert e.value.code == 2 and "--inner.rate must be > 0, got -1.0" in capsys.readouterr().err
  help_text = cf.ArgumentParser(prog="x")
  cf.add_flags(help_text, presets)
  text = help_text.format_help()
  assert "a rate (small: 0.1; big: 0.5)" in text and "how many (small: None; big: 10)" in text
  with pytest.raises(KeyError):
    cf.with_values(Outer(), {"nope": 1})


def test_every_yelp_imdb_flag_has_a_help_sentence():
  from experiments import yelp_imdb
  for leaf in cf.leaves(yelp_imdb.Config()):
    assert len(leaf.field.metadata.get("help", "")) > 10, leaf.path
  flags = {cf.flag_name(leaf.flag) for leaf in cf.leaves(yelp_imdb.Config())}
  assert flags >= {"--optim.lr", "--fip.beta", "--lora.rank", "--lora.fip.beta", "--geodesic.kappa", "--seed",
                   "--bir.generator.steps", "--first.steps", "--stages.steps", "--data.max-len"}


def test_the_package_exposes_every_module():
  import fipjax
  for name in ("continual", "lora", "models", "streams", "runs", "config", "data", "geometry", "paths", "si", "gem",
               "generative"):
    assert hasattr(fipjax, name), name
  assert fipjax.models.load_bert is not None and fipjax.continual.build is not None


def test_each_phase_records_the_memory_when_it_ended():
  t = runs.Timings()
  with t.phase("outer"):
    with t.phase("inner"):
      block = np.ones(2**25, np.uint8)        # 32 MiB resident inside the inner phase
    del block
  assert set(t.memory) == {"outer", "outer/inner"}
  for m in t.memory.values():
    assert m["peak_rss_bytes"] >= m["rss_bytes"] > 2**25


def test_released_memory_keeps_programs_working():
  """memory.release(compiled=True) drops JAX's compiled programs: a jitted function compiles again and gives the
  same result; freed heap memory goes back (resident memory does not grow)."""
  f = jax.jit(lambda x: jnp.sin(x) * 2)
  x = jnp.arange(4.0)
  before = np.asarray(f(x))
  assert f._cache_size() == 1
  memory.release(compiled=True)
  assert f._cache_size() == 0
  np.testing.assert_array_equal(np.asarray(f(x)), before)
  junk = [np.ones(1000, np.uint8) for _ in range(20000)]          # many small blocks: the C heap, not mmap
  del junk
  rss = runs.memory_now()["rss_bytes"]
  memory.release()
  assert runs.memory_now()["rss_bytes"] <= rss
