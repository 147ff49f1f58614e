"""``statelink serve`` shows its traffic: one INFO line per command, turned off by ``--quiet``;
logging options are taken after the subcommand too (issue 14)."""

from __future__ import annotations

import logging
import queue
import re

from support import WAIT, RawConnection, ServeProcess

from statemachines import errorkinds as ek

DEMO = "config/devices/demo.yaml"
CALL_LINE = re.compile(
    r"statelink\.server\.calls: (?P<method>\S+) device=(?P<device>\S+) (?P<outcome>\S+) "
    r"(?P<ms>[\d.]+) ms peer=127\.0\.0\.1:\d+"
)


def _lines_until_exit(server: ServeProcess) -> list[str]:
    """Stop the server; every log line it wrote (after the start line)."""
    server.stop()
    lines = []
    while True:
        try:
            line = server.lines.get_nowait()
        except queue.Empty:
            return lines
        if not line:  # EOF
            return lines
        lines.append(line)


def _call_lines(lines: list[str]) -> list[re.Match[str]]:
    return [m for m in map(CALL_LINE.search, lines) if m]


def _calls(server: ServeProcess) -> None:
    with RawConnection(server.address) as conn:
        assert conn.call("demo.state", id=1)["result"]["state"] == "idle"
        reply = conn.call("demo.no_such_command", id=2)
        assert reply["error"]["code"] == ek.METHOD_NOT_FOUND


def test_serve_logs_one_line_per_command_at_info() -> None:
    server = ServeProcess("--device", DEMO, "--simulate", "--log-level", "INFO")
    try:
        _calls(server)
        found = []
        while len(found) < 2:  # the lines come as the replies go: wait for them (bounded)
            line = server.lines.get(timeout=WAIT)
            assert line, "the server exited"
            if match := CALL_LINE.search(line):
                found.append(match)
    finally:
        server.stop()
    assert [(m["method"], m["device"], m["outcome"]) for m in found] == [
        ("demo.state", "demo", "ok"),
        ("demo.no_such_command", "-", "unknown_command"),
    ]
    assert all(float(m["ms"]) >= 0 for m in found)


def test_quiet_turns_the_command_lines_off() -> None:
    server = ServeProcess("--device", DEMO, "--simulate", "--quiet")
    _calls(server)
    assert _call_lines(_lines_until_exit(server)) == []


def test_no_command_lines_at_warning_level(make_server, raw, caplog) -> None:
    """The library logs the lines at INFO on ``statelink.server.calls``: at WARNING (the
    default of an unconfigured program, e.g. the bench server) there are none."""
    caplog.set_level(logging.WARNING, logger="statelink")
    quiet = make_server()
    assert raw(quiet.address).call("rpc.ping", id=1)["result"] == "pong"
    caplog.set_level(logging.INFO, logger="statelink")
    assert raw(quiet.address).call("rpc.ping", id=2)["result"] == "pong"
    lines = [r.getMessage() for r in caplog.records if r.name == "statelink.server.calls"]
    assert len(lines) == 1 and lines[0].startswith("rpc.ping device=- ok "), lines


def test_serve_accepts_log_level_debug_after_the_subcommand() -> None:
    server = ServeProcess("--log-level", "DEBUG")
    with RawConnection(server.address) as conn:
        assert conn.call("rpc.ping", id=1)["result"] == "pong"
    assert [m["method"] for m in _call_lines(_lines_until_exit(server))] == ["rpc.ping"]
