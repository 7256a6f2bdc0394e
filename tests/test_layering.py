"""The layering contract, read off the source (no imports needed, except the last test).

    pipeguard (core)  <-  node, coordinator  <-  pipeguard.app  ->  benchmarks

The core library never imports a daemon, ``benchmarks/``, ``tests/`` or the app; the two daemons
never import each other, the app or ``benchmarks/``. "Imports" counts every ``import`` statement
wherever it sits (module level, inside a function, under ``TYPE_CHECKING``), relative imports,
``importlib.import_module``/``__import__``/``runpy.run_module`` with a literal name, and ``-m NAME``
in a command line; loading code by path (``spec_from_file_location``, ``SourceFileLoader``,
``runpy.run_path``) or building a path to ``benchmarks`` is refused in the core outright.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent

DAEMONS = ("node", "coordinator")
OUTSIDE_CORE = (*DAEMONS, "benchmarks", "tests", "pipeguard.app")
RULES = {
    # layer: (its files, the module prefixes it must not use)
    "core": (lambda p: p.parts[0] == "pipeguard" and p.parts[1] != "app", OUTSIDE_CORE),
    "node": (lambda p: p.parts[0] == "node", ("coordinator", "pipeguard.app", "benchmarks", "tests")),
    "coordinator": (lambda p: p.parts[0] == "coordinator", ("node", "pipeguard.app", "benchmarks", "tests")),
}
IMPORT_CALLS = {"import_module", "__import__", "run_module"}
PATH_LOADERS = {"spec_from_file_location", "SourceFileLoader", "SourcelessFileLoader", "run_path"}


def _module_name(path: Path) -> str:
    parts = list(path.with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(path: Path, node: ast.ImportFrom) -> list[str]:
    """The absolute module names an ``ImportFrom`` reaches (``from . import x`` may name a module)."""
    base = node.module or ""
    if node.level:
        package = _module_name(path).split(".")
        if path.name != "__init__.py":
            package = package[:-1]
        package = package[:len(package) - (node.level - 1)]
        base = ".".join(package + ([base] if base else []))
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def _callee(call: ast.Call) -> str:
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""


def uses(path: Path, source: str) -> list[tuple[int, str, str]]:
    """(line, how, target) for every module ``source`` imports, loads or runs, and every path load."""
    tree = ast.parse(source, filename=str(path))
    docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    found = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            found += [(n.lineno, "import", alias.name) for alias in n.names]
        elif isinstance(n, ast.ImportFrom):
            found += [(n.lineno, "from-import", name) for name in _resolve(path, n)]
        elif isinstance(n, ast.Call):
            name = _callee(n)
            if name in IMPORT_CALLS and n.args and isinstance(n.args[0], ast.Constant):
                found.append((n.lineno, name, str(n.args[0].value)))
            elif name in PATH_LOADERS:
                found.append((n.lineno, "path-load", name))
        elif isinstance(n, (ast.List, ast.Tuple)):  # [python, "-m", "node.daemon", ...]
            items = [e.value if isinstance(e, ast.Constant) else None for e in n.elts]
            found += [(n.lineno, "-m", str(b)) for a, b in zip(items, items[1:]) if a == "-m" and b]
        elif isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings:
            if n.value == "benchmarks" or n.value.startswith("benchmarks/"):
                found.append((n.lineno, "path", n.value))
    return found


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def violations(path: Path, source: str, forbidden: tuple[str, ...], *, core: bool) -> list[str]:
    bad = []
    for line, how, target in uses(path, source):
        if _within(target, forbidden) or (core and how in ("path-load", "path")):
            bad.append(f"{path}:{line}: {how} {target}")
    return bad


def _files(layer: str) -> list[Path]:
    selected, _ = RULES[layer]
    files = [p.relative_to(ROOT) for top in ("pipeguard", *DAEMONS) for p in sorted((ROOT / top).rglob("*.py"))]
    return [p for p in files if selected(p)]


@pytest.mark.parametrize("layer", sorted(RULES))
def test_layer_imports_only_what_it_may(layer):
    files = _files(layer)
    assert files, f"no files found for {layer}"
    _, forbidden = RULES[layer]
    bad = [v for p in files for v in violations(p, (ROOT / p).read_text(), forbidden, core=layer == "core")]
    assert not bad, (f"the {layer} layer must not use {', '.join(forbidden)}; move the piece it needs to where it "
                     "belongs (pipeguard/ for shared code, pipeguard/app/ for code on top of the daemons):\n"
                     + "\n".join(bad))


def test_app_layer_holds_the_daemon_users():
    assert {p.name for p in (ROOT / "pipeguard" / "app").glob("*.py")} >= {
        "cli.py", "status.py", "demo.py", "testnet.py", "export.py", "configdoc.py"}


VIOLATOR = textwrap.dedent('''
    """Mentions benchmarks/audit_tolerance.py in a docstring: fine."""
    import importlib
    import importlib.util
    from pathlib import Path

    from . import app
    from .app.cli import main
    import node.stage as stage


    def lazy():
        from coordinator.config import CoordinatorConfig
        module = importlib.import_module("benchmarks.attack_matrix")
        spec = importlib.util.spec_from_file_location("m", Path(__file__).parent / "benchmarks" / "x.py")
        return [sys.executable, "-m", "node.daemon"]
''')


def test_checker_sees_every_kind_of_use():
    bad = violations(Path("pipeguard/fake.py"), VIOLATOR, OUTSIDE_CORE, core=True)
    hows = sorted({v.split(": ", 1)[1] for v in bad})
    assert hows == ["-m node.daemon", "from-import coordinator.config", "from-import coordinator.config.CoordinatorConfig",
                    "from-import pipeguard.app", "from-import pipeguard.app.cli", "from-import pipeguard.app.cli.main",
                    "import node.stage", "import_module benchmarks.attack_matrix", "path benchmarks",
                    "path-load spec_from_file_location"], hows


def test_importing_the_core_loads_no_daemon():
    """The same contract, observed: import every core module and look at ``sys.modules``."""
    names = [_module_name(p) for p in _files("core")]
    code = (f"import sys\nfor n in {names!r}: __import__(n)\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {DAEMONS + ('benchmarks', 'tests')!r} "
            "or m.startswith('pipeguard.app')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
