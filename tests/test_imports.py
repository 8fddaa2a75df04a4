"""Imports point one way: the client never pulls in the server, and the API never pulls in torch."""

from __future__ import annotations

import subprocess
import sys

import pytest


def loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


@pytest.mark.parametrize("module", ["dreamserve.client", "dreamserve.cli"])
def test_client_side_never_imports_the_server(module: str) -> None:
    modules = loaded_after(f"import {module}")
    for heavy in ("fastapi", "sqlalchemy", "torch", "diffusers", "pydantic_settings", "dreamserve.api"):
        assert heavy not in modules, f"{module} imports {heavy}"


def test_signing_is_stdlib_only() -> None:
    # The server and the client both import it; it must not drag either one's dependencies along.
    modules = loaded_after("import dreamserve.signing")
    for heavy in ("httpx", "websockets", "pydantic", "click", "rich", "fastapi"):
        assert heavy not in modules, f"dreamserve.signing imports {heavy}"


def test_api_never_imports_torch() -> None:
    modules = loaded_after("from dreamserve.api.app import create_app; create_app()")
    assert "fastapi" in modules
    for heavy in ("torch", "diffusers", "transformers", "dreamserve.engine"):
        assert heavy not in modules, f"the API imports {heavy}"
