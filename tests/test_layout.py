"""The package's shape: imports point one way (the import-linter contracts of pyproject.toml), no module imports
another that imports it back (imports inside functions included), no private name crosses a module boundary,
every optional part names the extra it needs, and README's Layout section lists every module."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "logitsep"


def _modules() -> dict[str, Path]:
    """Every module of logitsep by dotted name (packages by their __init__.py)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def test_import_contracts_hold() -> None:
    """``lint-imports`` (the layers, acyclic-siblings and private-modules contracts of pyproject.toml) passes."""
    lint = Path(sys.executable).with_name("lint-imports")
    r = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "broken" in r.stdout and " 0 broken" in r.stdout


def test_no_module_imports_one_that_imports_it_back() -> None:
    """No cycle between any two modules of src/logitsep, imports inside functions included (grimp sees those)."""
    graph = grimp.build_graph("logitsep")
    cycles = []
    for module in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            back = graph.find_shortest_chain(importer=imported, imported=module)
            if back is not None:
                cycles.append(" -> ".join([module, *back]))
    assert cycles == []


def _private_imports(name: str, path: Path, modules: dict[str, Path]) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = package.split(".")[:len(package.split(".")) - node.level + 1]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        if not source.startswith("logitsep") or source == name:
            continue
        for alias in node.names:
            is_module = f"{source}.{alias.name}" in modules
            if alias.name.startswith("_") and not is_module:
                found.append(f"{name}: from {source} import {alias.name}")
    return found


def test_no_private_name_crosses_a_module() -> None:
    """``from x import _name`` only where ``_name`` is a private *module* of the importer's own package (the
    private-modules contract covers those); private functions, classes and constants stay in their module."""
    modules = _modules()
    found = [hit for name, path in modules.items() for hit in _private_imports(name, path, modules)]
    assert found == []


def test_the_private_name_check_can_fail(tmp_path: Path) -> None:
    """The AST check above finds a planted ``from .heads import _normalize``."""
    planted = tmp_path / "planted.py"
    planted.write_text("from .heads import _normalize\nfrom . import _fused_like\n")
    modules = _modules()
    assert _private_imports("logitsep.planted", planted, modules) == [
        "logitsep.planted: from logitsep.heads import _normalize",
        "logitsep.planted: from logitsep import _fused_like",
    ]


@pytest.mark.parametrize(("module", "extra", "code"), [
    ("faiss", "search", "from logitsep.search import EmbeddingIndex; import numpy as np, tempfile, os\n"
                        "d = tempfile.mkdtemp(); ix = EmbeddingIndex.create(os.path.join(d, 'i'), 2)\n"
                        "ix.append(np.ones((3, 2), np.float32)); ix.approximate(nlist=1)"),
    ("matplotlib", "plots", "from logitsep.core.plots import pyplot; pyplot()"),
    ("uvicorn", "serve", "from logitsep.serve.server import serve_forever; serve_forever(None, 'x', 1)"),
    ("fastapi", "serve", "import logitsep.serve.app"),
])
def test_a_missing_extra_is_one_line_naming_it(module: str, extra: str, code: str) -> None:
    """With the package of an extra hidden, using the part that needs it raises MissingExtra whose message is one
    line saying ``pip install 'logitsep[EXTRA]'``; the core (losses, metrics, heads, training) imports without it."""
    hide = f"import sys; sys.modules[{module!r}] = None\n"
    script = hide + "from logitsep.core.extras import MissingExtra\ntry:\n" + \
        "".join(f"    {line}\n" for line in code.splitlines()) + \
        "except MissingExtra as err:\n    print(str(err))\nelse:\n    print('no error')\n"
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    message = r.stdout.strip()
    assert f"pip install 'logitsep[{extra}]'" in message and "\n" not in message, message


def test_the_core_imports_without_any_extra() -> None:
    hide = "import sys\nfor m in ('faiss', 'matplotlib', 'fastapi', 'uvicorn', 'starlette'): sys.modules[m] = None\n"
    code = hide + ("import logitsep.losses, logitsep.metrics, logitsep.heads, logitsep.train, logitsep.classifier, "
                   "logitsep.search, logitsep.cli\nfrom logitsep.cli import main\nprint(main(['losses']) == 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("True"), r.stdout + r.stderr


def _layout_tree(text: str) -> dict[str, str]:
    """The paths of README's Layout tree (two spaces of indentation per level under ``src/logitsep/``), each with
    the description on its line."""
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    paths: dict[str, str] = {}
    stack: list[str] = []
    for line in block.splitlines():
        match = re.match(r"^( *)(\S+)\s*(.*)$", line)
        if not match or match.group(2) == "src/logitsep/":
            continue
        depth = len(match.group(1)) // 2 - 1
        if depth < 0:
            break  # tests/, results/: outside the package
        stack[depth:] = [match.group(2)]
        paths["".join(stack)] = match.group(3)
    return paths


def test_readme_layout_lists_every_module() -> None:
    """README's Layout section shows the tree of src/logitsep: every module and package where it is, each with a
    line saying what it holds, and nothing that is not there."""
    tree = _layout_tree((ROOT / "README.md").read_text(encoding="utf-8"))
    wanted = set()
    for name, path in _modules().items():
        if name == "logitsep" or path.name == "__main__.py":
            continue
        rel = path.relative_to(PACKAGE)
        wanted.add(f"{rel.parent}/" if path.name == "__init__.py" else str(rel))
    assert sorted(wanted - set(tree)) == []  # every module is listed
    assert sorted(set(tree) - wanted) == []  # nothing listed that is not there
    assert all(tree[p] for p in wanted)  # each with what it holds


def test_every_command_is_its_own_module() -> None:
    cli = importlib.import_module("logitsep.cli")
    for name, module in cli.COMMANDS.items():
        assert module.__name__ == f"logitsep.cli.{name}"
        assert callable(module.run) and callable(module.add_arguments) and module.HELP
