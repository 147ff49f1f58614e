"""``statelink check``: an ``ok`` says what it did not check (issue 14, first hour 2)."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import ROOT

from controller import cli
from controller.cli.check import skipped_note
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
