"""The fipjax package's import graph has no cycle, counting every import statement (function-level ones too)."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).parents[1]
PACKAGE = "fipjax"


def _modules() -> dict[str, pathlib.Path]:
  """Dotted module name → file, for every module of the package (a package is its ``__init__.py``)."""
  out = {}
  for path in sorted((ROOT / PACKAGE).rglob("*.py")):
    parts = path.relative_to(ROOT).with_suffix("").parts
    out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return out


def _imports(name: str, path: pathlib.Path, modules) -> set[str]:
  """The package's modules that ``name`` imports anywhere in its source: ``from a import b`` names ``a.b`` when
  that is a module, else ``a``; relative imports are resolved against the module's package."""
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  found = set()
  for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
      for alias in node.names:
        found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
  return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
  modules = _modules()
  return {name: _imports(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """One cycle per back edge found by a depth-first search (``[a, b, ..., a]``), in a stable order."""
  state, stack, found = {}, [], []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == "open":
        found.append(stack[stack.index(nxt):] + [nxt])
      elif nxt not in state:
        visit(nxt)
    stack.pop()
    state[node] = "done"

  for node in sorted(graph):
    if node not in state:
      visit(node)
  return found


def test_graph_sees_function_level_and_relative_imports(tmp_path):
  """The scanner itself: a function-level import and ``from . import x`` are edges."""
  pkg = tmp_path / "pkg"
  pkg.mkdir()
  (pkg / "__init__.py").write_text("")
  (pkg / "a.py").write_text("def f():\n  from pkg import b\n")
  (pkg / "b.py").write_text("from . import a\n")
  modules = {"pkg": pkg / "__init__.py", "pkg.a": pkg / "a.py", "pkg.b": pkg / "b.py"}
  graph = {name: _imports(name, path, modules) for name, path in modules.items()}
  assert graph == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}}
  assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.a"]]


def test_models_import_each_other_in_one_direction():
  graph = import_graph()
  assert graph["fipjax.models.llama"] <= {"fipjax.models.common"}, graph["fipjax.models.llama"]
  assert "fipjax.models.hub" not in graph["fipjax.models.gguf"]


def test_no_import_cycle():
  found = cycles(import_graph())
  assert not found, "import cycles:\n" + "\n".join(" → ".join(c) for c in found)
