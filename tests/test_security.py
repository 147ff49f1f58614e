"""Security contract (docs/security.md): shared-secret HMAC auth, TLS, loopback-only by default,
callbacks only to the requesting peer, no eval/pickle/unsafe YAML/shell on input.

Every socket is on 127.0.0.x. The ``--host 0.0.0.0`` tests never bind: the refusal happens
before binding, and where the refusal must *not* happen, ``CommandServer.start`` is replaced
by a stub that records the host and binds nothing.
"""

from __future__ import annotations

import argparse
import errno
import hmac
import inspect
import json
import re
import ssl
import threading
from pathlib import Path
from typing import Any

import pytest
from reliability_helpers import (
    HOST,
    REPO,
    ChildServer,
    Recorder,
    accept_within,
    client_tls,
    error_code,
    listener,
    make_cert,
    ping_ok,
    serve,
    server_tls,
    stats,
)
from support import WAIT, wait_until
from support import RawConnection as Raw

from controller import CallbackListener, Client, ConnectionLostError, UnauthorizedError, auth, cli
from controller.server import CommandServer
from statemachines import errorkinds as ek
from statemachines.errorkinds import UNAUTHORIZED

SECRET = "correct-horse-battery-staple-7f3a9c"


def hello(raw: Raw, **params: Any) -> dict[str, Any]:
    return raw.call("rpc.hello", {"client": "test", **params})


def authenticate(raw: Raw, secret: str = SECRET, nonce: str = "n" * 32) -> dict[str, Any]:
    """The two-step handshake by hand; returns the second reply."""
    first = hello(raw, nonce=nonce)["result"]
    response = auth.digest(secret.encode(), "client", first["challenge"], nonce)
    return raw.call("rpc.hello", {"response": response})


# -- shared secret ---------------------------------------------------------------------------
def test_every_method_needs_authentication_first_then_the_connection_is_closed():
    with serve(secret=SECRET) as server, Raw(server.address) as raw:
        for method in ("rpc.ping", "rpc.discover", "echo"):
            reply = raw.call(method)
            assert error_code(reply) == UNAUTHORIZED, reply
            assert "rpc.hello" in reply["error"]["message"]
        assert raw.closed(WAIT), "closed after max_auth_failures (3) failures"
        snapshot = stats(server.address, secret=SECRET)
        assert snapshot["closed_by_reason"].get("auth_failures") == 1
        assert snapshot["errors_by_code"][str(UNAUTHORIZED)] == 3
        # everyone else is still served
        assert ping_ok(server.address, secret=SECRET)


def test_a_batch_before_authentication_is_refused_item_by_item():
    with serve(secret=SECRET) as server, Raw(server.address) as raw:
        raw.send_json(
            [{"jsonrpc": "2.0", "id": i, "method": "echo", "params": [i]} for i in range(2)]
        )
        replies = raw.json()
        assert [error_code(r) for r in replies] == [UNAUTHORIZED, UNAUTHORIZED]


def test_the_handshake_authenticates_and_the_wrong_secret_is_refused():
    with serve(secret=SECRET) as server:
        with Client(server.address, secret=SECRET, reconnect=False) as client:
            assert client.server_info["authenticated"] is True
            assert client.server_info["auth"] == "hmac-sha256"
            assert client.call("add", [2, 3]) == 5
        with pytest.raises(UnauthorizedError, match="holds a different secret"):
            # the client checks the server's proof first: a wrong secret never gets further
            Client(server.address, secret="wrong", reconnect=False)
        with pytest.raises(UnauthorizedError, match="requires the shared secret"):
            Client(server.address, reconnect=False)
        with Raw(server.address) as raw:
            for _ in range(3):
                assert error_code(authenticate(raw, secret="wrong")) == UNAUTHORIZED
            assert raw.closed(WAIT)


def test_a_response_without_a_challenge_or_replayed_is_refused():
    with serve(secret=SECRET) as server:
        nonce = "a" * 32
        with Raw(server.address) as first:
            challenge = hello(first, nonce=nonce)["result"]["challenge"]
            good = auth.digest(SECRET.encode(), "client", challenge, nonce)
            assert first.call("rpc.hello", {"response": good})["result"]["authenticated"]
        with Raw(server.address) as raw:
            # no challenge asked on this connection
            assert error_code(raw.call("rpc.hello", {"response": good})) == UNAUTHORIZED
            # a new challenge each time: yesterday's answer is worth nothing
            new = hello(raw, nonce=nonce)["result"]["challenge"]
            assert new != challenge
            assert error_code(raw.call("rpc.hello", {"response": good})) == UNAUTHORIZED


def test_the_client_refuses_a_server_that_cannot_prove_the_secret():
    """Mutual: a fake server without the secret cannot make the client send anything."""
    with listener() as sock:
        got: list[bytes] = []

        def fake_server() -> None:
            conn = accept_within(sock, WAIT)
            assert conn is not None
            with conn:
                conn.settimeout(WAIT)
                line = conn.makefile("rb").readline()
                got.append(line)
                request = json.loads(line)
                conn.sendall(
                    json.dumps(
                        {
                            "jsonrpc": "2.0",
                            "id": request["id"],
                            "result": {
                                "auth": "hmac-sha256",
                                "authenticated": False,
                                "challenge": "c" * 32,
                                "proof": "0" * 64,
                            },
                        }
                    ).encode()
                    + b"\n"
                )
                got.append(conn.recv(65536))  # b"" once the client gives up

        thread = threading.Thread(target=fake_server, daemon=True)
        thread.start()
        with pytest.raises(UnauthorizedError, match="holds a different secret"):
            Client(sock.getsockname()[:2], secret=SECRET, reconnect=False)
        thread.join(WAIT)
        assert got[1] == b"", "the client sent nothing after the bad proof"


def test_a_client_with_a_secret_refuses_a_server_that_does_not_authenticate():
    """A server without a secret (or an impostor) answers rpc.hello with ``auth`` null: it
    never proves it holds the secret, so a client that has one must not go on."""
    with serve() as server:
        with pytest.raises(UnauthorizedError, match="did not ask for authentication") as info:
            Client(server.address, secret=SECRET, reconnect=False)
        message = str(info.value)
        assert f"{HOST}:{server.address[1]}" in message
        assert "--secret-file" in message and "drop the client secret" in message
        assert info.value.code == UNAUTHORIZED
        # the client closed the connection having sent nothing but its rpc.hello
        wait_until(lambda: not server.connections, what="the connection to close")
        assert server.stats.requests_total == 1
        # without a secret, the same server is fine
        with Client(server.address, reconnect=False) as client:
            assert client.call("echo", ["ok"]) == "ok"


def test_the_secret_never_crosses_the_wire():
    with serve(secret=SECRET) as server, Recorder(server.address) as proxy:
        with Client(proxy.address, secret=SECRET, reconnect=False) as client:
            assert client.call("echo", ["hello"]) == "hello"
        with Raw(proxy.address) as raw:
            authenticate(raw, secret="a-wrong-secret")
        proxy.close()
        wire = bytes(proxy.up) + bytes(proxy.down)
        assert b'"response"' in proxy.up, "the handshake went through the proxy"
        for form in (SECRET.encode(), SECRET.encode().hex().encode(), b"a-wrong-secret"):
            assert form not in wire


def test_the_hmac_is_compared_in_constant_time(monkeypatch):
    calls: list[tuple[Any, Any]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    with (
        serve(secret=SECRET) as server,
        Client(server.address, secret=SECRET, reconnect=False) as client,
    ):
        assert client.call("rpc.ping") == "pong"
    assert len(calls) >= 2  # the client checks the proof, the server checks the response
    source = inspect.getsource(auth.verify)
    assert "compare_digest" in source and "==" not in source


def test_the_secret_comes_from_a_file_or_the_environment(tmp_path, monkeypatch):
    path = tmp_path / "secret"
    path.write_text(SECRET + "\n")
    monkeypatch.delenv(auth.SECRET_ENV, raising=False)
    assert auth.load_secret(path) == SECRET.encode()
    assert auth.load_secret() is None
    monkeypatch.setenv(auth.SECRET_ENV, "from-the-environment")
    assert auth.load_secret() == b"from-the-environment"
    assert auth.load_secret(path) == SECRET.encode()  # the file wins
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        auth.load_secret(empty)


def test_a_secret_shorter_than_16_bytes_is_refused(tmp_path, monkeypatch, capsys):
    short = tmp_path / "short"
    short.write_text("s3cret\n")
    with pytest.raises(ValueError, match=r"too short \(6 bytes\).*at least 16 bytes"):
        auth.load_secret(short)
    monkeypatch.setenv(auth.SECRET_ENV, "fifteen-bytes!!")
    with pytest.raises(ValueError, match=r"\$STATELINK_SECRET is too short \(15 bytes\)"):
        auth.load_secret()
    monkeypatch.setenv(auth.SECRET_ENV, "sixteen-bytes!!!")
    assert auth.load_secret() == b"sixteen-bytes!!!"
    assert cli.main(["call", "--secret-file", str(short), "rpc.ping"]) == 2
    err = capsys.readouterr().err
    assert "too short" in err and "secrets.token_hex" in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["serve", "call", "run", "check"])
def test_no_command_line_option_takes_the_secret_itself(command):
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    options = {opt for action in sub.choices[command]._actions for opt in action.option_strings}
    assert "--secret-file" in options
    # a password or token is read from a file or the environment (--mqtt-password-file)
    assert not {o for o in options if re.search(r"secret$|password$|token", o)}


# -- callbacks -------------------------------------------------------------------------------
def test_callback_replies_go_only_to_the_requesting_peers_own_address():
    """Two listeners on the same port: 127.0.0.2 (the peer) and 127.0.0.1 (a decoy that a
    ``callback_host`` param names). Only the peer's own address gets the reply."""
    peer = listener("127.0.0.2")
    port = peer.getsockname()[1]
    try:
        decoy = listener(HOST, port)
    except OSError as exc:  # the same port taken on 127.0.0.1: rare, not a failure
        peer.close()
        pytest.skip(f"port {port} busy on {HOST}: {exc}")
    with peer, decoy, serve() as server, Raw(server.address, source="127.0.0.2") as raw:
        for sock in (peer, decoy):
            sock.setblocking(False)
        reply = hello(raw, callback_port=port, callback_host=HOST)["result"]
        assert reply["callback"] == {"host": "127.0.0.2", "port": port}
        raw.request("echo", ["via callback"], id=7)
        conn = accept_within(peer, WAIT)
        assert conn is not None, "the reply came back to the peer's own address"
        with conn:
            conn.settimeout(WAIT)
            assert json.loads(conn.makefile("rb").readline()) == {
                "jsonrpc": "2.0",
                "id": 7,
                "result": "via callback",
            }
        with pytest.raises(BlockingIOError):
            decoy.accept()  # nobody ever connected to the decoy


def test_an_unauthenticated_peer_gets_no_callback_connection():
    with listener() as sock, serve(secret=SECRET) as server, Raw(server.address) as raw:
        sock.setblocking(False)
        assert (
            "callback" not in hello(raw, callback_port=sock.getsockname()[1], nonce="x")["result"]
        )
        # the error comes back on the request connection: no link was made
        assert error_code(raw.call("rpc.ping")) == UNAUTHORIZED
        with pytest.raises(BlockingIOError):
            sock.accept()


def test_the_client_callback_listener_receives_replies_after_authentication():
    with (
        serve(secret=SECRET) as server,
        CallbackListener() as callbacks,
        Client(
            server.address, secret=SECRET, reconnect=False, callback_listener=callbacks
        ) as client,
    ):
        assert client.server_info["callback"]["host"] == HOST
        assert client.call("echo", ["back"]) == "back"
        assert callbacks.received >= 1


# -- TLS -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cert(tmp_path_factory) -> tuple[Path, Path]:
    return make_cert(tmp_path_factory.mktemp("tls"))


def test_tls_with_ca_verification(cert):
    crt, key = cert
    with serve(ssl=server_tls(crt, key), secret=SECRET) as server:
        with Client(server.address, ssl=client_tls(crt), secret=SECRET, reconnect=False) as client:
            assert client.call("echo", ["over tls"]) == "over tls"
        with pytest.raises(ssl.SSLCertVerificationError):
            Client(server.address, ssl=client_tls(None), secret=SECRET, reconnect=False)
        with pytest.raises(ssl.SSLCertVerificationError):
            Client(
                server.address,
                ssl=client_tls(crt),
                server_hostname="not-this-host",
                secret=SECRET,
                reconnect=False,
            )
        with pytest.raises((ConnectionLostError, OSError)):
            Client(server.address, secret=SECRET, reconnect=False, connect_timeout=3)
        assert ping_ok(server.address, ssl=client_tls(crt), secret=SECRET)


def test_tls_traffic_is_encrypted(cert):
    crt, key = cert
    with serve(ssl=server_tls(crt, key)) as server, Recorder(server.address) as proxy:
        with Client(
            proxy.address, ssl=client_tls(crt), server_hostname="localhost", reconnect=False
        ) as client:
            assert client.call("echo", ["plaintext-marker"]) == "plaintext-marker"
        proxy.close()
        assert proxy.up and proxy.down
        for marker in (b"rpc.hello", b"plaintext-marker", b"jsonrpc"):
            assert marker not in proxy.up and marker not in proxy.down


def test_a_client_that_never_does_the_tls_handshake_is_dropped(cert):
    from controller import Limits

    crt, key = cert
    with (
        serve(ssl=server_tls(crt, key), limits=Limits(handshake_timeout=0.5)) as server,
        Raw(server.address) as silent,
    ):
        assert silent.closed(WAIT), "closed after handshake_timeout"
        assert ping_ok(server.address, ssl=client_tls(crt))


# -- statelink serve / call ------------------------------------------------------------------
@pytest.fixture
def no_bind(monkeypatch) -> list[str]:
    """Replace ``CommandServer.start``: record the host, bind nothing, fail like a busy port."""
    hosts: list[str] = []

    def start(self: CommandServer) -> CommandServer:
        hosts.append(self.host)
        raise OSError(errno.EADDRNOTAVAIL, "test stub: not binding")

    monkeypatch.setattr(CommandServer, "start", start)
    monkeypatch.delenv(auth.SECRET_ENV, raising=False)
    return hosts


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "pi.local"])
def test_serve_refuses_a_non_loopback_address_without_a_secret(host, no_bind, capsys):
    assert cli.main(["serve", "--host", host, "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "refusing to listen" in err and "without a secret" in err and "--insecure" in err
    assert no_bind == [], "refused before binding"


def test_serve_passes_the_refusal_with_insecure_or_a_secret(tmp_path, no_bind, monkeypatch, capsys):
    secret = tmp_path / "secret"
    secret.write_text(SECRET)
    assert cli.main(["serve", "--host", "0.0.0.0", "--port", "0", "--insecure"]) == 1
    assert (
        cli.main(["serve", "--host", "0.0.0.0", "--port", "0", "--secret-file", str(secret)]) == 1
    )
    monkeypatch.setenv(auth.SECRET_ENV, SECRET)
    assert cli.main(["serve", "--host", "0.0.0.0", "--port", "0"]) == 1
    assert no_bind == ["0.0.0.0"] * 3  # got past the refusal; the stub bound nothing
    assert "refusing" not in capsys.readouterr().err


def test_serve_on_loopback_needs_no_secret_and_call_works(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(auth.SECRET_ENV, raising=False)
    with ChildServer("cli", ["serve", "--host", HOST, "--port", "0"], tmp_path / "log") as child:
        address = f"{child.address[0]}:{child.address[1]}"
        assert cli.main(["call", "--server", address, "rpc.ping"]) == 0
        assert json.loads(capsys.readouterr().out) == "pong"


def test_serve_and_call_with_a_secret_file_and_tls(tmp_path, cert, capsys, monkeypatch):
    crt, key = cert
    secret = tmp_path / "secret"
    secret.write_text(SECRET + "\n")
    monkeypatch.delenv(auth.SECRET_ENV, raising=False)
    args = [
        "serve",
        "--host",
        HOST,
        "--port",
        "0",
        "--secret-file",
        str(secret),
        "--tls-cert",
        str(crt),
        "--tls-key",
        str(key),
    ]
    with ChildServer("cli", args, tmp_path / "log") as child:
        cmdline = Path(f"/proc/{child.pid}/cmdline").read_bytes()
        assert SECRET.encode() not in cmdline
        address = f"{child.address[0]}:{child.address[1]}"
        tls = ["--tls-ca", str(crt)]
        assert (
            cli.main(["call", "--server", address, "--secret-file", str(secret), *tls, "rpc.ping"])
            == 0
        )
        assert json.loads(capsys.readouterr().out) == "pong"
        monkeypatch.setenv(auth.SECRET_ENV, SECRET)
        assert cli.main(["call", "--server", address, *tls, "rpc.ping"]) == 0
        capsys.readouterr()
        monkeypatch.delenv(auth.SECRET_ENV)
        assert cli.main(["call", "--server", address, *tls, "rpc.ping"]) == 1
        assert str(ek.UNAUTHORIZED) in capsys.readouterr().err
        assert (
            cli.main(
                ["call", "--server", address, "--secret-file", str(secret), "--tls", "rpc.ping"]
            )
            == 3
        )  # system CAs do not know the self-signed cert
        assert "certificate verify failed" in capsys.readouterr().err
        assert child.alive()


def test_run_takes_the_secret_file_and_ca_too(tmp_path, monkeypatch):
    secret = tmp_path / "secret"
    secret.write_text(SECRET)
    monkeypatch.delenv(auth.SECRET_ENV, raising=False)
    args = cli.build_parser().parse_args(
        ["run", "wf.yaml", "--secret-file", str(secret), "--tls-ca", str(secret)]
    )
    assert cli.read_secret(args) == SECRET.encode()
    assert args.tls_ca == str(secret)


# -- no code from input ----------------------------------------------------------------------
FORBIDDEN = {
    r"(?<![.\w])eval\(": "eval()",
    r"(?<![.\w])exec\(": "exec()",
    r"\bpickle\b|\bmarshal\b|\bshelve\b": "pickle/marshal/shelve",
    r"shell\s*=\s*True": "shell=True",
    r"\bos\.system\(|\bos\.popen\(": "os.system/os.popen",
    r"yaml\.(unsafe_load|full_load)|UnsafeLoader|FullLoader|yaml\.Loader\b": "unsafe YAML loader",
    r"__import__\(": "__import__()",
}


def source_files() -> list[Path]:
    files = [
        p
        for top in ("controller", "statemachines", "config")
        for p in sorted((REPO / top).rglob("*.py"))
    ]
    assert len(files) > 10
    return files


def test_the_source_has_no_eval_pickle_shell_or_unsafe_yaml():
    found = []
    for path in source_files():
        text = path.read_text()
        for pattern, what in FORBIDDEN.items():
            for match in re.finditer(pattern, text):
                line = text.count("\n", 0, match.start()) + 1
                found.append(f"{path.relative_to(REPO)}:{line}: {what}")
    assert found == []


def test_every_yaml_load_uses_a_safe_loader():
    import importlib

    import yaml

    calls = 0
    for path in source_files():
        text = path.read_text()
        for match in re.finditer(r"yaml\.(load|load_all)\(([^)]*)\)", text):
            calls += 1
            loader = re.search(r"Loader\s*=\s*(\w+)", match.group(2))
            assert loader, f"{path}: yaml.{match.group(1)} without an explicit Loader"
            module = importlib.import_module(".".join(path.relative_to(REPO).with_suffix("").parts))
            assert issubclass(getattr(module, loader.group(1)), yaml.SafeLoader), path
    assert calls >= 1


def test_yaml_python_tags_are_refused(tmp_path):
    from statemachines.source import ConfigErrors, load_yaml

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(f"x: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigErrors):
        load_yaml(path)
    assert not marker.exists()


def test_wire_input_never_reaches_an_interpreter():
    """Method names and params from the wire are looked up, never evaluated."""
    with serve() as server, Client(server.address, reconnect=False) as client:
        for method in ("__import__('os').system('true')", "echo; rm -rf /", "rpc.stats()"):
            with pytest.raises(Exception, match="Method not found"):
                client.call(method)
        assert client.call("echo", ["__import__('os')"]) == "__import__('os')"
        wait_until(
            lambda: stats(server.address)["errors_by_code"].get(str(ek.METHOD_NOT_FOUND)) == 3
        )
