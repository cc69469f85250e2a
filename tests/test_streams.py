"""Task streams: a new 3-task experiment defined from the library alone, run end to end, killed and resumed."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.datasets import load_digits

from fipjax import config as cf
from fipjax import continual, data, experiment, runs, streams


# --- the experiment: digits 0–3, 4–6, 7–9 learnt in order by an MLP with one head per task (under 60 lines) ---
def digit_stream(seed=0):
  digits = load_digits()
  x, y = (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int32)
  tasks = []
  for name, (lo, hi) in zip("ABC", ((0, 4), (4, 7), (7, 10))):
    rows = np.flatnonzero((y >= lo) & (y < hi))
    test = rows[np.random.default_rng(seed).random(len(rows)) < 0.3]
    train = np.setdiff1d(rows, test)
    split = lambda r: data.Arrays(x[r], y[r] - lo)
    tasks.append(streams.TaskSpec(name, {"train": split(train), "test": split(test)}, hi - lo, head=name))
  ks = iter(jax.random.split(jax.random.PRNGKey(seed), 5))
  dense = lambda a, b: {"kernel": jax.random.normal(next(ks), (a, b)) / jnp.sqrt(a), "bias": jnp.zeros(b)}
  params = {"trunk": dense(64, 32), **{f"head_{t.name}": dense(32, t.num_labels) for t in tasks}}

  features = lambda p, inputs, **_: jnp.tanh(inputs @ p["trunk"]["kernel"] + p["trunk"]["bias"])
  readout = lambda p, h, **_: {t.name: h @ p[f"head_{t.name}"]["kernel"] + p[f"head_{t.name}"]["bias"] for t in tasks}
  apply = lambda p, inputs, **_: readout(p, features(p, inputs))
  return streams.Stream(apply, tuple(tasks), head_params=lambda h: rf"^head_{h}/",
                        split=(features, readout, r"^trunk/")), params


def run(out, cache, methods=("naive", "fip", "ewc", "si", "gem", "bir"), stop_after=None):   # agem: gem's path
  stream, params = digit_stream()
  cfg = dict(optim=continual.OptimConfig(lr=3e-3, weight_decay=0.0, batch_size=16, dropout=False),
             first=streams.FirstStageConfig(steps=30),
             stages=streams.StageConfig(steps=30, replay_batch_size=16, buffer_size=100),
             hp=cf.with_values(continual.MethodConfig(), {"fip.beta": 50.0, "ewc.samples": 50, "ewc.strength": 50.0,
                                                          "bir.generator.steps": 200, "bir.freeze_below": False}),
             run=streams.RunConfig(eval_batch_size=40, checkpoint_every=7, record_every=10, probe_size=20))
  build = lambda: (streams.Runner(stream, **cfg, seed=0, model_key={"mlp": 32}, cache=runs.StageCache(cache),
                                  progress=False, stop_after=stop_after), params)
  return runs.cli_main(lambda: experiment.run_experiment(
      build, methods=methods, config={k: cf.to_dict(v) for k, v in cfg.items()}, out=out, cache_dir=cache,
      title="Three digit tasks", command="test"))
# --- end of the experiment ---


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("stream")
  assert run(tmp / "run", tmp / "cache") == 0
  return json.loads((tmp / "run" / "results.json").read_text())


def test_three_tasks_give_a_3x3_matrix_and_metrics(uninterrupted):
  for name, m in uninterrupted["methods"].items():
    r = np.array(m["accuracy_matrix"])
    assert r.shape == (3, 3) and m["tasks"] == ["A", "B", "C"], name
    assert m["average_accuracy"] == pytest.approx(r[-1].mean())
    assert m["backward_transfer"] == pytest.approx(np.mean([r[2, 0] - r[0, 0], r[2, 1] - r[1, 1]]))
    assert m["task_agnostic_matrix"][-1] == [None, None, None]          # a head per task: no shared argmax
    assert len(m["loss_curve"]) == 60 and m["steps"] == [30, 30] and m["path"]["step"][-1] == 60
    assert r[0, 0] > 0.9 and r[1, 1] > 0.8 and r[2, 2] > 0.8, name     # each task is learnt in its stage
  fip, naive = uninterrupted["methods"]["fip"], uninterrupted["methods"]["naive"]
  assert fip["forgetting"] < naive["forgetting"]


def test_interp_sweep_fine_tunes_once_and_matches_an_uncached_run(tmp_path):
  """Every α of a sweep reuses the cached fine-tuning of the stage that starts from the same weights (stage 2 here;
  stage 3 starts from α's own stage-2 weights, so it trains per α), and ends exactly where an uncached run ends."""
  stream, params = digit_stream()
  make = lambda alpha, cache: streams.Runner(
      stream, optim=continual.OptimConfig(lr=3e-3, batch_size=16, dropout=False),
      first=streams.FirstStageConfig(steps=10), stages=streams.StageConfig(steps=10, buffer_size=20),
      hp=cf.with_values(continual.MethodConfig(), {"interp.alpha": alpha}), run=streams.RunConfig(eval_batch_size=40),
      seed=0, model_key={"mlp": 32}, cache=cache and runs.StageCache(cache))
  trained = []
  real = runs.train
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(runs, "train", lambda *a, **kw: trained.append(kw["name"]) or real(*a, **kw))
    got = {}
    for alpha in (0.3, 0.7):
      runner = make(alpha, tmp_path / "cache")
      got[alpha] = runner.run_method("interp", runner.first_stage(params),
                                     runs.RunDir.open(tmp_path / f"a{alpha}", {})[0])
    assert trained == ["stage 1 (A)", "interp (B)", "interp (C)", "interp (C)"]
    runner = make(0.7, None)
    plain = runner.run_method("interp", runner.first_stage(params), runs.RunDir.open(tmp_path / "plain", {})[0])
  for key in ("accuracy_matrix", "weight_change", "loss_curve", "path"):
    assert got[0.7][key] == plain[key], key
  assert got[0.3]["loss_curve"][:10] == plain["loss_curve"][:10]          # the same fine-tuning of stage 2
  assert got[0.3]["accuracy_matrix"][1] != plain["accuracy_matrix"][1]


def test_killed_and_resumed_stream_ends_identical(uninterrupted, tmp_path):
  codes = []
  while not codes or codes[-1] == 130:               # killed after every 75 steps, resumed from the last checkpoint
    codes.append(run(tmp_path / "run", tmp_path / "cache", stop_after=75))
    assert len(codes) < 30, codes
  assert codes[-1] == 0 and len(codes) >= 6, codes    # 390 steps in all: kills in every stage
  resumed = json.loads((tmp_path / "run" / "results.json").read_text())
  for name, m in uninterrupted["methods"].items():
    for key in ("accuracy_matrix", "loss_curve", "path", "weight_change", "task_agnostic_matrix"):
      assert resumed["methods"][name][key] == m[key], (name, key)
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_task_sets_its_own_loss_and_what_is_kept():
  stream, params = digit_stream()
  a = dataclasses.replace(stream.tasks[0], keep=lambda z: z[:, :2], loss=lambda z, y: jnp.zeros(z.shape[0]))
  stream = dataclasses.replace(stream, tasks=(a,) + stream.tasks[1:])
  batch = a.splits["train"].batch(np.arange(5))
  assert stream.outputs(a)(params, batch["inputs"]).shape == (5, 2)
  assert float(stream.task_loss(a, dropout=False)(params, batch)[0]) == 0.0
  runner = streams.Runner(stream, optim=continual.OptimConfig(batch_size=4), first=streams.FirstStageConfig(),
                          stages=streams.StageConfig(buffer_size=10), hp=continual.MethodConfig(),
                          run=streams.RunConfig(eval_batch_size=4), seed=0, model_key={})
  buffers = runner.buffers(params, 2)
  assert buffers["A"].ref_outputs.shape == (10, 2) and buffers["B"].ref_outputs.shape == (10, 3)
  np.testing.assert_allclose(buffers["A"].ref_outputs, stream.outputs(a)(params, buffers["A"].data.inputs),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("alpha", (0.0, 0.5, 1.0))
def test_interp_is_the_previous_weights_plain_fine_tuning_or_between(alpha, tmp_path):
  """Weight interpolation from the same first stage: α = 0 leaves the weights entering each stage exactly, α = 1 is
  plain fine-tuning's result exactly, α = ½ lies halfway (leaf by leaf)."""
  stream, params = digit_stream()
  hp = cf.with_values(continual.MethodConfig(), {"interp.alpha": alpha})
  runner = streams.Runner(stream, optim=continual.OptimConfig(lr=3e-3, batch_size=16, dropout=False),
                          first=streams.FirstStageConfig(steps=10), stages=streams.StageConfig(steps=10),
                          hp=hp, run=streams.RunConfig(eval_batch_size=40), seed=0, model_key={"mlp": 32})
  seen = {}
  finish = continual.interpolate
  spy = lambda h, start, end: seen.setdefault("ends", []).append((start, end)) or finish(h, start, end)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(continual, "interpolate", spy)
    first = runner.first_stage(params)
    naive = runner.run_method("naive", first, runs.RunDir.open(tmp_path / "n", {})[0])
    interp = runner.run_method("interp", first, runs.RunDir.open(tmp_path / "i", {})[0])
  if alpha == 1.0:
    assert interp["accuracy_matrix"] == naive["accuracy_matrix"] and interp["weight_change"] == naive["weight_change"]
  if alpha == 0.0:
    assert interp["weight_change"] == 0.0 and interp["accuracy_matrix"][-1] == interp["accuracy_matrix"][0]
  start, end = seen["ends"][0]
  got = finish(hp, start, end)
  for a, b, g in zip(jax.tree.leaves(start), jax.tree.leaves(end), jax.tree.leaves(got)):
    np.testing.assert_allclose(g, np.asarray(a) + alpha * (np.asarray(b) - np.asarray(a)), rtol=1e-6, atol=1e-7)
