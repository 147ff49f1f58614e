"""How to reach a broker: credentials, TLS, the topic prefix. One :class:`MqttOptions`, built by
the CLI (:func:`controller.cli.common.mqtt_options`) or by Python users directly."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from statemachines.addresses import DEFAULT_TOPIC_PREFIX, check_topic_prefix

#: the environment variable holding the broker password when no file is given
PASSWORD_ENV = "STATELINK_MQTT_PASSWORD"  # noqa: S105 - a variable's name, not a password


@dataclass(frozen=True)
class MqttOptions:
    """``user``/``password``: the broker login (none: anonymous). ``tls_ca``: the CA bundle
    that verifies an ``mqtts://`` broker (None: the system CAs). ``topic_prefix``: the first
    level(s) of every topic (docs/fleet.md). ``keepalive``: seconds; a node that goes silent is
    declared offline by the broker after about 1.5x this. ``connect_timeout``: seconds a
    blocking connect waits for the broker's CONNACK."""

    user: str | None = None
    password: str | None = field(default=None, repr=False)
    tls_ca: str | None = None
    topic_prefix: str = DEFAULT_TOPIC_PREFIX
    keepalive: int = 10
    connect_timeout: float = 5.0

    def __post_init__(self) -> None:
        check_topic_prefix(self.topic_prefix)
        if self.password is not None and self.user is None:
            raise ValueError("a broker password needs a user (--mqtt-user)")


def read_password(path: str | os.PathLike[str] | None) -> str | None:
    """The broker password: the first line of ``path``, else ``$STATELINK_MQTT_PASSWORD``,
    else None. Raises ValueError (what to do) for an unreadable or empty file."""
    if path is None:
        return os.environ.get(PASSWORD_ENV) or None
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read the MQTT password file {path}: {exc.strerror or exc}")
    password = text.splitlines()[0].strip() if text.strip() else ""
    if not password:
        raise ValueError(f"the MQTT password file {path} is empty")
    return password
