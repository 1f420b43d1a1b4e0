"""The package's shape: every module imports on its own, no import cycle, library code never imports a
CLI command module, and no module reaches for another module's private (`_name`) names.

The import graph is read from the source (ast), counting imports inside functions too: a lazy
import that closes a cycle is still a cycle for a reader.
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "pmc_unlearn"


def module_files() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = p.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


MODULES = module_files()


def imports_of(name: str, path: Path) -> list[tuple[str, str | None, int]]:
    """(module imported, name imported from it or None, line) for every pmc_unlearn import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] == "pmc_unlearn"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            if base.split(".")[0] != "pmc_unlearn":
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.append((sub, None, node.lineno) if sub in MODULES else (base, a.name, node.lineno))
    return found


def module_attribute_uses(path: Path) -> list[tuple[str, str, int]]:
    """(module, attribute, line) for `alias._name` where alias is an imported pmc_unlearn module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pmc_unlearn"):
            for a in node.names:
                if f"{node.module}.{a.name}" in MODULES:
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("pmc_unlearn") and a.asname:
                    aliases[a.asname] = a.name
    return [(aliases[n.value.id], n.attr, n.lineno) for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in aliases
            and n.attr.startswith("_") and not n.attr.startswith("__")]


def graph() -> dict[str, set[str]]:
    return {m: {t for t, _, _ in imports_of(m, p) if t in MODULES and t != m} for m, p in MODULES.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    assert cycles(graph()) == []


def test_library_code_does_not_import_commands():
    """Only the CLI's command modules (and the dispatcher, which names them as strings) may depend on commands/."""
    bad = [f"{m} imports {t} (line {line})" for m, p in MODULES.items() if not m.startswith("pmc_unlearn.commands")
           for t, _, line in imports_of(m, p) if t.startswith("pmc_unlearn.commands")]
    assert bad == []


def test_no_private_name_crosses_a_module():
    bad = [f"{m}:{line} takes {name} from {t}" for m, p in MODULES.items() for t, name, line in imports_of(m, p)
           if name and name.startswith("_") and t != m]
    bad += [f"{m}:{line} uses {t}.{attr}" for m, p in MODULES.items() for t, attr, line in module_attribute_uses(p)
            if t != m]
    assert bad == []


def test_leaf_modules_stay_leaves():
    """The config dialect and provenance modules import nothing of the package but errors (precision lazily)."""
    allowed = {"pmc_unlearn.sections": {"pmc_unlearn.errors"},
               "pmc_unlearn.provenance": {"pmc_unlearn.precision"},
               "pmc_unlearn.pipeline": {"pmc_unlearn.errors", "pmc_unlearn.provenance", "pmc_unlearn.rundir"}}
    g = graph()
    for m, ok in allowed.items():
        assert g[m] <= ok, (m, g[m] - ok)


IMPORT_EACH = """
import importlib, sys, traceback
failed = []
for name in sys.argv[1:]:
    for m in [m for m in sys.modules if m == "pmc_unlearn" or m.startswith("pmc_unlearn.")]:
        del sys.modules[m]  # the package afresh for every module (third-party imports stay loaded: fast)
    try:
        importlib.import_module(name)
    except Exception:
        failed.append(name + ": " + traceback.format_exc(limit=3))
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_on_its_own():
    """Each module imported first, in a fresh interpreter: no module needs another to have been imported before."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
    names = [m for m in MODULES if m != "pmc_unlearn.__main__"]
    r = subprocess.run([sys.executable, "-c", IMPORT_EACH, *names], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
