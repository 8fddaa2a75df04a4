"""``pip install 'dreamserve[worker]'`` is enough to run ``dreamserve worker``: every third-party module the worker
imports comes from a distribution that the base install and the ``worker`` extra bring in.

What they bring in is read from this tree's ``pyproject.toml`` (``dreamserve[...]`` references expanded), then
from the installed distributions' own requirements, transitively, with their markers evaluated here. The worker
is checked two ways: statically, every import of the package modules it can reach (imports inside functions
too: many are lazy), the model process's included; and by running its imports, and the drivers its URLs name,
in an interpreter where every other installed distribution is hidden, as on a machine with only the extra.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import tomllib
from functools import cache
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import dreamserve

ROOT = Path(__file__).parents[1]
PACKAGE = Path(dreamserve.__file__).parent
#: ``dreamserve worker`` (``cli.worker``, which imports ``scale.worker``) and the model process it starts.
ENTRIES = ("scale.worker", "worker.child")
#: Extras for features a worker turns on in its model settings: their own packages are imported only then.
FEATURE_EXTRAS = ("upscale", "fp8")  # ModelSpec.upscaler, ModelSpec.quantize


def project_requirements(extras: set[str], seen: set[str] | None = None) -> list[Requirement]:
    """The requirements of this tree's base install plus ``extras``, ``dreamserve[...]`` expanded."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    seen = set() if seen is None else seen
    found = [Requirement(text) for text in project["dependencies"]]
    for extra in sorted(extras - seen):
        seen.add(extra)
        for requirement in map(Requirement, project["optional-dependencies"][extra]):
            if canonicalize_name(requirement.name) == "dreamserve":
                found += project_requirements(set(requirement.extras), seen)
            else:
                found.append(requirement)
    return found


def brought_in(extras: set[str]) -> set[str]:
    """Every distribution that installing the base and ``extras`` installs (canonical names)."""
    names: set[str] = set()
    pending = [(canonicalize_name(r.name), frozenset(r.extras)) for r in project_requirements(extras)]
    done: set[tuple[str, frozenset[str]]] = set()
    while pending:
        name, wanted = pending.pop()
        if (name, wanted) in done:
            continue
        done.add((name, wanted))
        names.add(name)
        for requirement in map(Requirement, _requires(name)):
            env = [{"extra": extra} for extra in ("", *wanted)]
            if requirement.marker is None or any(requirement.marker.evaluate(e) for e in env):
                pending.append((canonicalize_name(requirement.name), frozenset(requirement.extras)))
    return names


@cache
def _requires(name: str) -> tuple[str, ...]:
    try:
        return tuple(metadata.requires(name) or ())
    except metadata.PackageNotFoundError:
        return ()  # declared but not installed here: nothing of it can have been imported


@cache
def _providers() -> dict[str, frozenset[str]]:
    """Top-level module -> the installed distributions that provide it (canonical names)."""
    found = metadata.packages_distributions()
    return {module: frozenset(map(canonicalize_name, names)) for module, names in found.items()}


def distributions_of(module: str) -> frozenset[str]:
    """The distributions that provide a top-level module (its own name when none installed does)."""
    return _providers().get(module) or frozenset([canonicalize_name(module)])


def _runtime_nodes(tree: ast.Module, functions: set[str] | None) -> list[ast.AST]:
    """The nodes whose imports run: all but ``if TYPE_CHECKING:`` blocks; with ``functions`` given, of the
    module's own functions only those."""
    top_level = {id(node) for node in tree.body}
    nodes: list[ast.AST] = []
    pending: list[ast.AST] = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            continue
        function = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        if functions is not None and function and id(node) in top_level and node.name not in functions:
            continue
        nodes.append(node)
        pending.extend(ast.iter_child_nodes(node))
    return nodes


def imports_of(module: str, functions: set[str] | None = None) -> set[str]:
    """Every module a package module imports (``dreamserve.x`` for ours), at module level or in a function."""
    path = PACKAGE / f"{module.replace('.', '/')}.py"
    if not path.exists():
        path = PACKAGE / module.replace(".", "/") / "__init__.py"
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text()), functions):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "dreamserve":
                found |= {f"dreamserve.{alias.name}" for alias in node.names}
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return found


def _is_module(name: str) -> bool:
    base = PACKAGE / name.replace(".", "/")
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def worker_imports() -> dict[str, set[str]]:
    """Third-party top-level module -> the package modules that import it, over all the worker can reach."""
    third: dict[str, set[str]] = {}
    pending = [("cli", imports_of("cli", functions={"worker"})), *((m, imports_of(m)) for m in ENTRIES)]
    seen = {"cli", *ENTRIES}
    while pending:
        module, imported = pending.pop()
        for name in imported:
            if not name.startswith("dreamserve."):
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "__future__":
                    third.setdefault(top, set()).add(module)
                continue
            ours = name.removeprefix("dreamserve.")
            parts = ours.split(".")
            # ``from dreamserve.x import name`` may name a function of x; its packages run their __init__ too.
            for end in range(1, len(parts) + 1):
                candidate = ".".join(parts[:end])
                if candidate not in seen and _is_module(candidate):
                    seen.add(candidate)
                    pending.append((candidate, imports_of(candidate)))
    return third


def test_worker_extra_has_every_module_the_worker_imports() -> None:
    allowed = brought_in({"worker"})
    features = {canonicalize_name(r.name) for extra in FEATURE_EXTRAS for r in project_requirements({extra})}
    imported = worker_imports()
    assert {"torch", "sqlalchemy", "celery", "pydantic_settings"} <= set(imported), "the walk reaches the worker"
    missing = {
        module: sorted(users)
        for module, users in imported.items()
        if not distributions_of(module) & (allowed | features)
    }
    assert not missing, f"imported by the worker, not brought in by dreamserve[worker]: {missing}"


#: Run in a fresh interpreter where the given top-level modules cannot be imported: each fails as if its
#: distribution were not installed. Optional imports (``try: import x``) take their fallback.
_HIDING = """
import importlib.abc, json, sys
hidden = set(json.loads(sys.argv[1]))

class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in hidden:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NotInstalled())
exec(sys.argv[2])
"""


def import_with_only(distributions: set[str], statement: str) -> subprocess.CompletedProcess[str]:
    """Run ``statement`` as on a machine where only ``distributions`` (and dreamserve) are installed: the modules
    of every other installed distribution are hidden."""
    hidden = [m for m, dists in _providers().items() if not dists & distributions and m != "dreamserve"]
    command = [sys.executable, "-c", _HIDING, json.dumps(hidden), statement]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


#: ``dreamserve worker``'s imports, and the drivers its settings' URLs name: PostgreSQL through asyncpg, Celery's
#: Redis transport.
WORKER_PROCESS = (
    "import dreamserve.cli, dreamserve.scale.worker\n"
    "from sqlalchemy.dialects import registry\n"
    "registry.load('postgresql.asyncpg').import_dbapi()\n"
    "import kombu.transport.redis\n"
    "assert kombu.transport.redis.redis is not None, 'no redis client'\n"
)


def test_worker_process_imports_with_only_the_worker_extra() -> None:
    ran = import_with_only(brought_in({"worker"}), WORKER_PROCESS)
    assert ran.returncode == 0, ran.stderr[-3000:]
    # Without the cluster's stores it cannot start: the restriction bites.
    bare = import_with_only(brought_in({"engine"}), WORKER_PROCESS)
    missing = re.search(r"No module named '(\w+)'", bare.stderr)
    assert bare.returncode != 0 and missing and missing[1] in ("celery", "sqlalchemy", "pydantic_settings"), bare.stderr


def test_the_check_sees_a_missing_distribution() -> None:
    # The model runtime alone (what the worker extra held before: no settings, no database) does not run a
    # worker, and the same check names what it lacks.
    allowed = brought_in({"engine"})
    lacking = {module for module in worker_imports() if not distributions_of(module) & allowed}
    assert {"pydantic_settings", "sqlalchemy", "celery"} <= lacking and "torch" not in lacking
