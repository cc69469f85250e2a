"""Reports: ``report.md`` and figures of a task stream's run (accuracy matrices, CL metrics, any T) and of a
continual-alignment run (reward matrices, preference accuracy, KL, memory)."""

from __future__ import annotations

import pathlib
import platform

import jax

from fipjax import results as results_lib

DEFINITIONS = """Definitions. R[i, j] = test accuracy on task j after stage i, task-aware (argmax within the task's own
labels). ACC = mean_j R[T, j]. BWT = mean_{j<T} (R[T, j] − R[j, j]) (Lopez-Paz & Ranzato, divided by T − 1).
Forgetting = mean_{j<T} (max_{l<T} R[l, j] − R[T, j]) (Chaudhry et al.). Task-agnostic accuracy = argmax over every
label of a shared head. Weight change = ‖θ_final − θ_1‖_F / ‖θ_1‖_F over all parameters, θ_1 the network after the
first task (LoRA on merged weights). Path = mean distance of the old tasks' outputs to their stored references on
a probe of each replay buffer."""


def versions() -> dict[str, str]:
  import importlib.metadata as md
  out = {"python": platform.python_version(), "platform": platform.platform(),
         "devices": ", ".join(sorted({d.device_kind for d in jax.devices()})) + f" ×{jax.device_count()}"}
  for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "datasets", "fipjax"):
    try:
      out[pkg] = md.version(pkg)
    except md.PackageNotFoundError:
      pass
  return out


def _fmt(x, spec: str = ".3f") -> str:
  return "n/a" if x is None else format(x, spec)


def write(out: pathlib.Path, results: dict, title: str) -> str:
  """``report.md`` and the figures of a run of either kind (:func:`fipjax.results.kind_of`); returns the
  markdown."""
  kind = results_lib.kind_of(results)
  return (write_stream if kind == results_lib.STREAM.kind else write_alignment)(out, results, title)


def _every_scalar(results: dict) -> list[str]:
  return ["", "## Every scalar column", "", *results_lib.scalar_table(results_lib.kind_of(results),
                                                                        results["methods"])]


def write_stream(out: pathlib.Path, results: dict, title: str) -> str:
  """``report.md`` and the figures of a task stream's run under ``out``; returns the markdown."""
  methods = results["methods"]
  tasks = next(iter(methods.values()))["tasks"]
  t = len(tasks)
  cols = [f"{task} after stage {i + 1}" for i in range(t) for task in tasks]
  lines = [f"# {title}, seed {results['seed']}", "", f"Command: `{results['command']}`", "",
           "## Table 1: test accuracy (task-aware), R[i, j] row by row", "",
           "| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
  for name, m in methods.items():
    lines.append(f"| {name} | " + " | ".join(_fmt(x) for row in m["accuracy_matrix"] for x in row) + " |")
  lines += ["", "## Table 2: change from the first-task network to the final network", "",
            "| method | " + " | ".join(f"Δ {task}" for task in tasks) +
            " | weight change | ACC | BWT | forgetting | task-agnostic (final) |", "|---" * (t + 6) + "|"]
  for name, m in methods.items():
    r = m["accuracy_matrix"]
    agnostic = m["task_agnostic_matrix"][-1]
    agn = "n/a" if all(a is None for a in agnostic) else " / ".join(_fmt(a) for a in agnostic)
    lines.append(f"| {name} | " + " | ".join(f"{r[-1][j] - r[0][j]:+.3f}" for j in range(t)) +
                 f" | {m['weight_change']:.4f} | {m['average_accuracy']:.3f} | {m['backward_transfer']:+.3f} | "
                 f"{m['forgetting']:.3f} | {agn} |")
  for name, m in methods.items():
    for task, info in m.get("generators", {}).items():
      lines += ["", f"{name}: stores no {task} inputs; it replays features drawn from a generator fit to {task}'s "
                f"hidden representation (loss {info['loss_curve'][0]:.2f} → {info['loss_curve'][-1]:.2f}), whose "
                f"samples the {task} network classifies as the class they were drawn for "
                f"{info['class_agreement']:.1%} of the time."]
  lines += [*_every_scalar(results), "", DEFINITIONS, "", timings_line(results["timings"]),
            memory_line(results.get("memory")),
            "", "![weight change](weight_change.png)"]
  if any(m["path"]["step"] for m in methods.values()):
    lines.append("![path](fip_path.png)")
  return _finish(out, lines, lambda: plot(out, methods))


def memory_line(memory: dict[str, dict[str, int]] | None) -> str:
  """Peak resident memory at the end of each outermost phase (``results["memory"]``)."""
  if not memory:
    return ""
  top = {k: v for k, v in memory.items() if "/" not in k}
  return "Peak resident memory so far, at the end of each phase (GiB): " + ", ".join(
      f"{k} {v['peak_rss_bytes'] / 2**30:.2f}" for k, v in top.items()) + "."


def timings_line(timings: dict[str, float]) -> str:
  """The outermost phases of :class:`fipjax.runs.Timings`, with the compilation inside each."""
  top = {k: v for k, v in timings.items() if "/" not in k}
  return "Timings (s; compilation in brackets): " + ", ".join(
      f"{k} {v:.0f} ({timings.get(f'{k}/compile', 0.0):.0f})" for k, v in top.items())


def _finish(out: pathlib.Path, lines: list[str], plot_fn) -> str:
  text = "\n".join(lines) + "\n"
  (out / "report.md").write_text(text)
  plot_fn()
  return text


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _path_figure(path: pathlib.Path, curves: dict, xlabel: str, distance_label: str, loss_label: str) -> None:
  """Two panels over steps, one line per method: ``curves[name] = (steps, distances, new-task losses)``."""
  plt = _pyplot()
  fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
  for n, (step, distance, loss) in curves.items():
    ax0.plot(step, distance, "o-", ms=3, label=n)
    ax1.plot(step, loss, "o-", ms=3, label=n)
  for ax, label in ((ax0, distance_label), (ax1, loss_label)):
    ax.set_xlabel(xlabel)
    ax.set_ylabel(label)
  ax0.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot(out: pathlib.Path, methods: dict) -> None:
  """``weight_change.png`` (overall and per layer) and ``fip_path.png`` (old-task distance, new-task loss)."""
  plt = _pyplot()
  fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [1, 2]})
  names = list(methods)
  ax0.bar(names, [methods[n]["weight_change"] for n in names], color="tab:blue")
  ax0.set_ylabel("‖θ_final − θ_1‖ / ‖θ_1‖")
  ax0.set_title("fractional weight change")
  ax0.tick_params(axis="x", rotation=45)
  groups = list(next(iter(methods.values()))["weight_change_by_layer"])
  for n in names:
    ax1.plot(groups, [max(methods[n]["weight_change_by_layer"][g], 1e-12) for g in groups], "o-", label=n)
  ax1.set_yscale("log")
  ax1.set_title("per layer")
  ax1.tick_params(axis="x", rotation=45)
  ax1.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out / "weight_change.png", dpi=110)
  plt.close(fig)
  tracked = {n: m["path"] for n, m in methods.items() if m["path"]["step"]}
  if tracked:
    _path_figure(out / "fip_path.png", {n: (p["step"], p["functional_distance"], p["new_loss"])
                                        for n, p in tracked.items()}, "step after the first task",
                 "distance of old-task outputs to their reference\n(probe of the replay buffers)",
                 "new-task training loss")


ALIGNMENT_DEFINITIONS = """Definitions. R[i, j] = mean reward of round j's test prompts (one sampled completion each, the
same sampling keys for every policy) after round i; row 0 is the base model. Reward forgetting = R[j, j] − R[T, j]
for each earlier round j. Preference accuracy = share of a round's held-out pairs (sampled from the policy
entering that round; ties left out) whose implicit reward β(log π − log π_ref) ranks the chosen completion first
(IPO: per-token mean log-probabilities). KL to base =
mean per-token KL(π ‖ π_base) and perplexity = exp(mean NLL), both teacher-forced on held-out reviews. Peak step
memory = XLA's memory analysis of one training step. Stored references = the bytes FIP keeps of the old rounds'
token distributions (top-k ids, log-probabilities and the tail's mass at every position of the buffer's
sequences). Time = the training loops of the later rounds. Drift = mean
compressed Bhattacharyya distance of the old rounds' token distributions to those of the policy entering the
round, on a probe of each buffer. Old rounds' distance = the same after each later round, on every buffered anchor
sequence and on completions (sampled from the policy entering the round) to as many of the old rounds' unseen test
prompts."""


def write_alignment(out: pathlib.Path, results: dict, title: str) -> str:
  """``report.md``, ``rewards.png`` and ``drift.png`` of a continual-alignment run; returns the markdown."""
  methods = results["methods"]
  rounds = next(iter(methods.values()))["rounds"]
  t = len(rounds)
  cols = ["base"] + [f"after {i + 1}" for i in range(t)]
  lines = [f"# {title}, seed {results['seed']}", "", f"Command: `{results['command']}`", "",
           "Rewards: " + ("; ".join(f"{n}: {r['reward']}" + (
               f" (test accuracy {r['classifier']['test_accuracy']:.3f} on {r['classifier']['test_rows']} reviews)"
               if "classifier" in r else "") for n, r in results["rewards"].items() if r is not None)
                          or "none (each round's own preference pairs)"), "",
           "## Table 1: mean reward of each round's test prompts, R[i, j]", "",
           "| method | round | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
  for name, m in methods.items():
    for j, rnd in enumerate(rounds):
      lines.append(f"| {name} | {rnd} | " + " | ".join(_fmt(row[j]) for row in m["reward_matrix"]) + " |")
  lines += ["", "## Table 1b: implicit-reward preference accuracy on each round's test pairs", "",
            "| method | round | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
  for name, m in methods.items():
    for j, rnd in enumerate(rounds):
      lines.append(f"| {name} | {rnd} | " + " | ".join(_fmt(row[j]) for row in m["preference_accuracy_matrix"])
                   + " |")
  rewarded = any(f is not None for m in methods.values() for f in m["reward_forgetting"])
  forgetting, what = ("reward_forgetting", "reward") if rewarded else ("forgetting", "pref. acc.")
  lines += ["", "## Table 2: the final policy", "",
            "| method | " + " | ".join(f"forgetting {r} ({what})" for r in rounds[:-1]) + " | " +
            " | ".join(f"pref. acc. {r}" for r in rounds) +
            " | KL to base | perplexity | peak step memory (MiB) | stored references (KiB) | time (s) |",
            "|---" * (2 * t + 5) + "|"]
  for name, m in methods.items():
    acc = m["preference_accuracy_matrix"][-1]
    lines.append(f"| {name} | " + " | ".join(_fmt(f, "+.3f") for f in m[forgetting]) + " | " +
                 " | ".join(_fmt(a) for a in acc) + f" | {_fmt(m['kl_to_base'][-1], '.4f')} | "
                 f"{_fmt(m['perplexity'][-1], '.2f')} | "
                 f"{m['peak_step_memory_bytes'] / 2**20:.0f} | {m['stored_reference_bytes'] / 1024:.1f} | "
                 f"{m['train_time_s']:.0f} |")
  if any(m.get("old_round_distance") for m in methods.values()):
    lines += ["", "## Table 3: old rounds' distance to the policy entering each later round, buffer / unseen prompts",
              "", "| method | " + " | ".join(f"after {i + 2}" for i in range(t - 1)) + " |", "|---" * t + "|"]
    lines += [f"| {name} | " + " | ".join(f"{d['buffer']:.4f} / {d['held_out']:.4f}"
                                           for d in m.get("old_round_distance") or []) + " |"
              for name, m in methods.items()]
  lines += [*_every_scalar(results), "", ALIGNMENT_DEFINITIONS, "",
            timings_line(results["timings"]), memory_line(results.get("memory")), "",
            "![rewards](rewards.png)", "![drift](drift.png)"]
  return _finish(out, lines, lambda: plot_alignment(out, methods))


def plot_alignment(out: pathlib.Path, methods: dict) -> None:
  """``rewards.png`` (each round's reward after every round, per method) and ``drift.png``."""
  plt = _pyplot()
  rounds = next(iter(methods.values()))["rounds"]
  fig, axes = plt.subplots(1, len(rounds), figsize=(5 * len(rounds), 4), squeeze=False)
  rewarded = any(x is not None for m in methods.values() for row in m["reward_matrix"] for x in row)
  key, what = ("reward_matrix", "reward") if rewarded else ("preference_accuracy_matrix", "preference accuracy")
  for j, (ax, rnd) in enumerate(zip(axes[0], rounds)):
    for name, m in methods.items():
      points = [(i, row[j]) for i, row in enumerate(m[key]) if row[j] is not None]
      ax.plot([i for i, _ in points], [v for _, v in points], "o-", label=name)
    ax.set_xticks(range(len(rounds) + 1), ["base"] + [f"after {i + 1}" for i in range(len(rounds))])
    ax.set_title(f"{what} of {rnd} (test)")
  axes[0][0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out / "rewards.png", dpi=110)
  plt.close(fig)
  _path_figure(out / "drift.png", {n: (m["drift"]["step"], m["drift"]["distance"], m["drift"]["new_loss"])
                                   for n, m in methods.items()}, "step of the round",
               "old rounds' token distributions:\nBhattacharyya distance to the round's start",
               "DPO loss of the new round")
