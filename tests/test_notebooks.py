"""Every colab/*.ipynb: valid, saved without outputs or local paths, runs end to end in smoke
mode (``JMMKV_SMOKE=1``: a tiny random model on CPU, no installs or downloads), and its install
cell finds jmmkv (installed, cloned, uploaded, JMMKV_SOURCE) or says how to provide it."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from nbclient import NotebookClient

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO_ROOT / "colab").glob("*.ipynb"))
CELL_TIMEOUT_S = 300
_LOCAL_DIRS = {str(REPO_ROOT), sys.prefix, tempfile.gettempdir(), str(Path.home())}
LOCAL_PATH = re.compile(
  r"(?<![\w.])/(?:work|tmp|home|root|Users|private|mnt)/|"
  + "|".join(re.escape(d.rstrip("/") + "/") for d in sorted(_LOCAL_DIRS) if len(d) > 1)
)
# Raised by transformers' `import tqdm.auto` in a kernel without ipywidgets (Colab has them); its
# text names the local site-packages.
QUIET = "ignore:IProgress not found"


def _ids(paths):
  return [p.name for p in paths]


def test_at_least_three_notebooks():
  assert len(NOTEBOOKS) >= 3, [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_saved_clean(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  assert any(c.cell_type == "code" for c in nb.cells)
  for i, cell in enumerate(nb.cells):
    assert not LOCAL_PATH.search(cell.source), f"cell {i} names a local path"
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, f"cell {i} was saved run"


def _is_this_python(argv0: str | None) -> bool:
  """Whether a kernelspec's argv[0] starts this interpreter (jupyter_client swaps a bare
  "python" / "python3" / "python3.X" for sys.executable; symlinks are not resolved, as a venv's
  python is a symlink to the base interpreter)."""
  if argv0 is None:
    return False
  v = sys.version_info
  if argv0 in ("python", f"python{v.major}", f"python{v.major}.{v.minor}"):
    return True
  found = shutil.which(argv0) or argv0
  return os.path.abspath(found) == os.path.abspath(sys.executable)


@pytest.fixture(scope="session")
def kernel_env(tmp_path_factory):
  """The kernels' environment; makes the "python3" kernelspec run this interpreter (the venv),
  through a spec on JUPYTER_PATH when the installed one runs another Python."""
  try:
    argv0 = KernelSpecManager().get_kernel_spec("python3").argv[0]
  except NoSuchKernel:
    argv0 = None
  saved = os.environ.get("JUPYTER_PATH")
  if not _is_this_python(argv0):
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / "python3"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec.joinpath("kernel.json").write_text(
      json.dumps({"argv": argv, "display_name": "Python 3", "language": "python"})
    )
    os.environ["JUPYTER_PATH"] = os.pathsep.join(filter(None, [str(root), saved]))
    assert _is_this_python(KernelSpecManager().get_kernel_spec("python3").argv[0])
  warnings = ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"), QUIET]))
  path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
  yield dict(
    os.environ,
    JMMKV_SMOKE="1",
    JAX_PLATFORMS="cpu",
    HF_HUB_OFFLINE="1",
    PYTHONPATH=path,
    PYTHONWARNINGS=warnings,
  )
  if saved is None:
    os.environ.pop("JUPYTER_PATH", None)
  else:
    os.environ["JUPYTER_PATH"] = saved


def _output_texts(cell):
  """Every text a cell's outputs show (streams, text data, tracebacks), images left out."""
  for out in cell.get("outputs", []):
    if out.output_type == "stream":
      yield out.text
    elif out.output_type == "error":
      yield "\n".join([out.ename, out.evalue, *out.traceback])
    else:
      yield from (v for k, v in out.get("data", {}).items() if k.startswith("text/"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_runs_in_smoke_mode(path, kernel_env, tmp_path):
  nb = nbformat.read(path, as_version=4)
  client = NotebookClient(
    nb,
    timeout=CELL_TIMEOUT_S,
    kernel_name="python3",
    resources={"metadata": {"path": str(tmp_path)}},  # the kernel's working directory
  )
  t0 = time.perf_counter()
  client.execute(env=kernel_env)  # raises CellExecutionError on the first failing cell
  print(f"{path.name}: {time.perf_counter() - t0:.1f} s")
  for i, cell in enumerate(nb.cells):
    if cell.cell_type != "code":
      continue
    assert cell.execution_count is not None, f"cell {i} did not run"
    for text in _output_texts(cell):
      assert not LOCAL_PATH.search(text), f"cell {i} output names a local path:\n{text}"


def _install_helper(path):
  """``jmmkv_source`` of a notebook's install cell, defined with the cell's own imports, and a
  switch for whether jmmkv counts as importable."""
  import ast
  import types

  from IPython.core.inputtransformer2 import TransformerManager

  nb = nbformat.read(path, as_version=4)
  cell = next(c for c in nb.cells if "def jmmkv_source(" in c.source)
  tree = ast.parse(TransformerManager().transform_cell(cell.source))  # %pip lines to Python
  keep = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom, ast.FunctionDef))]
  namespace = {"os": os}  # imported by the first code cell
  exec(compile(ast.Module(keep, type_ignores=[]), path.name, "exec"), namespace)
  importable = []
  find_spec = lambda name: object() if importable else None  # noqa: E731
  namespace["importlib"] = types.SimpleNamespace(util=types.SimpleNamespace(find_spec=find_spec))
  return namespace["jmmkv_source"], importable


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_install_cell_finds_jmmkv_or_says_how(path, tmp_path, monkeypatch):
  source, importable = _install_helper(path)
  monkeypatch.chdir(tmp_path)
  (tmp_path / "jmmkv-main").mkdir()  # a project, but not jmmkv
  (tmp_path / "jmmkv-main" / "pyproject.toml").write_text('[project]\nname = "other"\n')
  with pytest.raises(FileNotFoundError) as e:  # nothing here and no JMMKV_SOURCE
    source("")
  message = str(e.value)
  assert "\n" not in message and "JMMKV_SOURCE" in message
  assert "upload" in message and "zip" in message and "git clone" in message
  assert source("https://example.org/jmmkv") == "git+https://example.org/jmmkv"
  assert source("git+https://example.org/jmmkv@v1") == "git+https://example.org/jmmkv@v1"
  assert source("https://example.org/jmmkv.zip") == "https://example.org/jmmkv.zip"
  (tmp_path / "jmmkv-0.1.0-py3-none-any.whl").write_bytes(b"wheel")  # an upload wins
  wheel = Path(source("https://example.org/jmmkv")).resolve()
  assert wheel == (tmp_path / "jmmkv-0.1.0-py3-none-any.whl").resolve()
  clone = tmp_path / "jmmkv"
  clone.mkdir()
  (clone / "pyproject.toml").write_text((REPO_ROOT / "pyproject.toml").read_text())
  assert Path(source("")).resolve() == clone.resolve()  # a clone wins over an upload
  importable.append(True)
  assert source("") is None  # installed: nothing to do
