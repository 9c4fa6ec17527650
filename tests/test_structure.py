"""The package's shape: subpackages by pipeline stage with import rules between them (pyproject.toml's
[tool.importlinter] layers, checked here on the real imports and shown to fail on a forbidden one), every module
importing on its own, no import cycle among modules, no module over 500 lines, nothing but the package's face
directly under lowres_reft/, and a docstring saying what each subpackage owns and may import.

A cycle makes the import order matter (a module half-initialized when another reads a name from it) and says that
two modules share a concept with no home of its own; a long module is usually two. Imports inside functions count
too: a lazy import only postpones the cycle to the first call.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lowres_reft"
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package (a package is its __init__.py)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _runtime_nodes(tree: ast.AST):
    """Every node of `tree` but those under `if TYPE_CHECKING:` (type-only imports never run, as import-linter's
    `exclude_type_checking_imports` has it)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                stack.extend(child.orelse)
                continue
            stack.append(child)


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """The package modules that `path` (module `name`) imports, anywhere in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` where only a.b is ours, etc.
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_has_no_cycle():
    modules = _modules()
    graph = {name: _imports(path, name, modules) for name, path in modules.items()}
    assert "lowres_reft.rollout.engine" in graph["lowres_reft.run.session"]  # the graph is really read
    assert _find_cycle(graph) is None, " -> ".join(_find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_module_imports_on_its_own():
    """Each module in a clean state (no other package module loaded before it), in one fresh interpreter."""
    names = sorted(n for n in _modules() if not n.endswith(".__main__"))  # importing __main__ runs the CLI
    script = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'lowres_reft' or m.startswith('lowres_reft.')]:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module(name)\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ok")


def test_no_module_is_over_500_lines():
    long = {str(path.relative_to(PACKAGE.parent)): n for path in _modules().values()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them): {long}"


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    """import-linter's contracts of pyproject.toml on the package under `root` (a fresh process: its own imports)."""
    return subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                           "lint_imports_command()", str(ROOT / "pyproject.toml"), "--no-cache"],
                          capture_output=True, text=True, cwd=root, env={"PYTHONPATH": str(root), "PATH": ""})


def test_import_rules_hold():
    done = _lint_imports(ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "1 kept, 0 broken" in done.stdout


def test_import_rules_catch_a_forbidden_import(tmp_path):
    """The same check on a copy of the package where the loss (rl) imports the training loop (run): it must fail."""
    shutil.copytree(PACKAGE, tmp_path / "lowres_reft", ignore=shutil.ignore_patterns("__pycache__", "bases"))
    loss = tmp_path / "lowres_reft" / "rl" / "loss.py"
    loss.write_text(loss.read_text() + "\n\ndef _forbidden():\n    from lowres_reft.run import loop  # noqa: F401\n")
    done = _lint_imports(tmp_path)
    assert done.returncode != 0
    assert "lowres_reft.rl is not allowed to import lowres_reft.run" in done.stdout, done.stdout[-3000:]


def test_the_layers_name_every_subpackage():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    named = {name.strip() for line in config["layers"] for name in line.split("|")}
    packages = {f"lowres_reft.{p.name}" for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert named == packages


def test_only_the_package_face_lies_directly_under_the_package():
    assert sorted(p.name for p in PACKAGE.glob("*.py")) == ["__init__.py", "__main__.py"]


def test_every_subpackage_says_what_it_owns_and_may_import():
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))) or ""
        assert doc.startswith(f"{init.parent.name}:"), f"{init}: docstring must start with '{init.parent.name}: <what it owns>'"
        assert "May import" in doc or "may import" in doc, f"{init}: docstring must say which packages it may import"
