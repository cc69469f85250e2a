"""What a run's ``results.json`` holds for each method: one schema per kind of run, read by the report, the summary
tool and the plots (no reader guesses a kind from the keys it finds).

A :class:`Schema` is the kind's named columns, each with a format and one sentence; a runner's result for one method
is checked against it (:func:`check`) before it is saved, so a new column is declared here first.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

from fipjax import paths


class Column(NamedTuple):
  """One entry of a method's result: its ``name``, a format (``"{:.3f}"``; None for lists and mappings) and what it
  is."""
  name: str
  fmt: str | None
  description: str
  optional: bool = False


SOLVER = Column("solver", None, "per step, the metrics of the solver inside the step: "
                + "; ".join(f"{kind}: {', '.join(names)}" for kind, names in paths.SOLVER_METRICS.items())
                + " (methods whose steps run one)", optional=True)
COMMON = (
    Column("weight_change", "{:.4f}", "‖θ_final − θ_1‖_F / ‖θ_1‖_F, θ_1 after the first stage (LoRA: merged)"),
    Column("steps", None, "training steps of each later stage"),
    Column("train_time_s", "{:.0f}", "seconds in the later stages' training (this process)"),
    Column("final_loss", "{:.4f}", "the last step's training loss"),
    Column("loss_curve", None, "the training loss of every step of the later stages"),
    SOLVER,
)


class Schema(NamedTuple):
  kind: str
  columns: tuple[Column, ...]

  def names(self) -> list[str]:
    return [c.name for c in self.columns]

  def scalars(self) -> list[Column]:
    """The columns with a format: one number per method."""
    return [c for c in self.columns if c.fmt is not None]


STREAM = Schema("stream", (
    Column("tasks", None, "the tasks in the order learnt"),
    Column("accuracy_matrix", None, "R[i, j]: task-aware test accuracy on task j after stage i"),
    Column("task_agnostic_matrix", None, "the same over every label of a shared head (None: a task's own head)"),
    Column("validation", None, "task-aware validation accuracy after the last stage (the split used for tuning)"),
    Column("validation_task_agnostic", None, "task-agnostic validation accuracy after the last stage"),
    Column("weight_change_by_layer", None, "weight change per layer group"),
    Column("average_accuracy", "{:.3f}", "ACC = mean_j R[T, j]"),
    Column("backward_transfer", "{:+.3f}", "BWT = mean_{j<T} (R[T, j] − R[j, j])"),
    Column("forgetting", "{:.3f}", "mean_{j<T} (max_{l<T} R[l, j] − R[T, j])"),
    *COMMON,
    Column("steps_per_s", "{:.2f}", "later stages' steps per second of this process (evaluations included)"),
    Column("path", None, "per record: step, new-task loss, old outputs' distance to their references, lengths"),
    Column("generators", None, "brain-inspired replay: each old task's generator fit", optional=True),
))

ALIGNMENT = Schema("alignment", (
    Column("rounds", None, "the rounds in the order learnt"),
    Column("reward_matrix", None, "R[i, j]: mean reward of round j's test prompts after round i (row 0: base)"),
    Column("preference_accuracy_matrix", None, "implicit-reward preference accuracy on each round's test pairs "
           "(rows: base, after round i; columns: round j; None before round j is entered)"),
    Column("reward_margin_matrix", None, "mean implicit reward margin β Δ on each round's test pairs"),
    Column("chosen_logp_matrix", None, "mean log π(chosen | prompt) on each round's test pairs"),
    Column("forgetting", None, "per earlier round j: preference accuracy after round j − after the last round"),
    Column("kl_to_base", None, "per-token KL(π ‖ π_base) on held-out text after each round"),
    Column("perplexity", None, "perplexity on held-out text after each round"),
    Column("reward_forgetting", None, "per earlier round j: R[j + 1, j] − R[T, j] (None without a reward)"),
    Column("validation_reward", None, "each round's mean reward on its validation prompts after the last round"),
    *COMMON,
    Column("wall_time_s", "{:.0f}", "seconds of this process in the later rounds (pairs, references, evaluation)"),
    Column("peak_step_memory_bytes", "{:.0f}", "peak memory of one training step (XLA's analysis, temporaries in)"),
    Column("stored_reference_bytes", "{:.0f}", "bytes of the stored top-k reference distributions"),
    Column("drift", None, "per record: step, old rounds' distance to the entering policy, new-round loss"),
    Column("old_round_distance", None, "after each later round: the old rounds' mean Bhattacharyya distance to the "
           "policy entering it, on their buffered anchors (buffer) and on completions to their test prompts "
           "(held_out)"),
    Column("stored_state_bytes", "{:.0f}", "bytes of the stored state a later month continues from (fipjax.align)",
           optional=True),
))

SCHEMAS = {s.kind: s for s in (STREAM, ALIGNMENT)}


def check(kind: str, result: Mapping) -> None:
  """Raise if ``result`` has a column ``kind``'s schema does not declare, or lacks one it requires."""
  schema = SCHEMAS[kind]
  unknown = sorted(set(result) - set(schema.names()))
  missing = [c.name for c in schema.columns if not c.optional and c.name not in result]
  if unknown or missing:
    raise ValueError(f"a {kind} result does not match its schema (fipjax.results): undeclared {unknown}, "
                     f"missing {missing}")


def kind_of(results: Mapping) -> str:
  """The kind of a ``results.json`` (its ``kind``; files written before it was recorded: by their columns)."""
  if "kind" in results:
    return results["kind"]
  first = next(iter(results["methods"].values()), {})
  return next((s.kind for s in SCHEMAS.values() if set(s.names()) >= set(first) and first), STREAM.kind)


def scalar_table(kind: str, methods: Mapping[str, Mapping]) -> list[str]:
  """A markdown table of every scalar column of ``kind`` (a row a method), then a legend line per column."""
  cols = SCHEMAS[kind].scalars()
  lines = ["| method | " + " | ".join(c.name for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
  for name, m in methods.items():
    lines.append(f"| {name} | " + " | ".join("n/a" if m.get(c.name) is None else c.fmt.format(m[c.name])
                                             for c in cols) + " |")
  return lines + [""] + [f"- `{c.name}`: {c.description}" for c in cols]
