"""controller.handlers: a device's handler references are resolved (device code imported) when
the device is served, never when its config is loaded or checked."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from support import statelink

from controller.handlers import resolve_handlers
from statemachines.device import load_device
from statemachines.source import ConfigErrors

DEVICE = """\
device: lab
states: [idle, busy]
commands:
  work: {from: [idle], running: busy, to: idle, handler: noisy_hw:work}
  look: {handler: noisy_hw:look, params: {what: {type: string, default: all}}}
"""

# Appends a line to MARK (next to it) each time the module is executed.
NOISY = """\
from pathlib import Path

with open(Path(__file__).with_name("MARK"), "a") as mark:
    mark.write("imported\\n")


def work(ctx):
    return {}


def look(ctx, what="all"):
    return {"what": what}
"""


def rewrite(path: Path, text: str) -> None:
    """Write ``path`` anew with an mtime surely later than before (coarse clocks)."""
    before = path.stat().st_mtime_ns
    path.write_text(text, encoding="utf-8")
    os.utime(path, ns=(before + 1_000_000_000, before + 1_000_000_000))


@pytest.fixture
def noisy(tmp_path: Path) -> Path:
    (tmp_path / "noisy_hw.py").write_text(NOISY, encoding="utf-8")
    path = tmp_path / "lab.yaml"
    path.write_text(DEVICE, encoding="utf-8")
    return path


def test_loading_and_checking_a_device_config_runs_no_handler_code(noisy: Path) -> None:
    mark = noisy.with_name("MARK")
    spec = load_device(noisy)
    assert str(spec.commands["work"].handler_ref) == "noisy_hw:work"
    done = statelink("check", str(noisy))
    assert done.returncode == 0, done.stderr
    assert "ok (device lab, 2 commands)" in done.stdout
    assert not mark.exists()

    handlers = resolve_handlers(spec)
    assert mark.read_text() == "imported\n"
    assert handlers["look"](None, what="x") == {"what": "x"}
    assert set(handlers) == {"work", "look"}


def test_a_handler_file_runs_once_per_version(noisy: Path) -> None:
    mark = noisy.with_name("MARK")
    first = resolve_handlers(load_device(noisy))
    second = resolve_handlers(load_device(noisy))
    assert mark.read_text() == "imported\n"  # the module is cached per file ...
    assert first["work"] is second["work"]
    rewrite(noisy.with_name("noisy_hw.py"), NOISY + "\n# edited\n")
    third = resolve_handlers(load_device(noisy))
    assert mark.read_text() == "imported\nimported\n"  # ... and run again once edited
    assert third["work"] is not first["work"]


def test_every_problem_is_reported_in_line_order(noisy: Path) -> None:
    noisy.write_text(
        DEVICE.replace("noisy_hw:work", "noisy_hw:wrk").replace("noisy_hw:look", "gone_xyz:look"),
        encoding="utf-8",
    )
    spec = load_device(noisy)  # the references are well formed: the config loads
    with pytest.raises(ConfigErrors) as info:
        resolve_handlers(spec)
    found = [(e.file, e.line, e.message) for e in info.value.errors]
    assert found == [
        (
            str(noisy),
            4,
            "command 'work': handler 'noisy_hw:wrk': module 'noisy_hw' has no function 'wrk' "
            "(functions: look, work)",
        ),
        (str(noisy), 5, found[1][2]),
    ]
    assert found[1][2].startswith("command 'look': handler 'gone_xyz:look': no module 'gone_xyz'")


def test_the_signature_must_take_every_param_and_the_always_present_ones(noisy: Path) -> None:
    source = noisy.with_name("noisy_hw.py")
    rewrite(source, NOISY.replace('def look(ctx, what="all")', "def look(ctx, *, what)"))
    resolve_handlers(load_device(noisy))  # `what` always has a value: fine
    rewrite(source, NOISY.replace('def look(ctx, what="all")', "def look(ctx)"))
    with pytest.raises(ConfigErrors) as info:
        resolve_handlers(load_device(noisy))
    [error] = info.value.errors
    assert error.line == 5
    assert "handler 'noisy_hw:look' cannot be called as look(ctx, what)" in error.message
