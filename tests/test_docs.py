"""The runnable examples in the docs run as they are written."""

from __future__ import annotations

import re
import subprocess
import sys

from support import ROOT, WAIT

from statemachines import errorkinds as ek


def python_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / page).read_text(), re.DOTALL)


def test_the_python_api_example_runs() -> None:
    example = python_blocks("docs/python.md")[0]
    result = subprocess.run(
        [sys.executable, "-c", example],
        capture_output=True,
        text=True,
        timeout=3 * WAIT,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("19\n")
    assert f"{ek.NOT_ALLOWED} idle ['fault']" in out
    assert "state: idle -> calibrating" in out and f"cancelled: {ek.CANCELLED}" in out
    assert "workflow: success in state done" in out
