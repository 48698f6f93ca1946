"""What a stage's results depend on, and whether they are current: its parameters (as given over the notebook's
defaults), the notebook's cells, labutils' code (the code that trains and evaluates runs apart from the rest, and each
module's hash, to name what changed), the earlier stages' hand-offs and the data. `stage_inputs` is the one record of
it; `same_inputs` decides whether a finished stage is current, `runs_reusable` whether its finished runs may serve a
re-run (only report code changed), and `describe_change` says in words what made it stale.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
from pathlib import Path
from typing import Any

from .files import NOTEBOOKS_DIR, STAGE_FILE, display_path, git_commit, mask_passwords
from .tables import fmt
from .validation import ConfigError


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON record, or None when it is missing or half-written."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


# parameters that name where a run goes, why, and which trackers also see it: they change none of its results
LABELS = ("out_dir", "archive_reason", "tracking")


def same_inputs(before: dict[str, Any] | None, after: dict[str, Any] | None) -> bool:
    """The same parameters, notebook, labutils source and earlier stages' hand-offs (the commit may differ)."""
    keys = ("parameters", "notebook", "training_code", "other_code", "upstream")
    return bool(before) and bool(after) and all(before.get(k) == after.get(k) for k in keys)


def earlier_handoffs(stage_dir: Path) -> list[tuple[str, bytes]]:
    """The hand-offs of the stages before this one (the NN_ folders beside it that sort earlier), in order, as
    (folder name, the hand-off file's bytes); none for a folder that is no numbered stage."""
    if not stage_dir.name[:2].isdigit():
        return []
    found = []
    for folder in sorted(p for p in stage_dir.parent.glob("[0-9][0-9]_*") if p.is_dir() and p.name < stage_dir.name):
        handoff = (read_json(folder / STAGE_FILE) or {}).get("handoff")
        if handoff and (folder / handoff).exists():
            found.append((folder.name, (folder / handoff).read_bytes()))
    return found


def upstream_fingerprint(stage_dir: Path) -> str | None:
    """A hash of the earlier stages' hand-offs: a stage whose inputs from earlier stages changed starts over instead
    of continuing."""
    if not stage_dir.name[:2].isdigit():
        return None
    digest = hashlib.sha256()
    for name, handoff in earlier_handoffs(stage_dir):
        digest.update(name.encode() + b"\0" + handoff)
    return digest.hexdigest()[:16]


def data_fingerprint(stage_dir: Path) -> str | None:
    """A hash of the data a stage's runs train on: the hand-off of the first stage (01, data preparation) before it."""
    earlier = earlier_handoffs(stage_dir)
    return hashlib.sha256(earlier[0][1]).hexdigest()[:16] if earlier and earlier[0][0][:2] == "01" else None


def parameter_defaults(notebook: Path) -> dict[str, Any]:
    """The defaults of a notebook's cell tagged `parameters`, by name; each must be a Python literal, since
    it is recorded and compared as a value."""
    cells = [
        c for c in json.loads(notebook.read_text())["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])
    ]
    if len(cells) != 1:
        raise ConfigError(
            f"{display_path(notebook)} has {len(cells)} cells tagged 'parameters'; a stage has exactly one"
        )
    source = "".join(cells[0]["source"])
    defaults = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                defaults[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                raise ConfigError(
                    f"{display_path(notebook)}: the default of parameter {node.targets[0].id!r} "
                    f"({ast.unparse(node.value)}) is not a literal; write the value itself"
                ) from None
    return defaults


def resolved_parameters(notebook: Path, given: dict[str, Any]) -> dict[str, Any]:
    """The parameters a run of `notebook` gets: its defaults, with the given values on top; values given for
    names the notebook does not declare reach no cell of it, so they are left out (as are the labels)."""
    return {
        name: given.get(name, default) for name, default in parameter_defaults(notebook).items() if name not in LABELS
    }


# The code that trains and evaluates a run: a change here retrains the runs of every stage. A change anywhere else
# (reports, figures, findings, the dashboard, a stage's design) re-executes the stages, and each finished run whose
# config is unchanged is reused (`runs_reusable`; run folders are keyed by their config). Which modules count is
# read from the code, never listed by hand: every labutils module that the entry points below import, directly or
# through another, at module level or inside a function (issue 48: a hand-kept list had forgotten `tracking`, which
# writes a run's metrics, and `studies`, whose worker computes each run's confirmation loss).
TRAINING_ENTRY_POINTS = (
    "training.py",  # `train`: every run of every stage
    "studies.py",  # `run_job`: the study worker (03's arms, 05's sweep and final runs), and what it adds to a run
    "tuning.py",  # 04's trials: the sampler and the pruner decide what each trial trains and for how long
)


def _package_dir() -> Path:
    return Path(__file__).resolve().parent


def _imported_modules(path: Path, package: Path) -> set[str]:
    """The labutils files that `path` imports (relative or absolute, at module level or in a function), as paths
    inside the package; a module imported from a package also runs that package's __init__.py."""
    here = path.relative_to(package).parent.parts
    found: set[str] = set()

    def add(parts: tuple[str, ...]) -> None:
        for i in range(len(parts) + 1):  # every package on the way runs its __init__
            if (package.joinpath(*parts[:i], "__init__.py")).exists():
                found.add("/".join([*parts[:i], "__init__.py"]))
        if parts and package.joinpath(*parts[:-1], parts[-1] + ".py").exists():
            found.add("/".join([*parts[:-1], parts[-1] + ".py"]))

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = tuple(node.module.split(".")) if node.module else ()
            if node.level:  # `from .x import y`, `from ..validation import z`
                base = here[: len(here) - (node.level - 1)]
            elif module[:1] == (package.name,):  # `from labutils.x import y`
                base, module = (), module[1:]
            else:
                continue
            add((*base, *module))
            for alias in node.names:  # `from . import stats`, `from .model import gpt`: names may be modules
                add((*base, *module, alias.name))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == package.name:
                    add(tuple(alias.name.split(".")[1:]))
    return found


@functools.cache
def training_modules() -> frozenset[str]:
    """The import closure of `TRAINING_ENTRY_POINTS`: the labutils files (paths inside the package, e.g.
    'model/gpt.py') that run when a run trains and is evaluated."""
    package = _package_dir()
    closure: set[str] = set()
    todo = list(TRAINING_ENTRY_POINTS)
    while todo:
        module = todo.pop()
        if module in closure or not (package / module).exists():
            continue
        closure.add(module)
        todo += sorted(_imported_modules(package / module, package) - closure)
    return frozenset(closure)


def is_training_code(module: str) -> bool:
    """`module` is a path inside labutils (e.g. 'model/gpt.py'): whether it decides what a run trains to (it is in
    the import closure of the training entry points)."""
    return module in training_modules()


def module_hashes() -> dict[str, str]:
    """A short hash of each labutils source file, by its path inside the package."""
    package = _package_dir()
    return {
        str(p.relative_to(package)): hashlib.sha256(p.read_bytes()).hexdigest()[:12]
        for p in sorted(package.rglob("*.py"))
    }


def code_fingerprint(hashes: dict[str, str], training: bool) -> str:
    """One hash of the training code (training=True) or of the rest of labutils."""
    chosen = sorted((m, h) for m, h in hashes.items() if is_training_code(m) == training)
    return hashlib.sha256(json.dumps(chosen).encode()).hexdigest()[:16]


def training_fingerprint() -> str:
    """A hash of the code that trains and evaluates runs: a run trained by other training code is not reused."""
    return code_fingerprint(module_hashes(), training=True)


def notebook_cells(notebook: Path) -> list:
    """A notebook's cell sources: its code and narrative, not its outputs or metadata."""
    return [c["source"] for c in json.loads(notebook.read_text())["cells"]]


def notebook_fingerprint(notebook: Path) -> str | None:
    """A hash of a notebook's cells; None when it does not exist."""
    return hashlib.sha256(json.dumps(notebook_cells(notebook)).encode()).hexdigest()[:16] if notebook.exists() else None


def recorded_parameters(parameters: dict[str, Any]) -> dict[str, Any]:
    """Parameters as a stage record keeps them: without the labels, through JSON (so a record compares equal to
    itself read back) and without any URL password."""
    return json.loads(mask_passwords(json.dumps({k: v for k, v in parameters.items() if k not in LABELS}, default=str)))


def stage_inputs(
    stage: str, parameters: dict[str, Any], upstream: str | None = None, data: str | None = None
) -> dict[str, Any]:
    """What a stage's results depend on, the one record of it (stage.json and run.json hold it; `same_inputs`
    decides from it whether a run is current or can be continued): its parameters, the notebook's code, labutils'
    code (the training code and the rest apart, and each module's hash, to name what changed), the earlier stages'
    hand-offs (`upstream_fingerprint`), the data's (`data_fingerprint`) and the commit, to name it."""
    modules = module_hashes()
    return {
        "parameters": recorded_parameters(parameters),
        "notebook": notebook_fingerprint(NOTEBOOKS_DIR / f"{stage}.ipynb"),
        "training_code": code_fingerprint(modules, training=True),
        "other_code": code_fingerprint(modules, training=False),
        "modules": modules,
        "upstream": upstream,
        "data": data,
        "commit": (git_commit() or "")[:10] or None,
    }


def runs_reusable(before: dict[str, Any] | None, after: dict[str, Any] | None) -> bool:
    """Whether the finished runs of a stage run with inputs `before` may serve one with inputs `after`: the same
    training code and data. Each run is then reused when its config is the same too (`studies.reuse_or_train`)."""
    if not before or not after:
        return False
    return all(before.get(k) is not None and before.get(k) == after.get(k) for k in ("training_code", "data"))


def changed_modules(before: dict[str, Any], after: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The labutils files that differ between two records: (training code, the rest)."""
    old, new = before.get("modules") or {}, after.get("modules") or {}
    changed = sorted(m for m in set(old) | set(new) if old.get(m) != new.get(m))
    return [m for m in changed if is_training_code(m)], [m for m in changed if not is_training_code(m)]


def _code_change(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """What changed in labutils between two records, in words: training code (runs retrain) or the rest (reused)."""
    commits = f"commit {before.get('commit') or '?'} -> {after.get('commit') or '?'}"
    if "training_code" not in before:  # a record from before the code was split
        return [f"labutils changed ({commits})"] if before.get("labutils") != after.get("labutils") else []
    training, other = changed_modules(before, after)
    parts = []
    if before.get("training_code") != after.get("training_code"):
        parts.append(f"training code changed ({', '.join(training) or '?'}; {commits}): its runs retrain")
    if before.get("other_code") != after.get("other_code"):
        parts.append(f"report code changed ({', '.join(other) or '?'}): finished runs are reused")
    return parts


def describe_change(before: dict[str, Any] | None, after: dict[str, Any] | None) -> str:
    """What differs between the inputs of the archived run and of the run replacing it, in one line."""
    if not before or not after:
        return "the inputs of the earlier run were not recorded"
    parts = []
    old, new = before.get("parameters", {}), after.get("parameters", {})
    changed = sorted(
        k for k in set(old) & set(new) if old[k] != new[k]
    )  # a name only one run has came with a notebook change
    if changed:
        parts.append("parameters " + ", ".join(f"{k}: {fmt(old[k])} -> {fmt(new[k])}" for k in changed))
    if before.get("notebook") != after.get("notebook"):
        parts.append("the notebook changed")
    parts += _code_change(before, after)
    if before.get("upstream") and after.get("upstream") and before["upstream"] != after["upstream"]:
        parts.append("an earlier stage's hand-off changed")
    return "; ".join(parts) or "re-run with the same inputs (notebook, parameters and labutils)"


def current_inputs(notebook: Path, parameters: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """The inputs a run of `notebook` into `out_dir` with these `parameters` would have
    (`freshness.stage_inputs`)."""
    return stage_inputs(
        notebook.stem,
        resolved_parameters(notebook, parameters),
        upstream=upstream_fingerprint(out_dir),
        data=data_fingerprint(out_dir),
    )
