"""scripts/complexity, the lint step's complexity gate, bites: a function over the limit fails it, a closure's
branches count for the function that defines it, and the package itself passes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent.parent / "scripts" / "complexity"


def gate(*paths: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, paths)], capture_output=True, text=True, timeout=60)


def branches(count: int, indent: str) -> str:
    return "".join(f"{indent}if x == {n}:\n{indent}    return {n}\n" for n in range(count))


def test_a_function_over_the_limit_fails(tmp_path: Path) -> None:
    source = tmp_path / "flat.py"
    source.write_text("def f(x):\n" + branches(11, "    "))  # 12: at the limit
    assert gate(source).returncode == 0
    source.write_text("def f(x):\n" + branches(12, "    "))
    over = gate(source)
    assert over.returncode == 1 and "flat.py:1: f has complexity 13" in over.stdout


def test_a_closure_counts_for_the_function_that_defines_it(tmp_path: Path) -> None:
    # Alone, inner is 12 and outer 1 (radon's own report flags neither); folded together they are 13.
    source = tmp_path / "nested.py"
    source.write_text("def outer():\n    def inner(x):\n" + branches(11, "        ") + "    return inner\n")
    over = gate(source)
    assert over.returncode == 1 and "nested.py:1: outer has complexity 13" in over.stdout


def test_the_package_is_within_the_limit() -> None:
    checked = gate()
    assert checked.returncode == 0, checked.stdout
