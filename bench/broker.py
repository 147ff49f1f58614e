"""A Mosquitto broker process for benchmarks and tests: loopback, a free port, a generated
config (``set_tcp_nodelay true``: request/response over MQTT stalls on delayed ACKs without it),
persistence in a directory of its own. tests/mosquitto.py wraps it for pytest."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

#: seconds a start or a stop may take
STARTUP = 20.0


def mosquitto_binary() -> str | None:
    """The broker executable (Debian installs it in /usr/sbin, often not on a user's PATH)."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Mosquitto:
    """One broker process on ``127.0.0.1:port``. ``extra`` lines are appended to the generated
    config (password_file, acl_file, TLS ...). Persistence is on (sessions and retained messages
    survive :meth:`restart`, which keeps the port)."""

    def __init__(
        self,
        directory: Path | None = None,
        extra: str = "",
        *,
        anonymous: bool = True,
        binary: str | None = None,
    ) -> None:
        found = binary or mosquitto_binary()
        if found is None:
            raise FileNotFoundError("mosquitto is not installed (apt-get install -y mosquitto)")
        self.binary = found
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
            f"log_dest file {self.log}\n"
            # as root, mosquitto drops to the user "mosquitto", who cannot read or write this
            # private directory (log, persistence, password and ACL files): stay root
            f"{'user root' if os.geteuid() == 0 else ''}\n" + extra
        )
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def start(self) -> Mosquitto:
        """Start the broker; returns once it accepts TCP connections (at most STARTUP s)."""
        self.process = process = subprocess.Popen(
            [self.binary, "-c", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + STARTUP
        pause = threading.Event()
        while True:
            if process.poll() is not None:
                err = process.stderr.read().decode() if process.stderr else ""
                raise RuntimeError(f"mosquitto exited ({process.returncode}): {err}{self.tail()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(f"mosquitto did not listen on {self.port} in {STARTUP} s")
                pause.wait(0.01)

    def stop(self) -> None:
        """SIGTERM (the broker saves its sessions), wait for the exit."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STARTUP)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STARTUP)
        self._close()

    def kill(self) -> None:
        """SIGKILL: nothing saved since the last autosave."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(STARTUP)
        self._close()

    def restart(self) -> None:
        self.stop()
        self.start()

    def rss_kb(self) -> int:
        """The broker's resident memory (KiB)."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

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
