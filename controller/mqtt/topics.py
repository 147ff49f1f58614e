"""The topics of a fleet, under a prefix (default ``statelink``); docs/fleet.md lists them.

=================================  ==========================================================
``P/NODE/rpc``                     requests to NODE (QoS 1, Message Expiry = the timeout)
``P/NODE/status``                  retained ``{"online": true|false, ...}`` (Will: offline)
``P/NODE/state/DEVICE``            retained current state of DEVICE (``device.state`` params)
``P/NODE/discover``                retained ``rpc.discover`` document
``P/NODE/event/METHOD``            other notifications of NODE (QoS 0)
``P/_reply/CONTROLLER``            replies (and ``rpc.progress``) for one controller
=================================  ==========================================================

Node names never start with ``_`` (:func:`statemachines.addresses.check_node_name`), so
``_reply`` cannot clash with a node.
"""

from __future__ import annotations

from dataclasses import dataclass

from statemachines.addresses import DEFAULT_TOPIC_PREFIX, check_topic_prefix

RPC = "rpc"
STATUS = "status"
STATE = "state"
DISCOVER = "discover"
EVENT = "event"
REPLY = "_reply"


@dataclass(frozen=True)
class Topics:
    """Builds and parses the topic names of one prefix."""

    prefix: str = DEFAULT_TOPIC_PREFIX

    def __post_init__(self) -> None:
        check_topic_prefix(self.prefix)

    def rpc(self, node: str) -> str:
        return f"{self.prefix}/{node}/{RPC}"

    def status(self, node: str = "+") -> str:
        """``node="+"``: the filter of every node's status."""
        return f"{self.prefix}/{node}/{STATUS}"

    def state(self, node: str, device: str = "+") -> str:
        """``device="+"``: the filter of every device of ``node``."""
        return f"{self.prefix}/{node}/{STATE}/{device}"

    def discover(self, node: str) -> str:
        return f"{self.prefix}/{node}/{DISCOVER}"

    def event(self, node: str, method: str) -> str:
        return f"{self.prefix}/{node}/{EVENT}/{method}"

    def reply(self, controller: str) -> str:
        return f"{self.prefix}/{REPLY}/{controller}"

    def parse(self, topic: str) -> tuple[str, str, str] | None:
        """``"P/NODE/KIND[/REST]"`` -> ``(NODE, KIND, REST)`` (REST ``""`` when absent); None for
        a topic outside the prefix."""
        head = self.prefix + "/"
        if not topic.startswith(head):
            return None
        node, _, rest = topic[len(head) :].partition("/")
        kind, _, tail = rest.partition("/")
        if not node or not kind:
            return None
        return node, kind, tail
