"""End to end: the Yelp→IMDB pipeline on a few hundred real examples with the packaged MiniLM."""

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from experiments import yelp_imdb

TINY = ["--preset", "cpu", "--data.n-train-yelp", "64", "--data.n-train-imdb", "64", "--data.n-test", "40",
        "--data.n-val", "20", "--data.max-len", "32", "--optim.batch-size", "8", "--stages.replay-batch-size", "8",
        "--run.eval-batch-size", "20", "--first.steps", "4", "--stages.steps", "4", "--stages.buffer-size", "32",
        "--ewc.samples", "4", "--run.probe-size", "16", "--run.record-every", "2", "--run.checkpoint-every", "2",
        "--no-progress", "--bir.generator.steps", "300"]


TINY_MODEL = []     # the one-layer MiniLM checkpoint (conftest.small_bert), set once per module


@pytest.fixture(scope="module", autouse=True)
def _model(small_bert):
  TINY_MODEL[:] = ["--model.name", str(small_bert)]


def _run(tmp, *extra, out="run", cache="cache"):
  return yelp_imdb.main(TINY + TINY_MODEL + ["--out", str(tmp / out), "--cache-dir", str(tmp / cache), *extra])


# Every method runs through the same stream and registry (test_streams, test_continual); here the BERT pipeline
# runs three that touch its distinct paths: the replay penalty, LoRA with the geodesic solver, generated replay.
METHODS = ("fip", "lora-fip-geodesic", "bir")


@pytest.fixture(scope="module")
def all_methods(tmp_path_factory, data_dir, _model):
  tmp = tmp_path_factory.mktemp("all")
  assert _run(tmp, "--method", ",".join(METHODS), "--data.dir", str(data_dir)) == 0
  return tmp / "run"


def test_every_method_reports(all_methods):
  results = json.loads((all_methods / "results.json").read_text())
  assert set(results) >= {"config", "seed", "versions", "timings", "methods"}
  assert list(results["methods"]) == list(METHODS)
  for name, m in results["methods"].items():
    r = np.array(m["accuracy_matrix"])
    assert m["tasks"] == ["yelp", "imdb"] and r.shape == (2, 2) and ((0 <= r) & (r <= 1)).all(), name
    assert m["weight_change"] > 0, name
    assert set(m["weight_change_by_layer"]) >= {"embeddings", "layer 0", "pooler", "heads"}
    assert {"average_accuracy", "backward_transfer", "forgetting"} <= set(m)
    assert np.isfinite(m["loss_curve"]).all() and len(m["loss_curve"]) == 4
    assert m["task_agnostic_matrix"][-1][1] is not None
    assert m["path"]["step"] == [2, 4], name           # every method's path: old outputs' drift along it
  # Every method starts from the one stage-1 network.
  assert len({json.dumps(m["accuracy_matrix"][0]) for m in results["methods"].values()}) == 1
  for f in ("report.md", "weight_change.png", "fip_path.png"):
    assert (all_methods / f).stat().st_size > 0
  assert "Table 1" in (all_methods / "report.md").read_text()
  assert not (all_methods / "checkpoints").exists()
  generator = results["methods"]["bir"]["generators"]["yelp"]       # brain-inspired replay keeps no Yelp inputs
  assert 0 <= generator["class_agreement"] <= 1 and generator["loss_curve"][-1] < generator["loss_curve"][0]
  assert "bir: stores no yelp inputs" in (all_methods / "report.md").read_text()
  bir_layers = results["methods"]["bir"]["weight_change_by_layer"]
  assert bir_layers["embeddings"] == bir_layers["layer 0"] == 0.0 and bir_layers["heads"] > 0   # frozen below


def test_lora_methods_change_only_query_value_and_head(all_methods):
  m = json.loads((all_methods / "results.json").read_text())["methods"]["lora-fip-geodesic"]
  assert m["weight_change_by_layer"]["embeddings"] == 0.0 and m["weight_change_by_layer"]["pooler"] == 0.0
  assert m["weight_change_by_layer"]["layer 0"] > 0 and m["weight_change_by_layer"]["heads"] > 0
  solver = m["solver"]                   # every CG solve of the geodesic steps, reported
  assert len(solver["cg_residual"]) == len(solver["cg_iterations"]) == sum(m["steps"])
  assert all(np.isfinite(solver["cg_residual"])) and max(solver["cg_iterations"]) >= 1


def test_killed_run_resumes_to_the_same_results(tmp_path, data_dir, all_methods):
  args = ("--method", "fip", "--data.dir", str(data_dir))
  assert _run(tmp_path, *args, "--stop-after", "3", out="killed", cache="cache_killed") == 130  # in stage 1
  assert _run(tmp_path, *args, "--stop-after", "3", out="killed", cache="cache_killed") == 130  # in stage 2
  assert not (tmp_path / "killed" / "results.json").exists()
  assert _run(tmp_path, *args, out="killed", cache="cache_killed") == 0
  full = json.loads((all_methods / "results.json").read_text())["methods"]["fip"]     # the same run, never killed
  resumed = json.loads((tmp_path / "killed" / "results.json").read_text())["methods"]["fip"]
  for key in ("accuracy_matrix", "task_agnostic_matrix", "weight_change", "loss_curve", "path"):
    assert resumed[key] == full[key], key
  # Finished: the same command refuses to overwrite, and leaves the results as they were.
  before = (tmp_path / "killed" / "results.json").read_text()
  assert _run(tmp_path, *args, out="killed", cache="cache_killed") == 2
  assert (tmp_path / "killed" / "results.json").read_text() == before


def test_nan_stops_the_run_and_caches_nothing(tmp_path, capsys, data_dir):
  assert _run(tmp_path, "--method", "naive", "--data.dir", str(data_dir), "--optim.lr", "1e6") == 2
  err = capsys.readouterr().err
  assert "the loss became nan" in err and "--optim.lr" in err and "Traceback" not in err
  assert not (tmp_path / "run" / "results.json").exists()
  assert not list((tmp_path / "cache").glob("*/final"))


def test_naive_stage_two_is_the_first_stages_program(tmp_path, data_dir, monkeypatch):
  """With a shared head, naive fine-tuning's stage-2 step lowers to the program stage 1 compiled (it records SI's
  path integral as stage 1 does), so the compilation cache serves it: compiled once per run."""
  import dataclasses
  import re
  import jax
  import optax
  from fipjax import continual, streams
  seen, train = [], streams.Runner._train

  def spy(self, method, params, task, steps, seed, *args, **kw):
    seen.append((method, params, next(self.batches(task.splits["train"], seed, None)(0))))
    return train(self, method, params, task, steps, seed, *args, **kw)

  monkeypatch.setattr(streams.Runner, "_train", spy)
  assert _run(tmp_path, "--method", "naive", "--data.dir", str(data_dir)) == 0

  def program(method, params, batch):
    step, trainable, frozen, opt_state = continual.train_step(method, params, abstract=True)
    text = step.lower(trainable, frozen, opt_state, {**batch, "rng": jax.random.PRNGKey(0)}).as_text()
    return re.sub(r"loc\(.*", "", text)

  (first, second) = [program(*s) for s in seen]
  assert first == second
  method, params, batch = seen[1]        # without the path integral it would be a program of its own
  assert program(dataclasses.replace(method, optimizer=optax.adamw(5e-5, weight_decay=0.01)), params, batch) != first


@pytest.mark.slow
def test_four_devices_give_the_same_losses(tmp_path, data_dir, all_methods):
  """The module's fip run again on four (virtual) devices, data-parallel, from the module run's stage-1 network
  (its cache): the same losses and accuracies (dropout included: JAX's random bits do not depend on how the
  batch is sharded). Stage 1 runs the same sharded training loop."""
  env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "experiments.yelp_imdb", *TINY, *TINY_MODEL, "--method", "fip", "--data.dir",
         str(data_dir), "--out", str(tmp_path / "four"), "--cache-dir", str(all_methods.parent / "cache")]
  done = subprocess.run(cmd, capture_output=True, text=True, env=env)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "devices: 4" in done.stdout and "stage 1 (yelp): reusing the cached result" in done.stdout + done.stderr
  four = json.loads((tmp_path / "four" / "results.json").read_text())["methods"]["fip"]
  one = json.loads((all_methods / "results.json").read_text())["methods"]["fip"]
  np.testing.assert_allclose(four["loss_curve"], one["loss_curve"], rtol=2e-4)
  assert four["accuracy_matrix"] == one["accuracy_matrix"]



def test_bfloat16_weights_train_the_float32_runs_curve(tmp_path, data_dir, all_methods):
  """``--model.param-dtype bfloat16``: the weights stored in bfloat16 (float32 master weights and moments in the
  optimiser) follow the float32 run's loss curve to bfloat16's resolution."""
  assert _run(tmp_path, "--method", "fip", "--model.param-dtype", "bfloat16", "--data.dir", str(data_dir)) == 0
  got = json.loads((tmp_path / "run" / "results.json").read_text())
  want = json.loads((all_methods / "results.json").read_text())["methods"]["fip"]
  assert got["config"]["model"]["param_dtype"] == "bfloat16"
  np.testing.assert_allclose(got["methods"]["fip"]["loss_curve"], want["loss_curve"], rtol=0.05)

@pytest.mark.slow
def test_per_task_heads(tmp_path, data_dir):
  assert _run(tmp_path, "--method", "lora", "--model.heads", "per-task", "--data.dir", str(data_dir)) == 0
  m = json.loads((tmp_path / "run" / "results.json").read_text())["methods"]["lora"]
  assert m["task_agnostic_matrix"][-1] == [None, None]      # no shared label space to take an argmax over
  assert 0 <= m["accuracy_matrix"][1][1] <= 1


def test_fsdp_on_four_devices_gives_the_one_device_run(tmp_path, data_dir, all_methods, small_bert):
  """``--run.fsdp`` on 4 host devices (BERT's matrices split four ways, batches too): the one-device run's losses
  and accuracies."""
  # At the suite's XLA flags (conftest.py) eager per-leaf reductions of the sharded weights once deadlocked here in
  # XLA's CPU collectives (the weight-change metrics, now one jitted program each).
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4")
  args = TINY + ["--model.name", str(small_bert), "--data.dir", str(data_dir), "--method", "fip", "--run.fsdp", "true",
                 "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache")]
  done = subprocess.run([sys.executable, "-m", "experiments.yelp_imdb", *args], capture_output=True, text=True,
                        env=env, cwd=pathlib.Path(__file__).parents[1])
  assert done.returncode == 0, done.stderr[-3000:]
  total, fullest = map(float, re.search(r"FSDP over 4 devices: parameters ([\d.]+) MiB, ([\d.]+) MiB",
                                        done.stdout).groups())
  assert fullest < total / 2                  # the matrices split (the heads, norms and biases replicated)
  got = json.loads((tmp_path / "run" / "results.json").read_text())["methods"]["fip"]
  want = json.loads((all_methods / "results.json").read_text())["methods"]["fip"]
  np.testing.assert_allclose(got["loss_curve"], want["loss_curve"], rtol=1e-4)
  np.testing.assert_allclose(got["accuracy_matrix"], want["accuracy_matrix"], atol=1 / 40 + 1e-9)   # ≤ 1 row
