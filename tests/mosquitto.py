"""A real Eclipse Mosquitto for the fleet tests: started per test session (or per test, for
tests that restart or kill it) on a free loopback port, from a generated config.

Without a ``mosquitto`` binary the MQTT tests are skipped, loudly (conftest prints a banner);
under ``CI=true`` a missing broker fails them instead (``.ci/run`` installs the Debian package).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
from support import WAIT, wait_until

MISSING = (
    "mosquitto is not installed: the MQTT fleet tests are SKIPPED "
    "(install it: apt-get install -y mosquitto)"
)


def mosquitto_binary() -> str | None:
    """The broker executable (Debian installs it in /usr/sbin, often not on a user's PATH)."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def require_mosquitto() -> str:
    """The binary, or skip (a local run) / fail (``CI=true``) the calling test."""
    binary = mosquitto_binary()
    if binary is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true and " + MISSING.replace("SKIPPED", "NOT RUN"), pytrace=False)
        pytest.skip(MISSING)
    return binary


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Mosquitto:
    """One broker process on ``127.0.0.1:port``. ``extra`` lines are appended to the generated
    config (password_file, acl_file, TLS ...); ``listener`` False leaves the listener line to
    ``extra`` (e.g. a TLS listener). Persistence is on (sessions and retained messages survive
    :meth:`restart`), in a directory of its own."""

    def __init__(
        self, directory: Path | None = None, extra: str = "", *, anonymous: bool = True
    ) -> None:
        self.binary = require_mosquitto()
        self.directory = Path(directory or tempfile.mkdtemp(prefix="mosquitto-"))
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.config = self.directory / "mosquitto.conf"
        self.log = self.directory / "mosquitto.log"
        self.config.write_text(
            f"listener {self.port} 127.0.0.1\n"
            f"allow_anonymous {'true' if anonymous else 'false'}\n"
            "set_tcp_nodelay true\n"
            "persistence true\n"
            f"persistence_location {self.directory}/\n"
            "max_queued_messages 10000\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
            f"log_dest file {self.log}\n" + extra
        )
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> Mosquitto:
        """Start the broker; returns once it accepts TCP connections (bounded wait)."""
        self.process = subprocess.Popen(
            [self.binary, "-c", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        process = self.process

        def accepting() -> bool:
            if process.poll() is not None:
                err = process.stderr.read().decode() if process.stderr else ""
                raise RuntimeError(f"mosquitto exited ({process.returncode}): {err}{self.tail()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            except OSError:
                return False
            return True

        wait_until(accepting, what=f"mosquitto on port {self.port}")
        return self

    def stop(self) -> None:
        """SIGTERM (the broker saves its sessions), wait for the exit."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(WAIT)
        self._close()

    def kill(self) -> None:
        """SIGKILL: nothing saved since the last autosave."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(WAIT)
        self._close()

    def restart(self) -> None:
        self.stop()
        self.start()

    def _close(self) -> None:
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text().splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


__all__ = ["MISSING", "Mosquitto", "free_port", "mosquitto_binary", "require_mosquitto"]
