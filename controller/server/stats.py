"""The ``rpc.stats`` counters of one server (loop thread only)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..protocol import DEFAULT_MAX_BATCH, DEFAULT_MAX_DEPTH, DEFAULT_MAX_FRAME


@dataclass
class Limits:
    """Every bound the server enforces; each has a documented default (docs/reliability.md)."""

    max_connections: int = 1024
    max_inflight: int = 256  #: requests in flight on one connection
    max_queue: int = 1024  #: jobs waiting for a worker thread
    max_frame: int = DEFAULT_MAX_FRAME
    max_batch: int = DEFAULT_MAX_BATCH
    max_depth: int = DEFAULT_MAX_DEPTH
    idle_timeout: float = 300.0  #: seconds without traffic or work before a connection is closed
    handshake_timeout: float = 10.0  #: seconds to authenticate, when a secret is set
    frame_timeout: float = 30.0  #: seconds to finish a line once its first byte arrived
    max_outgoing: int = 4 << 20  #: bytes queued to a client that does not read, then close
    max_auth_failures: int = 3
    max_subscriptions: int = 64


class Stats:
    """Counters for ``rpc.stats``; they survive a restart of the server. Loop thread only."""

    def __init__(self) -> None:
        self.connections_total = 0
        self.requests_total = 0
        self.replies_total = 0
        self.notifications_total = 0
        self.late_outcomes = 0
        self.errors_by_code: dict[int, int] = {}
        self.closed_by_reason: dict[str, int] = {}

    def count_error(self, code: int) -> None:
        self.errors_by_code[code] = self.errors_by_code.get(code, 0) + 1

    def count_close(self, reason: str) -> None:
        self.closed_by_reason[reason] = self.closed_by_reason.get(reason, 0) + 1

    def snapshot(
        self,
        *,
        connections: int,
        inflight: int,
        worker_queue: int,
        workers: int,
        uptime: float,
        limits: Limits,
    ) -> dict[str, Any]:
        """The ``rpc.stats`` reply: these counters plus the live figures given."""
        return {
            "connections": connections,
            "connections_total": self.connections_total,
            "requests_in_flight": inflight,
            "requests_total": self.requests_total,
            "replies_total": self.replies_total,
            "notifications_total": self.notifications_total,
            "errors_by_code": {str(code): n for code, n in sorted(self.errors_by_code.items())},
            "closed_by_reason": dict(self.closed_by_reason),
            "late_outcomes": self.late_outcomes,
            "worker_queue": worker_queue,
            "workers": workers,
            "uptime": round(uptime, 3),
            "limits": asdict(limits),
        }
