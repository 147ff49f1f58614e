"""``statelink call`` as a new user meets it: slow commands, timeouts, typos (issue 14)."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys

import pytest
from support import ROOT, WAIT, ServeProcess, statelink

DEMO = "config/devices/demo.yaml"


@pytest.fixture(scope="module")
def demo_server():
    server = ServeProcess("--device", DEMO, "--simulate")
    yield server
    server.stop()


def test_a_timeout_says_the_command_was_cancelled_on_the_server(demo_server):
    slow = json.dumps({"steps": 50, "delay": 0.2})  # 10 s
    done = statelink(
        "call", "--server", demo_server.server, "--timeout", "0.5", "demo.calibrate", slow
    )
    assert done.returncode == 1
    assert "cancelled demo.calibrate on the server" in done.stderr, done.stderr
    # the device is free again at once: the cancelled command left it idle (cancelled: idle)
    state = statelink("call", "--server", demo_server.server, "demo.state")
    assert json.loads(state.stdout)["state"] == "idle"


def test_an_unknown_method_suggests_the_closest(demo_server):
    done = statelink("call", "--server", demo_server.server, "demo.stat")
    assert done.returncode == 1
    assert "did you mean 'demo.state'?" in done.stderr, done.stderr


def test_progress_shows_on_a_terminal(demo_server):
    primary, secondary = pty.openpty()
    try:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "controller", "call", "--server", demo_server.server),
                *("demo.calibrate", json.dumps({"steps": 3, "delay": 0.05})),
            ],
            stdout=subprocess.PIPE,
            stderr=secondary,
            text=True,
            cwd=ROOT,
        )
        os.close(secondary)
        secondary = -1
        out, _ = proc.communicate(timeout=WAIT)
        terminal = b""
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # EIO: the process and its terminal are gone
                break
            if not chunk:
                break
            terminal += chunk
    finally:
        os.close(primary)
        if secondary != -1:
            os.close(secondary)
    assert proc.returncode == 0
    assert json.loads(out)["steps"] == 3
    assert b"%" in terminal, terminal  # e.g. "33% step 1/3"


def test_no_progress_on_a_pipe(demo_server):
    done = statelink(
        "call", "--server", demo_server.server, "demo.calibrate", '{"steps": 2, "delay": 0.05}'
    )
    assert done.returncode == 0 and done.stderr == ""
