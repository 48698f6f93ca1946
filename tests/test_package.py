"""The package's shape, which issue #14 set: no import cycles, short functions, one home for errors, a
public API of plain functions (no callable-module tricks), and a docstring saying what each module is for."""

import ast
import io
import re
import tokenize
from pathlib import Path

import labutils
from labutils.files import REPO_ROOT

PACKAGE = REPO_ROOT / "labutils"
MODULES = {
    ".".join(p.relative_to(REPO_ROOT).with_suffix("").parts).removesuffix(".__init__"): p
    for p in sorted(PACKAGE.rglob("*.py"))
}
# what one function may ask a reader to hold: a screen of statements (logical lines), and ruff format's wrapping of
# them at 120 columns (an argument a line) within a screen and a half
MAX_FUNCTION_STATEMENTS = 45
MAX_FUNCTION_LINES = 90


def _runtime_imports(name: str, path: Path) -> set[str]:
    """labutils modules `name` imports when it runs (at the top or inside functions), not under TYPE_CHECKING."""
    tree = ast.parse(path.read_text())
    type_only = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for n in ast.walk(node)
    }
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


def _statements(tokens: list, start: int, end: int) -> int:
    """Logical lines (statements) between two physical lines: what a reader holds, however the formatter wraps."""
    return sum(1 for t in tokens if t.type == tokenize.NEWLINE and start <= t.start[0] <= end)


def test_functions_are_short_and_modules_say_what_they_are_for():
    long = []
    for name, path in MODULES.items():
        source = path.read_text()
        tree = ast.parse(source)
        assert ast.get_docstring(tree), f"{name} has no module docstring"
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
        for n in ast.walk(tree):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines, statements = n.end_lineno - n.lineno + 1, _statements(tokens, n.lineno, n.end_lineno)
                if lines > MAX_FUNCTION_LINES or statements > MAX_FUNCTION_STATEMENTS:
                    long.append(f"{name}.{n.name}: {lines} lines, {statements} statements")
    assert not long, long


def test_every_component_registry_has_one_shape_and_no_module_asks_for_a_kind_by_name():
    """Attention, MLP, norm and position kinds are `Kind` entries whose checks raise through `require`; code outside
    them asks the entry (what it builds, checks, derives), never `config.mlp == "moe"` or a parameter's name.
    hf.py is the exception by design: exporting maps a config onto GPT-2's or Llama's own architecture."""
    from labutils.model import attention, kinds, mlp

    for registry in (attention.ATTENTION, attention.POSITIONS, kinds.NORMS, mlp.MLP_KINDS):
        assert registry and all(isinstance(entry, kinds.Kind) for entry in registry.values())
    by_name = re.compile(r"\.(pos|norm|mlp|attention)\s*(==|!=|in\b)|\.mlp\.experts\.|\.get\(config\.")
    found = [
        f"{name}:{i}: {line.strip()}"
        for name, path in MODULES.items()
        if name != "labutils.model.hf"
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if by_name.search(line)
    ]
    assert not found, found
    edges = ("labutils.model.config", "labutils.model.hf")  # presets and export raise their own errors
    model_modules = [p for n, p in MODULES.items() if n.startswith("labutils.model.") and n not in edges]
    assert not [
        p.name for p in model_modules if "raise ConfigError" in p.read_text()
    ]  # the checks go through validation.require


def test_errors_live_in_one_module_and_the_api_is_plain_functions():
    defined = {name: re.findall(r"^class (\w+Error)\b", path.read_text(), re.M) for name, path in MODULES.items()}
    assert {n: e for n, e in defined.items() if e and n != "labutils.validation"} == {}
    assert set(defined["labutils.validation"]) >= {
        "ConfigError",
        "DataError",
        "CheckpointError",
        "TrainingError",
        "StudyError",
    }
    assert not [n for n, p in MODULES.items() if "sys.modules[__name__].__class__" in p.read_text()]
    from labutils import train
    from labutils.training import train as the_loop

    assert train is the_loop
    for exported in labutils.__all__:  # every public name resolves
        assert getattr(labutils, exported) is not None
