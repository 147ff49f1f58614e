"""``statelink fleet`` against a real Mosquitto: the retained statuses and states a raw paho
client publishes (the contract's wire format, docs/fleet.md) become the table, the JSON and
the live view; an unreachable broker exits 3. Every test uses a topic prefix of its own on the
session's shared broker."""

from __future__ import annotations

import json
import os
import queue
import re
import secrets
import select
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mosquitto import Mosquitto, free_port
from mqtt_raw import RawMqtt, state, status
from support import ROOT, WAIT, ServeProcess, statelink

from controller.cli import build_parser

STOPPED_AT = "2025-06-01T09:00:00Z"
FLEET = (sys.executable, "-m", "controller", "fleet")


@pytest.fixture
def prefix() -> str:
    return "t" + secrets.token_hex(4)


def fleet(url: str, prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    return statelink("fleet", "--broker", url, "--topic-prefix", prefix, *args)


def rows(stdout: str) -> dict[str, list[str]]:
    """The plain table: node -> its cells (columns are two or more spaces apart)."""
    lines = stdout.splitlines()
    assert lines[0].split() == ["NODE", "STATUS", "LAST", "SEEN", "DEVICES"], stdout
    return {cells[0]: cells for cells in (re.split(r"\s{2,}", line) for line in lines[1:-1])}


def publish_fleet(url: str, prefix: str) -> None:
    """pi1 online (door idle, led on), pi2 stopped cleanly, pi3 lost (its Will)."""
    with RawMqtt(url) as raw:
        raw.publish(
            f"{prefix}/pi1/status", status("pi1", True, devices=["door", "led"]), retain=True
        )
        raw.publish(f"{prefix}/pi1/state/door", state("door", "idle"), retain=True)
        raw.publish(f"{prefix}/pi1/state/led", state("led", "on", "off", "led.on"), retain=True)
        stopped = status("pi2", False, reason="stopped", at=STOPPED_AT, devices=["door"])
        raw.publish(f"{prefix}/pi2/status", stopped, retain=True)
        raw.publish(f"{prefix}/pi2/state/door", state("door", "closed"), retain=True)
        raw.publish(f"{prefix}/pi3/status", status("pi3", False), retain=True)


def test_an_empty_fleet_says_so(broker: Mosquitto, prefix: str) -> None:
    result = fleet(broker.url, prefix)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        f"no nodes on {broker.url}, prefix {prefix} (nothing retained on {prefix}/+/status)\n"
    )
    as_json = fleet(broker.url, prefix, "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)["nodes"] == []


def test_the_table_shows_each_node_its_status_last_seen_and_device_states(
    broker: Mosquitto, prefix: str
) -> None:
    publish_fleet(broker.url, prefix)
    result = fleet(broker.url, prefix)
    assert result.returncode == 0, result.stderr
    table = rows(result.stdout)
    assert table["pi1"] == ["pi1", "online", "now", "door=idle, led=on"]
    assert table["pi2"][:2] == ["pi2", "offline"]
    assert table["pi2"][2].startswith(f"{STOPPED_AT} (") and table["pi2"][2].endswith(" ago)")
    assert table["pi2"][3] == "door=closed"
    assert table["pi3"] == ["pi3", "offline", "lost", "-"]
    assert list(table) == ["pi1", "pi2", "pi3"]  # by name
    assert result.stdout.splitlines()[-1] == (
        f"3 nodes: 1 online, 2 offline ({broker.url}, prefix {prefix})"
    )


def test_json_has_the_snapshot(broker: Mosquitto, prefix: str) -> None:
    publish_fleet(broker.url, prefix)
    result = fleet(broker.url, prefix, "--json")
    assert result.returncode == 0, result.stderr
    snapshot = json.loads(result.stdout)
    assert snapshot["broker"] == broker.url and snapshot["prefix"] == prefix
    nodes = {node["node"]: node for node in snapshot["nodes"]}
    pi1, pi2, pi3 = nodes["pi1"], nodes["pi2"], nodes["pi3"]
    assert pi1["online"] is True and pi1["reason"] is None
    assert pi1["last_seen"] == snapshot["at"]  # online: seen now
    assert pi1["devices"] == {"door": "idle", "led": "on"}
    assert pi1["states"]["led"] == state("led", "on", "off", "led.on")
    assert pi1["status"] == status("pi1", True, devices=["door", "led"])
    assert (pi2["online"], pi2["reason"], pi2["last_seen"]) == (False, "stopped", STOPPED_AT)
    assert (pi3["online"], pi3["reason"], pi3["last_seen"]) == (False, "lost", None)
    assert snapshot["incomplete"] is False


def test_every_retained_message_is_in_the_snapshot(tmp_path: Path) -> None:
    """Far more retained messages than the broker keeps in flight to one client (20 by
    default) plus what it queues (here 50; beyond, Mosquitto drops them): they all come, and
    the marker published after the SUBACK comes after all of them."""
    count = 150
    with Mosquitto(tmp_path / "broker", "max_queued_messages 50\n") as own:
        with RawMqtt(own.url) as raw:
            for i in range(count):
                node = f"n{i:03d}"
                raw.publish(f"p/{node}/status", status(node, True, devices=["d"]), retain=True)
                raw.publish(f"p/{node}/state/d", state("d", f"s{i}"), retain=True)
        result = fleet(own.url, "p", "--json")
    assert result.returncode == 0, result.stderr
    nodes = json.loads(result.stdout)["nodes"]
    assert [node["node"] for node in nodes] == [f"n{i:03d}" for i in range(count)]
    assert [node["devices"]["d"] for node in nodes] == [f"s{i}" for i in range(count)]


def test_bad_payloads_are_shown_not_fatal(broker: Mosquitto, prefix: str) -> None:
    with RawMqtt(broker.url) as raw:
        raw.publish(f"{prefix}/bad1/status", b"not json", retain=True)
        raw.publish(f"{prefix}/bad2/status", {"node": "bad2"}, retain=True)
        raw.publish(f"{prefix}/ok/status", status("ok", True, devices=["d"]), retain=True)
        raw.publish(f"{prefix}/ok/state/d", b"[1, 2]", retain=True)
    result = fleet(broker.url, prefix)
    assert result.returncode == 0, result.stderr
    table = rows(result.stdout)
    assert table["bad1"] == ["bad1", "unknown", "- (status is not JSON)", "-"]
    assert table["bad2"][1:3] == ["unknown", '- (status has no "online": true/false)']
    assert table["ok"] == ["ok", "online", "now", "d=?"]
    assert "1 online, 0 offline, 2 unknown" in result.stdout


def test_an_unreachable_broker_exits_3_with_one_line() -> None:
    port = free_port()  # nothing listens there
    result = statelink("fleet", "--broker", f"mqtt://127.0.0.1:{port}", "--timeout", "5")
    assert result.returncode == 3
    assert result.stdout == ""
    assert result.stderr == (
        f"statelink fleet: cannot reach the MQTT broker mqtt://127.0.0.1:{port}: "
        "Connection refused\n"
    )


def test_an_unreadable_ca_bundle_exits_3_with_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "missing.crt"
    result = statelink("fleet", "--broker", "mqtts://127.0.0.1:1", "--tls-ca", str(missing))
    assert result.returncode == 3
    assert result.stderr == (
        f"statelink fleet: cannot load the CA bundle {missing} (--tls-ca) for the MQTT broker "
        "mqtts://127.0.0.1:1: No such file or directory\n"
    )


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--broker", "http://x"], "--broker"),
        (["--broker", "mqtt://x/node"], "no path expected"),
        (["--broker", "mqtt://x", "--topic-prefix", "a/+"], "prefix"),
        (["--broker", "mqtt://x", "--watch", "--json"], "not allowed with"),
        (["--broker", "mqtt://x", "--mqtt-password-file", "pw"], "needs --mqtt-user"),
    ],
)
def test_bad_usage_exits_2(argv: list[str], says: str) -> None:
    result = statelink("fleet", *argv)
    assert result.returncode == 2
    assert says in result.stderr and "Traceback" not in result.stderr


# -- --watch --------------------------------------------------------------------------------
class Watch:
    """``statelink fleet --watch`` with its stdout on a pipe (plain mode): lines, bounded waits."""

    def __init__(self, url: str, prefix: str) -> None:
        self.proc = subprocess.Popen(
            [*FLEET, "--broker", url, "--topic-prefix", prefix, "--watch"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put("")

    def expect(self, pattern: str) -> str:
        """The next line matching ``pattern`` (regex, searched)."""
        deadline = time.monotonic() + WAIT
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r} in {self.seen}") from None
            self.seen.append(line)
            if re.search(pattern, line):
                return line
            if line == "" and self.proc.poll() is not None:
                raise AssertionError(f"the watch exited ({self.proc.returncode}): {self.seen}")

    def interrupt(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(WAIT)
        assert self.proc.stderr is not None
        return code, self.proc.stderr.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(WAIT)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def watch_factory() -> Iterator[Any]:
    made: list[Watch] = []

    def make(url: str, prefix: str) -> Watch:
        made.append(Watch(url, prefix))
        return made[-1]

    yield make
    for watch in made:
        watch.close()


def test_watch_prints_the_table_then_each_change_and_ctrl_c_exits_0(
    broker: Mosquitto, prefix: str, watch_factory: Any
) -> None:
    publish_fleet(broker.url, prefix)
    watch = watch_factory(broker.url, prefix)
    watch.expect(r"^3 nodes: 1 online, 2 offline")
    with RawMqtt(broker.url) as raw:
        raw.publish(
            f"{prefix}/pi1/state/door", state("door", "open", "idle", "door.open"), retain=True
        )
        watch.expect(r"Z pi1 door: idle -> open \(door\.open\)$")
        raw.publish(f"{prefix}/pi1/status", status("pi1", False), retain=True)  # its Will
        watch.expect(r"Z pi1 offline \(lost\)$")
        raw.publish(f"{prefix}/pi4/status", status("pi4", True), retain=True)
        watch.expect(r"Z pi4 online since ")
        raw.publish(f"{prefix}/pi3/status", b"", retain=True)  # cleared
        watch.expect(r"Z pi3 gone$")
    code, err = watch.interrupt()
    assert code == 0, err
    assert "Traceback" not in err


def test_watch_survives_a_broker_restart(tmp_path: Path, watch_factory: Any) -> None:
    with Mosquitto(tmp_path / "broker") as own:
        with RawMqtt(own.url) as raw:
            raw.publish("statelink/pi1/status", status("pi1", True), retain=True)
        watch = watch_factory(own.url, "statelink")
        watch.expect(r"^1 node: 1 online")
        own.restart()  # persistence keeps the retained status
        watch.expect(r"Z broker connection lost")
        watch.expect(r"Z broker connection back$")
        with RawMqtt(own.url) as raw:
            raw.publish("statelink/pi1/status", status("pi1", False), retain=True)
        watch.expect(r"Z pi1 offline \(lost\)$")
        code, err = watch.interrupt()
        assert code == 0, err


def test_watch_on_a_terminal_is_a_live_table_and_ctrl_c_exits_0(
    broker: Mosquitto, prefix: str
) -> None:
    pty = pytest.importorskip("pty")
    publish_fleet(broker.url, prefix)
    master, slave = pty.openpty()
    env = dict(os.environ, TERM="xterm-256color", COLUMNS="120", LINES="40")
    proc = subprocess.Popen(
        [*FLEET, "--broker", broker.url, "--topic-prefix", prefix, "--watch"],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        cwd=ROOT,
        env=env,
        start_new_session=True,
    )
    os.close(slave)
    output = b""

    def read_until(needle: bytes) -> None:
        nonlocal output
        deadline = time.monotonic() + WAIT
        while needle not in output:
            assert time.monotonic() < deadline, output.decode(errors="replace")[-2000:]
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    output += os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
        assert needle in output, output.decode(errors="replace")[-2000:]

    try:
        read_until(b"Ctrl-C to quit")
        assert b"door=idle" in output and b"pi3" in output
        with RawMqtt(broker.url) as raw:
            raw.publish(
                f"{prefix}/pi1/state/door", state("door", "open", "idle", "door.open"), retain=True
            )
        read_until(b"door=open")
        proc.send_signal(signal.SIGINT)
        code = proc.wait(WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT)
        os.close(master)
    assert code == 0
    assert b"Traceback" not in output


# -- with real nodes (statelink serve --broker) ----------------------------------------------
NODES = pytest.mark.skipif(
    not (ROOT / "controller" / "mqtt" / "node.py").exists(),
    reason="statelink serve --broker is not there yet (controller/mqtt/node.py)",
)


@NODES
def test_two_real_nodes_and_one_killed(broker: Mosquitto, prefix: str, watch_factory: Any) -> None:
    watch = watch_factory(broker.url, prefix)
    watch.expect(r"^no nodes on ")
    device = str(ROOT / "config" / "devices" / "demo.yaml")
    common = ("--broker", broker.url, "--topic-prefix", prefix, "--device", device, "--simulate")
    alpha = ServeProcess(*common, "--node", "alpha", port=None)
    beta = ServeProcess(*common, "--node", "beta", port=None)
    try:
        watch.expect(r"Z alpha online since ")
        watch.expect(r"Z beta online since ")
        result = fleet(broker.url, prefix, "--json")
        nodes = {node["node"]: node for node in json.loads(result.stdout)["nodes"]}
        assert nodes["alpha"]["online"] is True and nodes["beta"]["online"] is True
        assert nodes["alpha"]["devices"] == {"demo": "idle"}
        beta.kill()  # SIGKILL: the broker publishes beta's Will
        watch.expect(r"Z beta offline \(lost\)$")
        table = rows(fleet(broker.url, prefix).stdout)
        assert table["alpha"][:4] == ["alpha", "online", "now", "demo=idle"]
        assert table["beta"][:3] == ["beta", "offline", "lost"]
        assert alpha.stop() == 0  # SIGTERM: a clean stop
        watch.expect(r"Z alpha offline \(stopped at ")
        table = rows(fleet(broker.url, prefix).stdout)
        assert table["alpha"][1] == "offline" and table["alpha"][2].endswith(" ago)")
    finally:
        alpha.kill()
        beta.kill()


# -- the commands the docs show ---------------------------------------------------------------
def statelink_lines(markdown: str) -> list[str]:
    """The ``statelink ...`` lines of the ``sh`` blocks (a trailing ``  # comment`` cut off)."""
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", markdown, re.DOTALL):
        for line in block.splitlines():
            command = line.partition("  # ")[0].strip()
            if command.startswith("statelink "):
                lines.append(command)
    return lines


def test_the_fleet_commands_of_the_readme_and_docs_parse() -> None:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("## Fleet")
    section = readme[start : readme.index("\n## ", start + 1)]
    shown = statelink_lines(section)
    assert {line.split()[1] for line in shown} == {"serve", "fleet", "call", "run"}
    guide = statelink_lines((ROOT / "docs" / "fleet.md").read_text())
    assert {line.split()[1] for line in guide} >= {"serve", "fleet", "call", "check", "run"}
    for line in shown + guide:
        argv = shlex.split(line)[1:]
        assert build_parser().parse_args(argv).cmd == argv[0], line


def test_the_node_unit_runs_a_node_through_the_broker_only() -> None:
    unit = (ROOT / "deploy" / "statelink-node.service").read_text()
    match = re.search(r"^ExecStart=((?:.*\\\n)*.*)$", unit, re.MULTILINE)
    assert match, unit
    argv = shlex.split(match.group(1).replace("\\\n", " "))
    assert argv[0].endswith("/statelink")
    args = build_parser().parse_args(argv[1:])
    assert args.cmd == "serve" and args.broker.startswith("mqtts://") and args.tls_ca
    assert args.port is None  # no listening socket
    assert args.node == args.mqtt_user  # the ACL's pattern statelink/%u/#
    assert args.mqtt_password_file and args.device
