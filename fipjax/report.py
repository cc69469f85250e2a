"""Reports of a task stream's run: ``report.md`` (accuracy matrices, CL metrics) and figures, for any T."""

from __future__ import annotations

import pathlib
import platform

import jax

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


def _fmt(x) -> str:
  return "n/a" if x is None else f"{x:.3f}"


def write(out: pathlib.Path, results: dict, title: str) -> str:
  """``report.md`` and the figures under ``out``; returns the markdown."""
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
  lines += ["", DEFINITIONS, "", "Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in results["timings"].items()),
            "", "![weight change](weight_change.png)"]
  if any(m["path"]["step"] for m in methods.values()):
    lines.append("![path](fip_path.png)")
  text = "\n".join(lines) + "\n"
  (out / "report.md").write_text(text)
  plot(out, methods)
  return text


def plot(out: pathlib.Path, methods: dict) -> None:
  """``weight_change.png`` (overall and per layer) and ``fip_path.png`` (old-task distance, new-task loss)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
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
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
    for n, p in tracked.items():
      ax0.plot(p["step"], p["functional_distance"], "o-", ms=3, label=n)
      ax1.plot(p["step"], p["new_loss"], "o-", ms=3, label=n)
    ax0.set_xlabel("step after the first task")
    ax0.set_ylabel("distance of old-task outputs to their reference\n(probe of the replay buffers)")
    ax1.set_xlabel("step after the first task")
    ax1.set_ylabel("new-task training loss")
    ax0.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "fip_path.png", dpi=110)
    plt.close(fig)
