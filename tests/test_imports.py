"""The import contract (DESIGN.md's layering), read from the source: `typing` and `kernels` are
leaves, `cache` never imports `models`, nothing imports `cli`, no private name crosses modules,
module-level imports have no cycle, and importing jmmkv or a kernel loads no model code."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "jmmkv"


def _module_name(path: Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str):
  """(imported jmmkv module, names taken from it, top level?) for every import in module
  ``name``; ``from jmmkv.x import y`` counts as importing ``jmmkv.x.y`` when that is a module."""
  tree = ast.parse(MODULES[name].read_text())
  top = {id(n) for n in tree.body}
  package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        if a.name.startswith("jmmkv"):
          yield a.name, [], id(node) in top
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base])
        base = base.rstrip(".")
      if not base.startswith("jmmkv"):
        continue
      for a in node.names:
        sub = f"{base}.{a.name}"
        if sub in MODULES:
          yield sub, [], id(node) in top
        else:
          yield base, [a.name], id(node) in top


def _edges(top_only: bool = False):
  for name in MODULES:
    for target, names, top in _imports(name):
      if top or not top_only:
        yield name, target, names


def _within(name: str, prefix: str) -> bool:
  return name == prefix or name.startswith(prefix + ".")


def test_the_parser_sees_known_imports():
  """The checks below are only as good as `_imports`: it must find these."""
  edges = {(a, b) for a, b, _ in _edges()}
  assert ("jmmkv.cache.statistics", "jmmkv.kernels.select") in edges
  assert ("jmmkv.cli", "jmmkv.eval.cli") in edges  # inside a function
  assert ("jmmkv.generate", "jmmkv.models.llama") in edges
  assert ("jmmkv.eval.milebench", "jmmkv.eval.milebench_data") in edges


def test_typing_and_kernels_are_leaves():
  bad = [
    (a, b)
    for a, b, _ in _edges()
    if (_within(a, "jmmkv.kernels") or a == "jmmkv.typing")
    and not (_within(b, "jmmkv.kernels") or b == "jmmkv.typing")
  ]
  assert bad == []


def test_cache_never_imports_models_and_select_not_the_policies():
  bad = [(a, b) for a, b, _ in _edges() if _within(a, "jmmkv.cache") and _within(b, "jmmkv.models")]
  assert bad == []
  assert not [
    b for a, b, _ in _edges() if a == "jmmkv.cache.select" and _within(b, "jmmkv.cache.policies")
  ]


def test_nothing_imports_the_cli_and_no_private_name_crosses_modules():
  assert [(a, b) for a, b, _ in _edges() if b == "jmmkv.cli" and a != "jmmkv.cli"] == []
  private = [
    (a, b, n)
    for a, b, names in _edges()
    for n in names
    if n.startswith("_") and not n.startswith("__") and a != b
  ]
  assert private == []


def test_module_level_imports_have_no_cycle():
  graph: dict[str, set[str]] = {name: set() for name in MODULES}
  for a, b, _ in _edges(top_only=True):
    if b in MODULES and a != b and not _within(a, b):  # a package's own __init__ is no cycle
      graph[a].add(b)
  state: dict[str, int] = {}  # 1: on the stack, 2: done

  def visit(node, path):
    state[node] = 1
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 1:
        pytest.fail("import cycle: " + " -> ".join(path[path.index(nxt) :] + [nxt]))
      if nxt not in state:
        visit(nxt, path + [nxt])
    state[node] = 2

  for name in MODULES:
    if name not in state:
      visit(name, [name])


@pytest.mark.parametrize(
  "statement, allowed",
  [
    ("import jmmkv", {"jmmkv"}),
    (
      "import jmmkv.kernels.select",
      {"jmmkv", "jmmkv.kernels", "jmmkv.kernels.select", "jmmkv.typing"},
    ),
  ],
)
def test_importing_loads_only_what_it_needs(statement, allowed):
  code = f"import sys\n{statement}\nprint(sorted(m for m in sys.modules if m.startswith('jmmkv')))"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert set(ast.literal_eval(out.stdout.strip())) == allowed


def test_lazy_public_names_and_the_generate_function():
  code = (
    "import jmmkv.bench, jmmkv, types\n"  # the bench imports the jmmkv.generate module first
    "assert callable(jmmkv.generate) and not isinstance(jmmkv.generate, types.ModuleType)\n"
    "assert jmmkv.Budget(ratio=0.5).ratio == 0.5 and 'madakv' in jmmkv.policies.NAMES\n"
    "assert set(jmmkv.__all__) <= set(dir(jmmkv))\n"
    "print('ok')"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
