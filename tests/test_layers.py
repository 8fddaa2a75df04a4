"""The ownership table of docs/architecture.md, as a test: which tier may import which.

Read statically (``ast``), so every import counts, those inside functions too. A known violation is listed in
``KNOWN`` with the reason it stays for now; when one is fixed, the test says so and it must leave the list.
"""

from __future__ import annotations

import ast
from pathlib import Path

import dreamserve

PACKAGE = Path(dreamserve.__file__).parent

#: module (or package prefix) -> tier, as in the table of docs/architecture.md.
TIERS: dict[str, str] = {
    **dict.fromkeys(
        [
            "errors",
            "settings",
            "jobs",
            "signing",
            "wiro.sizes",
            "status",
            "logs",
            "liveness",
            "malloc",
            "userconfig",
            "groups",
            "budget",
        ],
        "leaf",
    ),
    "queue": "queue",  # db, migrate, migrations, keyring, store, events, redis_events
    **dict.fromkeys(["wiro", "auth", "projects", "ratelimit"], "request"),  # wiro: params, render, tools
    "metrics": "metrics",
    **dict.fromkeys(["blobs", "fetch", "webhooks"], "io"),
    **dict.fromkeys(["presets", "submit", "preprocess", "weights"], "submit"),
    "engine": "engine",
    "worker": "worker",
    "services": "services",
    "scale": "scale",
    "api": "api",
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
    "scale": {"leaf", "services"},
    "api": {"leaf", "queue", "request", "metrics", "io", "submit", "services"},
    "client": {"leaf"},
    "cli": {"leaf", "client"},
}
#: Finer rules inside a tier: these modules may not import those, though their tiers allow it.
FORBIDDEN: dict[str, set[str]] = {
    # Only the model process imports the engine (and with it torch); the supervisor and its parts never do.
    **dict.fromkeys(
        ["worker.supervisor", "worker.process", "worker.protocol", "worker.running", "worker.inputs", "worker.outputs"],
        {"engine"},
    ),
    # The client side imports no server module: it must install and run without the server extras.
    "client": {"queue", "request", "io", "services", "api"},
}
#: Imports inside a function of these modules are not counted: the CLI imports the server lazily, in ``serve``.
LAZY_OK = {"cli"}

#: Violations that stay for now, with why. Each one fixed must be taken off this list.
KNOWN: dict[tuple[str, str], str] = {
    ("services", "scale.dispatch"): "the Celery dispatcher is started by services and reaches back via RUNTIME",
}


def tier_of(module: str) -> str:
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        tier = TIERS.get(".".join(parts[:end]))
        if tier is not None:
            return tier
    raise AssertionError(f"dreamserve.{module} has no tier in TIERS (add it, and to docs/architecture.md)")


def imports_of(path: Path) -> list[tuple[str, bool]]:
    """``(imported dreamserve module, at module level)`` for every import in the file."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found: list[tuple[str, bool]] = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "dreamserve":
                names = [f"dreamserve.{alias.name}" for alias in node.names if alias.name != "__version__"]
            else:
                names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            if name.startswith("dreamserve."):
                found.append((name.removeprefix("dreamserve."), id(node) in top))
    return found


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
        tier = tier_of(module)
        for imported, at_top in imports_of(path):
            if tier in LAZY_OK and not at_top:
                continue
            other = tier_of(imported)
            forbidden = FORBIDDEN.get(module, set()) | FORBIDDEN.get(tier, set())
            allowed = (other == tier or other in MAY_IMPORT[tier]) and other not in forbidden
            if not allowed:
                found[(module, imported)] = f"{module} ({tier}) imports {imported} ({other})"
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


def test_the_checker_sees_a_violation() -> None:
    # The rules bite: an API module importing the worker, or the client importing the store, is reported.
    assert "worker" not in MAY_IMPORT["api"] and "queue" in FORBIDDEN["client"]
    assert tier_of("worker.supervisor") == "worker" and tier_of("api.health") == "api"
    assert ("client", "store") not in KNOWN
