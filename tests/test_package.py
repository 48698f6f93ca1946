"""The package's shape, which issue #14 set: no import cycles, short functions, one home for errors, a
public API of plain functions (no callable-module tricks), and a docstring saying what each module is for."""
import ast
import re
from pathlib import Path

import labutils
from labutils.paths import REPO_ROOT

PACKAGE = REPO_ROOT / "labutils"
MODULES = {".".join(p.relative_to(REPO_ROOT).with_suffix("").parts).removesuffix(".__init__"): p
           for p in sorted(PACKAGE.rglob("*.py"))}
MAX_FUNCTION_LINES = 90  # ~80 lines of code plus a docstring


def _runtime_imports(name: str, path: Path) -> set[str]:
    """labutils modules `name` imports when it runs (at the top or inside functions), not under TYPE_CHECKING."""
    tree = ast.parse(path.read_text())
    type_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                 for n in ast.walk(node)}
    base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.ImportFrom):
            parent = base[: len(base) - node.level + 1] if node.level else []
            target = ".".join(parent + ([node.module] if node.module else []))
            found.update(f"{target}.{a.name}" if f"{target}.{a.name}" in MODULES else target for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m in MODULES and m != name}


def test_no_import_cycles():
    graph = {name: _runtime_imports(name, path) for name, path in MODULES.items()}
    assert graph["labutils.training"] >= {"labutils.config", "labutils.model"}  # the scan sees relative imports

    def cycle_from(start, node, path):
        for dep in graph[node]:
            if dep == start:
                return path + [dep]
            if dep not in path:
                found = cycle_from(start, dep, path + [dep])
                if found:
                    return found
        return None

    cycles = [c for c in (cycle_from(m, m, [m]) for m in graph) if c]
    assert not cycles, f"import cycles: {cycles[:3]}"


def test_functions_are_short_and_modules_say_what_they_are_for():
    long = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        assert ast.get_docstring(tree), f"{name} has no module docstring"
        long += [f"{name}.{n.name}: {n.end_lineno - n.lineno + 1} lines" for n in ast.walk(tree)
                 if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, long


def test_errors_live_in_one_module_and_the_api_is_plain_functions():
    defined = {name: re.findall(r"^class (\w+Error)\b", path.read_text(), re.M) for name, path in MODULES.items()}
    assert {n: e for n, e in defined.items() if e and n != "labutils.errors"} == {}
    assert set(defined["labutils.errors"]) >= {"ConfigError", "DataError", "CheckpointError", "TrainingError", "StudyError"}
    assert not [n for n, p in MODULES.items() if "sys.modules[__name__].__class__" in p.read_text()]
    from labutils import train
    from labutils.training import train as the_loop

    assert train is the_loop
    for exported in labutils.__all__:  # every public name resolves
        assert getattr(labutils, exported) is not None
