"""``statelink check``: an ``ok`` says what it did not check (issue 14, first hour 2); against a
live server it reads the server's OpenRPC ``rpc.discover`` (protocol item 7)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support import ROOT

from controller import CommandServer, cli
from controller.cli.check import skipped_note
from controller.devices import add_device
from statemachines.device import load_device
from statemachines.workflow import parse_workflow

DEMO_DEVICE = str(ROOT / "config" / "devices" / "demo.yaml")

TYPO = """\
name: typo
servers: {device: "127.0.0.1:1"}
command_timeout: 5s
initial: a
states:
  a: {command: demo.read_sensr, params: {timeout: 99}, next: b}
  b: {command: rpc.ping, next: done}
  done: {final: success}
"""

TWO_SERVERS = """\
name: two
servers: {device: "127.0.0.1:1", lab: "127.0.0.1:2"}
command_timeout: 5s
initial: a
states:
  a: {command: demo.state, server: device, next: b}
  b: {command: lab.read, server: lab, next: c}
  c: {command: rpc.ping, server: lab, next: done}
  done: {final: success}
"""


@pytest.fixture
def typo(tmp_path: Path) -> str:
    path = tmp_path / "typo.yaml"
    path.write_text(TYPO)
    return str(path)


def test_ok_without_a_device_says_the_device_checks_were_skipped(
    typo: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["check", typo]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{typo}: ok (workflow typo, 3 states); device checks skipped")
    assert "server 'device'" in out
    assert "--device DEVICE.yaml" in out and "--server [NAME=]HOST:PORT" in out


def test_the_skipped_checks_find_the_typo_with_a_device(
    typo: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["check", typo, "--device", DEMO_DEVICE]) == 2
    err = capsys.readouterr().err
    assert "no command 'demo.read_sensr'" in err and "did you mean 'demo.read_sensor'" in err


def test_a_checked_ok_has_no_note(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "fine.yaml"
    path.write_text(TYPO.replace("demo.read_sensr, params: {timeout: 99}", "demo.state"))
    assert cli.main(["check", str(path), "--device", DEMO_DEVICE]) == 0
    assert capsys.readouterr().out == f"{path}: ok (workflow typo, 3 states)\n"


def test_only_the_servers_left_unchecked_are_named() -> None:
    spec = parse_workflow(TWO_SERVERS)
    assert "server 'device', 'lab' not checked" in skipped_note(spec, {})
    assert "server 'lab' not checked" in skipped_note(spec, {"device": {}})
    assert skipped_note(spec, {"device": {}, "lab": {}}) == ""
    assert skipped_note(spec, {"*": {}}) == ""  # a NAME=-less --server or --device: every one
    only_rpc = parse_workflow(TYPO.replace("demo.read_sensr, params: {timeout: 99}", "rpc.ping"))
    assert skipped_note(only_rpc, {}) == ""  # rpc.* methods are never checked anyway


@pytest.fixture
def live_demo() -> Iterator[str]:
    """``HOST:PORT`` of a server with the demo device."""
    server = CommandServer(port=0, grace=0.5)
    add_device(server, load_device(DEMO_DEVICE), simulate=True)
    with server:
        host, port = server.address
        yield f"{host}:{port}"


def test_check_server_reads_the_openrpc_discover(
    typo: str, tmp_path: Path, live_demo: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["check", typo, "--server", f"device={live_demo}"]) == 2
    err = capsys.readouterr().err
    assert "no command 'demo.read_sensr'" in err and "did you mean 'demo.read_sensor'" in err
    bad_param = tmp_path / "bad_param.yaml"
    bad_param.write_text(
        TYPO.replace(
            "demo.read_sensr, params: {timeout: 99}", "demo.calibrate, params: {steps: 500}"
        )
    )
    assert cli.main(["check", str(bad_param), "--server", live_demo]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{bad_param}:") and "steps" in err
    fine = tmp_path / "fine.yaml"
    fine.write_text(TYPO.replace("demo.read_sensr, params: {timeout: 99}", "demo.calibrate"))
    assert cli.main(["check", str(fine), "--server", f"device={live_demo}"]) == 0
    assert capsys.readouterr().out == f"{fine}: ok (workflow typo, 3 states)\n"
