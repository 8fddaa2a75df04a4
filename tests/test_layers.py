"""The ownership table of docs/architecture.md, as a test: which tier may import which.

Read statically (``ast``), so every import counts, those inside functions too. A known violation is listed in
``KNOWN`` with the reason it stays for now; when one is fixed, the test says so and it must leave the list.
"""

from __future__ import annotations

import ast
from pathlib import Path

import dreamserve
from dreamserve.dialects.ark.render import image_error
from dreamserve.dialects.wiro.render import event_message, progress_object
from dreamserve.facts import LogText, Progress

PACKAGE = Path(dreamserve.__file__).parent

#: module (or package prefix) -> tier, as in the table of docs/architecture.md.
TIERS: dict[str, str] = {
    **dict.fromkeys(
        [
            "errors",
            "settings",
            "jobs",
            "facts",
            "signing",
            "request",
            "sizes",
            "images",
            "status",
            "logs",
            "liveness",
            "malloc",
            "gcpause",
            "userconfig",
            "groups",
            "budget",
        ],
        "leaf",
    ),
    "queue": "queue",  # db, migrate, migrations, keyring, store, events, redis_events
    **dict.fromkeys(["auth", "projects", "ratelimit", "fileurls"], "request"),
    "metrics": "metrics",
    **dict.fromkeys(["blobs", "fetch", "webhooks", "dispatch", "sweep"], "io"),
    **dict.fromkeys(["presets", "submit", "preprocess", "weights", "filerows"], "submit"),
    "engine": "engine",
    "worker": "worker",
    "services": "services",
    "scale": "scale",
    # The dialects and api/ mount each other (api/app.py mounts the dialects, whose routes use api/deps.py): one
    # tier, with the finer rules below that no dialect imports another and no core module imports any.
    **dict.fromkeys(["api", "dialects"], "api"),
    "client": "client",
    **dict.fromkeys(["cli", "__main__"], "cli"),
}

#: tier -> the tiers it may import (its own always included).
MAY_IMPORT: dict[str, set[str]] = {
    "leaf": set(),
    "queue": {"leaf"},
    "request": {"leaf", "queue"},
    "metrics": {"leaf", "queue"},
    "io": {"leaf", "queue"},
    "submit": {"leaf", "queue", "request", "io"},
    "engine": {"leaf", "submit"},  # submit's tier holds the model presets (``models``)
    "worker": {"leaf", "queue", "io", "engine"},
    "services": {"leaf", "queue", "request", "metrics", "io", "submit", "worker"},
    "scale": {"leaf", "io", "services"},
    "api": {"leaf", "queue", "request", "metrics", "io", "submit", "services"},
    "client": {"leaf"},
    "cli": {"leaf", "client"},
}
#: Finer rules inside a tier: these modules may not import those, though their tiers allow it.
FORBIDDEN: dict[str, set[str]] = {
    # Only the model process imports the engine (and with it torch); the supervisor and its parts never do.
    **dict.fromkeys(
        [
            "worker.supervisor",
            "worker.process",
            "worker.protocol",
            "worker.running",
            "worker.inputs",
            "worker.outputs",
            "worker.clock",
        ],
        {"engine"},
    ),
    # The client side imports no server module: it must install and run without the server extras.
    "client": {"queue", "request", "io", "services", "api"},
}
#: Finer rules still: of the named tiers, modules of the first may import only these modules (docs/architecture.md
#: names them: the worker reads the store and its rows, never the hubs, the keyring or the callback sender; the
#: engine only the presets of its tier above; the client and the CLI only four leaves).
ONLY: dict[str, dict[str, set[str]]] = {
    "worker": {"queue": {"queue.store", "queue.db"}, "io": {"blobs", "fetch"}},
    "engine": {"submit": {"presets"}},
    **dict.fromkeys(["client", "cli"], {"leaf": {"signing", "errors", "status", "userconfig"}}),
}
#: Imports inside a function of these modules are not counted: the CLI's server commands import the server
#: lazily (``serve``, ``worker``, ``keys``, ``pull``), so ``dreamserve generate`` never loads it.
LAZY_OK = {"cli.server"}

#: Violations that stay for now, with why. Each one fixed must be taken off this list.
KNOWN: dict[tuple[str, str], str] = {}


def tier_of(module: str) -> str:
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        tier = TIERS.get(".".join(parts[:end]))
        if tier is not None:
            return tier
    raise AssertionError(f"dreamserve.{module} has no tier in TIERS (add it, and to docs/architecture.md)")


def absolute(node: ast.ImportFrom, package: str) -> str:
    """The module an ``from ... import`` names, relative ones (``from .store import X``) resolved."""
    if node.level == 0:
        return node.module or ""
    parts = package.split(".")
    base = parts[: len(parts) - (node.level - 1)] if node.level > 1 else parts
    return ".".join([*base, *([node.module] if node.module else [])])


def is_module(name: str) -> bool:
    """Whether ``dreamserve.a.b`` is a module or package of this tree (not a name defined in one)."""
    path = PACKAGE.joinpath(*name.split(".")[1:])
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports_of(path: Path, package: str = "dreamserve") -> list[tuple[str, bool]]:
    """``(imported dreamserve module, at module level)`` for every import in the file; ``package`` is the file's
    own package (``dreamserve.queue`` for ``queue/store.py``), against which relative imports are resolved."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found: list[tuple[str, bool]] = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom):
            module = absolute(node, package)
            # ``from dreamserve import logs`` and ``from ..queue import events`` import modules by name.
            names = [
                f"{module}.{alias.name}" if is_module(f"{module}.{alias.name}") else module
                for alias in node.names
                if alias.name != "__version__"
            ]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            if name.startswith("dreamserve."):
                found.append((name.removeprefix("dreamserve."), id(node) in top))
    return found


def package_of(module: str, path: Path) -> str:
    """The package a module's relative imports start from: itself for an ``__init__``, else its parent."""
    if path.name == "__init__.py":
        return f"dreamserve.{module}"
    return ".".join(["dreamserve", *module.split(".")[:-1]])


def allowed(module: str, imported: str) -> bool:
    tier, other = tier_of(module), tier_of(imported)
    forbidden = FORBIDDEN.get(module, set()) | FORBIDDEN.get(tier, set())
    if other != tier and (other not in MAY_IMPORT[tier] or other in forbidden):
        return False
    only = ONLY.get(tier, {}).get(other)
    return only is None or any(imported == name or imported.startswith(f"{name}.") for name in only)


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).with_suffix("")
        if relative.parts[0] == "migrations" or relative.parts == ("__init__",):
            continue
        parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
        found[".".join(parts)] = path
    return found


def violations() -> dict[tuple[str, str], str]:
    found: dict[tuple[str, str], str] = {}
    for module, path in modules().items():
        for imported, at_top in imports_of(path, package_of(module, path)):
            if module in LAZY_OK and not at_top:
                continue
            if not allowed(module, imported):
                found[(module, imported)] = f"{module} ({tier_of(module)}) imports {imported} ({tier_of(imported)})"
    return found


def test_every_import_follows_the_ownership_table() -> None:
    found = violations()
    new = {key: text for key, text in found.items() if key not in KNOWN}
    assert not new, "imports against docs/architecture.md:\n" + "\n".join(sorted(new.values()))
    fixed = set(KNOWN) - set(found)
    assert not fixed, f"fixed, take them off KNOWN: {sorted(fixed)}"


def test_the_table_knows_every_module() -> None:
    for module in modules():
        tier_of(module)


#: Dialect modules every dialect may import: the wire helpers and what the bearer dialects share.
DIALECT_SHARED = {"dialects.wire", "dialects.common", "dialects.mount"}


def dialect_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "dialects" and len(parts) > 2 else None


#: The core, which speaks no API: every module of these (a package stands for its modules).
CORE = ("services", "webhooks", "queue", "worker", "submit", "engine", "preprocess", "scale", "dispatch", "filerows")


def is_core(module: str) -> bool:
    return any(module == core or module.startswith(f"{core}.") for core in CORE)


def dialect_problems(module: str, imported: str) -> list[str]:
    """What is wrong with ``module`` importing ``imported``: a core module naming a dialect, or a dialect
    another's module beyond the shared ones."""
    theirs, mine = dialect_of(imported), dialect_of(module)
    if imported.startswith("dialects") and (is_core(module) or tier_of(module) != "api"):
        return [f"core {module} imports {imported}"]
    if theirs is not None and mine is not None and theirs != mine and imported not in DIALECT_SHARED:
        return [f"dialect {module} imports {imported}"]
    return []


def test_no_dialect_imports_another_and_the_core_imports_none() -> None:
    # The core (submit, queue, worker, engine, services, webhooks, ...) speaks no API: only api/ and dialects/ name
    # one, and a dialect reaches another only through what they share.
    found = []
    for module, path in modules().items():
        for imported, _ in imports_of(path, package_of(module, path)):
            found += dialect_problems(module, imported)
    assert not found, "\n".join(found)
    assert dialect_of("dialects.ark.routes") == "ark" and dialect_of("dialects.wire") is None
    # Every core package the rule names is there and is checked (a renamed one would silently escape it).
    every = modules()
    for core in CORE:
        assert any(is_core(module) and module.split(".")[0] == core for module in every), core
        assert core not in ("api", "dialects") and tier_of(core) != "api"
    # Wiro is a dialect like the others: no package of its own outside dialects/.
    assert not any(module == "wiro" or module.startswith("wiro.") for module in every)
    assert "wiro" not in TIERS and dialect_of("dialects.wiro.render") == "wiro"


def test_the_dialect_rule_bites() -> None:
    # Each way the core could reach a dialect is reported: Wiro's shapes, its routes, another dialect's renderer.
    for module in ("services", "webhooks", "queue.store", "worker.outputs", "submit"):
        assert dialect_problems(module, "dialects.wiro.render"), module
        assert dialect_problems(module, "dialects.mount"), module
    assert dialect_problems("dialects.ark.routes", "dialects.wiro.render")
    assert not dialect_problems("dialects.wiro.tasks", "dialects.wiro.render")
    assert not dialect_problems("dialects.ark.routes", "dialects.common")
    assert not dialect_problems("api.app", "dialects.mount")


def test_the_checker_sees_a_violation() -> None:
    # The rules bite: an API module importing the worker, or the client importing the store, is reported.
    assert "worker" not in MAY_IMPORT["api"] and "queue" in FORBIDDEN["client"]
    assert tier_of("worker.supervisor") == "worker" and tier_of("api.health") == "api"
    assert ("client", "store") not in KNOWN


def test_the_finer_rules_bite(tmp_path: Path) -> None:
    # Each rule docs/architecture.md states beyond the tiers is reported when broken.
    assert not allowed("worker.supervisor", "queue.events") and not allowed("worker.outputs", "webhooks")
    assert allowed("worker.supervisor", "queue.store") and allowed("worker.inputs", "blobs")
    assert not allowed("engine.runner", "submit") and not allowed("engine.loader", "weights")
    assert allowed("engine.loader", "presets")
    assert not allowed("client.base", "settings") and not allowed("cli.generate", "logs")
    assert allowed("client.base", "signing") and allowed("cli.generate", "client")
    assert "cli.generate" not in LAZY_OK and "cli.main" not in LAZY_OK
    # Relative imports are resolved and judged like absolute ones.
    source = tmp_path / "supervisor.py"
    source.write_text("from .protocol import Run\nfrom ..queue import events\nfrom . import running\n")
    assert imports_of(source, "dreamserve.worker") == [
        ("worker.protocol", True),
        ("queue.events", True),
        ("worker.running", True),
    ]


def wire_strings() -> set[str]:
    """The keys and fixed values of the wire shapes rendered from the worker's facts: Wiro's progress object and
    log frames, Ark's error object of an image."""
    wiro = progress_object(Progress(step=1, total=2, elapsed=1.0, preview="data:"))
    ark = image_error("text")
    fixed = {wiro["type"], wiro["task"], wiro["speedType"], ark["code"]}
    return {*wiro, *event_message(LogText(raw="")), *(key for key in ark if key != "message"), *fixed}


def string_constants(path: Path) -> set[str]:
    """Every string literal of a module (the constant parts of f-strings included), docstrings left out."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    }


def test_the_worker_reports_facts_not_wire_shapes(tmp_path: Path) -> None:
    # docs/architecture.md: the worker reports typed facts; only a dialect's renderer spells its keys.
    keys = wire_strings()
    assert {"stepCurrent", "remainingTime", "progressGenerate", "InternalServiceError", "raw"} <= keys
    found = {
        f"{path.relative_to(PACKAGE)}: {text!r}"
        for path in sorted((PACKAGE / "worker").rglob("*.py"))
        for text in string_constants(path) & keys
    }
    assert not found, "wire keys in worker/ (render them in the dialect's renderer):\n" + "\n".join(sorted(found))
    # The rule bites: a worker module that builds Ark's error object is reported.
    source = tmp_path / "outputs.py"
    source.write_text('"""Doc: stepCurrent."""\nerror = {"code": "InternalServiceError", "message": text}\n')
    assert string_constants(source) & keys == {"code", "InternalServiceError"}
