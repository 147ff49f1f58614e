"""A fleet's broker security as deploy/ ships it (docs/fleet.md, "Security"): a real Mosquitto
started from deploy/mosquitto/statelink.conf (paths and ports made local) with the shipped
ACL file as it is, and a password file made with ``mosquitto_passwd``.

- logins: a wrong password or none is refused; ``statelink fleet`` / ``serve`` then exit 3;
- the per-node ACL: a node cannot publish on another node's topics (not even through its Last
  Will) nor read them, and can publish on its own and on the controllers' reply topics;
- a read-only ``viewer`` sees the fleet and cannot send commands;
- TLS (``mqtts://`` with ``--tls-ca``), with a CA and a server certificate made by ``openssl``.

"Never arrives" is checked with a barrier, never a sleep: after the forbidden message the same
client publishes an allowed one; the broker forwards one client's QoS 1 messages in order, so
when the allowed one arrives first, the forbidden one was dropped.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mosquitto import Mosquitto, free_port, require_mosquitto
from mqtt_raw import RawMqtt, state, status
from support import ROOT, WAIT, ServeProcess, statelink

SHIPPED_CONF = ROOT / "deploy" / "mosquitto" / "statelink.conf"
SHIPPED_ACL = ROOT / "deploy" / "mosquitto" / "statelink.acl"
USERS = {"controller": "c-secret", "viewer": "v-secret", "pi1": "p1-secret", "pi2": "p2-secret"}
HAVE_NODES = (ROOT / "controller" / "mqtt" / "node.py").exists()


def mosquitto_passwd() -> str:
    require_mosquitto()  # skips (locally) or fails (CI=true) without the broker package
    found = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    if not os.access(found, os.X_OK):
        pytest.fail("mosquitto is installed but mosquitto_passwd is not", pytrace=False)
    return found


def make_password_file(path: Path) -> Path:
    """``user:password`` lines, hashed in place by ``mosquitto_passwd -U``."""
    path.write_text("".join(f"{user}:{password}\n" for user, password in USERS.items()))
    subprocess.run([mosquitto_passwd(), "-U", str(path)], check=True, timeout=WAIT)
    assert "c-secret" not in path.read_text()  # hashed
    return path


def shipped_config(directory: Path, certs: Path | None) -> tuple[str, int | None]:
    """deploy/mosquitto/statelink.conf with local paths and free loopback ports (the ACL is
    the shipped file itself). ``certs``: the directory of server.crt/server.key (None: the
    TLS listener is left out). Returns the config text and the TLS port."""
    text = SHIPPED_CONF.read_text()
    passwords = make_password_file(directory / "statelink.passwd")

    def replace(old: str, new: str) -> None:
        nonlocal text
        assert old in text, f"{SHIPPED_CONF} no longer has {old!r}: update this test"
        text = text.replace(old, new)

    replace("/etc/mosquitto/statelink.passwd", str(passwords))
    replace("/etc/mosquitto/statelink.acl", str(SHIPPED_ACL))
    replace("listener 1883 127.0.0.1\n", f"listener {free_port()} 127.0.0.1\n")
    tls_block = (
        "listener 8883\n"
        "certfile /etc/mosquitto/certs/server.crt\n"
        "keyfile /etc/mosquitto/certs/server.key\n"
    )
    if certs is None:
        replace(tls_block, "")
        return text, None
    tls_port = free_port()
    replace(tls_block, tls_block.replace("/etc/mosquitto/certs", str(certs)))
    replace("listener 8883\n", f"listener {tls_port} 127.0.0.1\n")
    return text, tls_port


class SecureBroker(Mosquitto):
    """The shipped config on a plain loopback listener (``url``) and, with certificates, a
    TLS one (``tls_url``)."""

    def __init__(self, directory: Path, certs: Path | None = None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        extra, self.tls_port = shipped_config(directory, certs)
        super().__init__(directory, extra, anonymous=False)

    @property
    def tls_url(self) -> str:
        assert self.tls_port is not None
        return f"mqtts://127.0.0.1:{self.tls_port}"

    def login(self, user: str, **kwargs: Any) -> RawMqtt:
        client = RawMqtt(self.url, user=user, password=USERS[user], **kwargs)
        assert client.refused is None, client.refused
        return client


@pytest.fixture
def secure(tmp_path: Path) -> Iterator[SecureBroker]:
    with SecureBroker(tmp_path / "broker") as running:
        yield running


def password_file(tmp_path: Path, user: str, password: str | None = None) -> str:
    path = tmp_path / f"{user}.password"
    path.write_text((password or USERS[user]) + "\n")
    return str(path)


# -- logins ---------------------------------------------------------------------------------
@pytest.mark.parametrize("user, password", [("pi1", "wrong"), ("nobody", "x"), (None, None)])
def test_a_wrong_or_missing_login_is_refused(
    secure: SecureBroker, user: str | None, password: str | None
) -> None:
    client = RawMqtt(secure.url, user=user, password=password)
    try:
        assert client.refused in ("Not authorized", "Bad user name or password")
    finally:
        client.close()


def test_fleet_with_a_wrong_password_exits_3_with_one_line(
    secure: SecureBroker, tmp_path: Path
) -> None:
    wrong = password_file(tmp_path, "controller", "wrong")
    result = statelink(
        "fleet", "--broker", secure.url, "--mqtt-user", "controller", "--mqtt-password-file", wrong
    )
    assert result.returncode == 3, result.stderr
    assert result.stderr.count("\n") == 1 and result.stdout == ""
    assert result.stderr.startswith(
        f"statelink fleet: the MQTT broker {secure.url} refused the connection: "
    )
    assert "check --mqtt-user and the password" in result.stderr


@pytest.mark.skipif(not HAVE_NODES, reason="statelink serve --broker is not there yet")
def test_serve_with_a_wrong_password_exits_3_with_a_clear_line(
    secure: SecureBroker, tmp_path: Path
) -> None:
    wrong = password_file(tmp_path, "pi1", "wrong")
    result = statelink(
        "serve",
        "--broker",
        secure.url,
        "--node",
        "pi1",
        "--mqtt-user",
        "pi1",
        "--mqtt-password-file",
        wrong,
        "--state-dir",
        str(tmp_path / "state"),
        "--device",
        str(ROOT / "config" / "devices" / "demo.yaml"),
        "--simulate",
    )
    assert result.returncode == 3, result.stderr
    assert f"the MQTT broker {secure.url} refused the connection" in result.stderr
    assert "check --mqtt-user and the password" in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr  # one line, no log noise around it


def test_run_with_a_wrong_password_names_the_broker_not_the_server(
    secure: SecureBroker, tmp_path: Path
) -> None:
    wrong = password_file(tmp_path, "controller", "wrong")
    result = statelink(
        *("run", str(ROOT / "config" / "workflows" / "two_servers.yaml"), "--plain"),
        *("--server", f"{secure.url}/pi1", "--state-dir", str(tmp_path / "state")),
        *("--mqtt-user", "controller", "--mqtt-password-file", wrong),
    )
    assert result.returncode == 1, result.stderr
    assert "connection_lost" in result.stdout
    assert f"  the MQTT broker {secure.url} refused the login: check --mqtt-user" in result.stdout
    assert "statelink serve" not in result.stdout + result.stderr


# -- the per-node ACL -----------------------------------------------------------------------
OTHER_NODES_TOPICS = [
    "statelink/pi2/status",
    "statelink/pi2/state/door",
    "statelink/pi2/discover",
    "statelink/pi2/event/device.state",
    "statelink/pi2/rpc",
]


def test_a_node_cannot_publish_on_another_nodes_topics(
    secure: SecureBroker, tmp_path: Path
) -> None:
    with secure.login("controller") as controller, secure.login("pi1") as pi1:
        assert controller.subscribe("statelink/#") == "Granted QoS 1"
        for topic in OTHER_NODES_TOPICS:
            assert pi1.publish(topic, b"forged", retain=True) == "Not authorized", topic
        assert pi1.publish("statelink/pi1/event/barrier", b"after") == "Success"
        # the barrier comes first: every forged message was dropped
        assert controller.next_message() == ("statelink/pi1/event/barrier", b"after", False)
    # ... and nothing of them was retained either: a fresh read of the fleet is empty
    result = fleet_as(secure, tmp_path, "controller")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["nodes"] == []


def fleet_as(secure: SecureBroker, tmp_path: Path, user: str) -> subprocess.CompletedProcess:
    return statelink(
        "fleet",
        "--broker",
        secure.url,
        "--mqtt-user",
        user,
        "--mqtt-password-file",
        password_file(tmp_path, user),
        "--json",
    )


def test_a_node_cannot_forge_another_nodes_last_will(secure: SecureBroker) -> None:
    """A Will on another node's status is dropped when the broker publishes it; the same
    Will on the node's own status arrives (the control)."""
    with secure.login("controller") as controller:
        controller.subscribe("statelink/#")
        for topic, arrives in (("statelink/pi2/status", False), ("statelink/pi1/status", True)):
            old = secure.login("pi1", client_id="pi1-will", will=(topic, b'{"online": false}'))
            old.client.loop_stop()  # no reconnect: the takeover below ends it for good
            # the same client id takes the session over: the broker closes the old
            # connection and publishes its Will before it accepts the new one
            with secure.login("pi1", client_id="pi1-will") as new:
                assert new.publish("statelink/pi1/event/barrier", topic) == "Success"
                got = controller.next_message()
                if arrives:
                    assert got == (topic, b'{"online": false}', False)
                    got = controller.next_message()
                assert got == ("statelink/pi1/event/barrier", topic.encode(), False)


def test_a_node_publishes_on_its_own_topics_and_on_the_reply_topics(
    secure: SecureBroker,
) -> None:
    own = [
        ("statelink/pi1/status", status("pi1", True, devices=["door"])),
        ("statelink/pi1/state/door", state("door", "idle")),
        ("statelink/pi1/discover", {"devices": {}}),
        ("statelink/pi1/event/device.state", state("door", "idle")),
        ("statelink/_reply/controller-abc", {"jsonrpc": "2.0", "id": 1, "result": "pong"}),
    ]
    with secure.login("controller") as controller, secure.login("pi1") as pi1:
        controller.subscribe("statelink/#")
        for topic, payload in own:
            assert pi1.publish(topic, payload) == "Success", topic
        for topic, payload in own:
            assert controller.next_message() == (topic, json.dumps(payload).encode(), False)


def test_a_node_reads_only_its_own_requests(secure: SecureBroker) -> None:
    """The broker grants a node's subscriptions but never delivers what it may not read: other
    nodes' requests, controllers' replies."""
    with secure.login("controller") as controller, secure.login("pi1") as pi1:
        pi1.subscribe("statelink/pi2/rpc", "statelink/_reply/#", "statelink/pi1/rpc")
        assert controller.publish("statelink/pi2/rpc", b"for pi2") == "Success"
        assert controller.publish("statelink/_reply/other", b"a reply") == "Success"
        assert controller.publish("statelink/pi1/rpc", b"for pi1") == "Success"
        assert pi1.next_message() == ("statelink/pi1/rpc", b"for pi1", False)


def test_a_viewer_sees_the_fleet_and_cannot_send_commands(
    secure: SecureBroker, tmp_path: Path
) -> None:
    with secure.login("pi1") as pi1:
        pi1.publish("statelink/pi1/status", status("pi1", True, devices=["door"]), retain=True)
        pi1.publish("statelink/pi1/state/door", state("door", "idle"), retain=True)
    result = fleet_as(secure, tmp_path, "viewer")
    assert result.returncode == 0, result.stderr
    (node,) = json.loads(result.stdout)["nodes"]
    assert (node["node"], node["online"], node["devices"]) == ("pi1", True, {"door": "idle"})
    with secure.login("viewer") as viewer:
        assert viewer.publish("statelink/pi1/rpc", b"{}") == "Not authorized"
        assert viewer.publish("statelink/pi1/status", b"{}", retain=True) == "Not authorized"


def test_a_controller_sends_requests_and_cannot_forge_a_nodes_status(
    secure: SecureBroker,
) -> None:
    with secure.login("controller") as controller, secure.login("pi1") as pi1:
        assert pi1.subscribe("statelink/pi1/#") == "Granted QoS 1"
        for topic in ("statelink/pi1/status", "statelink/pi1/state/door", "statelink/pi1/discover"):
            assert controller.publish(topic, b"forged", retain=True) == "Not authorized", topic
        assert controller.publish("statelink/pi1/rpc", b"a request") == "Success"
        assert pi1.next_message() == ("statelink/pi1/rpc", b"a request", False)


# -- TLS ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA (``ca.crt``), and a certificate for 127.0.0.1 that it signed (``server.crt``,
    ``server.key``), made with the ``openssl`` command as docs/fleet.md shows."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl command: the TLS test needs it to make a CA and a certificate")
    directory = tmp_path_factory.mktemp("certs")

    def run(*args: str) -> None:
        done = subprocess.run([openssl, *args], cwd=directory, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr

    key = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    run(
        "req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=ca"
    )
    run("req", *key, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    run(
        *("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key"),
        *("-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "san.ext"),
    )
    return directory


@pytest.fixture
def tls_broker(tmp_path: Path, certs: Path) -> Iterator[SecureBroker]:
    with SecureBroker(tmp_path / "broker", certs) as running:
        yield running


def test_fleet_over_tls_verifies_the_broker_with_tls_ca(
    tls_broker: SecureBroker, certs: Path, tmp_path: Path
) -> None:
    with tls_broker.login("pi1") as pi1:
        pi1.publish("statelink/pi1/status", status("pi1", True), retain=True)
    login = ("--mqtt-user", "viewer", "--mqtt-password-file", password_file(tmp_path, "viewer"))
    result = statelink(
        "fleet", "--broker", tls_broker.tls_url, "--tls-ca", str(certs / "ca.crt"), *login
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1].startswith("1 node: 1 online")
    # without the CA the broker's certificate cannot be verified: exit 3, one line
    unverified = statelink("fleet", "--broker", tls_broker.tls_url, "--timeout", "5", *login)
    assert unverified.returncode == 3
    assert unverified.stderr.startswith(
        f"statelink fleet: cannot reach the MQTT broker {tls_broker.tls_url}: "
    )
    assert "CERTIFICATE_VERIFY_FAILED" in unverified.stderr.upper().replace(" ", "_")
    assert "with --tls-ca FILE" in unverified.stderr  # what to do
    assert unverified.stderr.count("\n") == 1


# -- real nodes and controllers through the shipped config -----------------------------------
@pytest.mark.skipif(not HAVE_NODES, reason="statelink serve --broker is not there yet")
def test_a_node_and_a_controller_through_tls_passwords_and_the_acl(
    tls_broker: SecureBroker, certs: Path, tmp_path: Path
) -> None:
    """What deploy/ ships works end to end: a node (user = its node name) serves, a controller
    calls it, the viewer lists it."""
    ca = ("--tls-ca", str(certs / "ca.crt"))
    node = ServeProcess(
        *("--broker", tls_broker.tls_url, *ca, "--node", "pi1", "--mqtt-user", "pi1"),
        *("--mqtt-password-file", password_file(tmp_path, "pi1")),
        *("--device", str(ROOT / "config" / "devices" / "demo.yaml"), "--simulate"),
        port=None,
    )
    try:
        controller = ("--mqtt-user", "controller")
        controller += ("--mqtt-password-file", password_file(tmp_path, "controller"))
        call = statelink(
            *("call", "--server", f"{tls_broker.tls_url}/pi1", *ca, *controller),
            "demo.state",
        )
        assert call.returncode == 0, call.stderr
        assert json.loads(call.stdout) == {"device": "demo", "state": "idle"}
        viewer = (
            "--mqtt-user",
            "viewer",
            "--mqtt-password-file",
            password_file(tmp_path, "viewer"),
        )
        listed = statelink("fleet", "--broker", tls_broker.tls_url, *ca, *viewer, "--json")
        assert listed.returncode == 0, listed.stderr
        (pi1,) = json.loads(listed.stdout)["nodes"]
        assert (pi1["node"], pi1["online"], pi1["devices"]) == ("pi1", True, {"demo": "idle"})
    finally:
        assert node.stop() == 0


def config_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_the_docs_show_the_shipped_config() -> None:
    """docs/fleet.md quotes deploy/mosquitto/ (without the comments) as it is."""
    guide = (ROOT / "docs" / "fleet.md").read_text()
    start = guide.index("### The broker's configuration")
    conf, acl = re.findall(r"```text\n(.*?)```", guide[start:], re.DOTALL)[:2]
    assert config_lines(conf) == config_lines(SHIPPED_CONF.read_text())
    assert config_lines(acl) == config_lines(SHIPPED_ACL.read_text())


def test_every_test_the_docs_name_exists() -> None:
    """docs/fleet.md backs each security claim with a test name in brackets: they exist."""
    named = set(re.findall(r"`(test_[a-z0-9_]+)`", (ROOT / "docs" / "fleet.md").read_text()))
    assert len(named) >= 8
    missing = [name for name in sorted(named) if name not in globals()]
    assert missing == []
