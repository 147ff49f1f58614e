"""A real Eclipse Mosquitto for the fleet tests (:class:`bench.broker.Mosquitto`): started per
test session (the ``broker`` fixture) or per test, for tests that restart, kill or configure it,
on a free loopback port from a generated config.

Without a ``mosquitto`` binary the MQTT tests are skipped, loudly (conftest prints a banner);
under ``CI=true`` a missing broker fails them instead (``.ci/run`` installs the Debian package).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench import broker
from bench.broker import free_port, mosquitto_binary

MISSING = (
    "mosquitto is not installed: the MQTT fleet tests are SKIPPED "
    "(install it: apt-get install -y mosquitto)"
)


def require_mosquitto() -> str:
    """The binary, or skip (a local run) / fail (``CI=true``) the calling test."""
    binary = mosquitto_binary()
    if binary is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true and " + MISSING.replace("SKIPPED", "NOT RUN"), pytrace=False)
        pytest.skip(MISSING)
    return binary


class Mosquitto(broker.Mosquitto):
    """:class:`bench.broker.Mosquitto` that skips or fails the test when mosquitto is missing."""

    def __init__(
        self, directory: Path | None = None, extra: str = "", *, anonymous: bool = True
    ) -> None:
        super().__init__(directory, extra, anonymous=anonymous, binary=require_mosquitto())


__all__ = ["MISSING", "Mosquitto", "free_port", "mosquitto_binary", "require_mosquitto"]
