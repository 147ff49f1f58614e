"""Workflows over a fleet: real ``statelink serve --broker`` nodes, a real Mosquitto, the
in-process :class:`WorkflowRunner` or ``statelink run``/``resume``. The same workflows as over
TCP, only the addresses changed; a node killed mid-command is seen at once (its Will: kind
``offline``), a restarted one gets the retry with the same key (the handler runs once), a
broker restart is survived."""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from mosquitto import Mosquitto
from reliability_helpers import executions, write_counting_device
from support import WAIT, ServeProcess, journal_entries, statelink, wait_until

from controller.mqtt.client import MqttClient
from controller.runner import RunHandle, WorkflowRunner
from statemachines.workflow import parse_workflow


class Node:
    """One fleet node: ``statelink serve --broker URL --node NAME`` with the counting device
    (its handlers log to ``directory/executions.jsonl``) and a state directory of its own that
    survives restarts (its idempotency keys)."""

    def __init__(self, broker: Any, directory: Path, name: str | None = None) -> None:
        self.broker = broker
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.name = name or f"pi{uuid.uuid4().hex[:8]}"
        self.device = write_counting_device(directory)
        self.process: ServeProcess | None = None

    @property
    def url(self) -> str:
        return f"{self.broker.url}/{self.name}"

    def start(self) -> Node:
        self.process = ServeProcess(
            "--broker",
            self.broker.url,
            "--node",
            self.name,
            "--device",
            str(self.device),
            "--state-dir",
            str(self.directory / "state"),
            port=None,
        )
        return self

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def executions(self, **match: Any) -> list[dict[str, Any]]:
        return executions(self.directory, **match)


@pytest.fixture
def nodes(broker: Any, tmp_path: Path) -> Iterator[Callable[..., Node]]:
    made: list[Node] = []

    def make(name: str = "node", *, on: Any = None) -> Node:
        node = Node(on or broker, tmp_path / f"{name}-{len(made)}")
        made.append(node)
        return node.start()

    yield make
    for node in made:
        node.kill()


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[WorkflowRunner]:
    with WorkflowRunner(state_dir=tmp_path / "controller") as workflow_runner:
        yield workflow_runner


def start(runner: WorkflowRunner, text: str, tmp_path: Path, **servers: str) -> RunHandle:
    """Start the workflow ``text`` with ``{name}`` placeholders filled by ``servers``."""
    spec = parse_workflow(text.format(**servers), str(tmp_path / "wf.yaml"))
    return runner.start(spec)


class StatusWatch:
    """A raw subscriber of a node's status: when did its Will (offline) arrive?"""

    def __init__(self, broker: Any, node: str) -> None:
        self.offline_at: queue.Queue[float] = queue.Queue()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        subscribed = threading.Event()

        def on_message(_c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
            if msg.payload and json.loads(msg.payload).get("online") is False:
                self.offline_at.put(time.time())

        self.client.on_message = on_message
        self.client.on_subscribe = lambda *args: subscribed.set()
        self.client.on_connect = lambda c, *args: c.subscribe(f"statelink/{node}/status", qos=1)
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        assert subscribed.wait(WAIT)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


TWO_NODES = """\
name: two
servers: {{left: "{left}", right: "{right}"}}
command_timeout: 20s
initial: first
states:
  first: {{server: left, command: counter.work, params: {{tag: left}}, next: second}}
  second: {{server: right, command: counter.work, params: {{tag: right}}, save: r, next: done}}
  done: {{final: success}}
"""


def test_a_workflow_drives_two_nodes_through_the_broker(nodes, runner, tmp_path):
    left, right = nodes("left"), nodes("right")
    handle = start(runner, TWO_NODES, tmp_path, left=left.url, right=right.url)
    assert handle.wait(WAIT) == "success", handle.history
    assert [e["tag"] for e in left.executions()] == ["left"]
    assert [e["tag"] for e in right.executions()] == ["right"]
    assert handle.context["r"]["tag"] == "right"
    assert handle.journal_path is not None
    start_entry = journal_entries(handle.journal_path)[0]
    assert start_entry["servers"] == {"left": left.url, "right": right.url}


def test_statelink_run_takes_mqtt_server_addresses(nodes, tmp_path, broker):
    left, right = nodes("left"), nodes("right")
    workflow = tmp_path / "two.yaml"
    workflow.write_text(TWO_NODES.format(left="127.0.0.1:1", right="127.0.0.1:2"))
    done = statelink(
        "run",
        str(workflow),
        "--plain",
        "--server",
        f"left={left.url}",
        "--server",
        f"right={right.url}",
        "--state-dir",
        str(tmp_path / "state"),
    )
    assert done.returncode == 0, done.stderr + done.stdout
    assert len(left.executions()) == 1 and len(right.executions()) == 1


KILLED = """\
name: killed
servers: {{pi: "{pi}"}}
initial: work
states:
  work:
    command: counter.work
    params: {{seconds: 30, tag: long}}
    timeout: 60s
    retry: {{attempts: 400, interval: 50ms, backoff: 1, on: [offline]}}
    next: done
    on_error: {{interrupted: recovered}}
  done: {{final: success}}
  recovered: {{final: success}}
"""


def test_a_node_killed_mid_command_is_offline_at_once_and_its_retry_runs_nothing_twice(
    nodes, runner, tmp_path, broker
):
    """kill -9 mid-command: the Will fails the command with ``offline`` within a second (not
    after its 60 s timeout); the retries fail at once while the node is down; the restarted
    node answers the retry (same key) with ``interrupted``: the handler ran once."""
    node = nodes("pi")
    watch = StatusWatch(broker, node.name)
    try:
        handle = start(runner, KILLED, tmp_path, pi=node.url)
        wait_until(lambda: node.executions(), what="the handler to start")
        node.kill()
        will_at = watch.offline_at.get(timeout=WAIT)
        wait_until(
            lambda: any(e.get("error", {}).get("kind") == "offline" for e in handle.history),
            what="the offline error",
        )
        first = next(e for e in handle.history if e.get("error", {}).get("kind") == "offline")
        assert first["at"] - will_at < 1.0  # seen at once, from the Will
        assert handle.outcome is None  # retrying while the node is down
        node.start()
        assert handle.wait(WAIT) == "success"
        assert handle.state == "recovered", handle.history
        assert len(node.executions(tag="long")) == 1  # never twice
    finally:
        watch.close()


RETRIED = """\
name: retried
servers: {{pi: "{pi}"}}
initial: work
states:
  work:
    command: counter.work
    params: {{tag: once}}
    timeout: 10s
    retry: {{attempts: 600, interval: 50ms, backoff: 1, on: [offline]}}
    next: done
  done: {{final: success}}
"""


def test_a_command_to_a_stopped_node_is_retried_until_it_is_back(nodes, runner, tmp_path):
    node = nodes("pi")
    node.stop()  # a clean stop: its status says offline ("stopped")
    handle = start(runner, RETRIED, tmp_path, pi=node.url)
    wait_until(
        lambda: sum(e.get("error", {}).get("kind") == "offline" for e in handle.history) >= 2,
        what="offline retries",
    )
    assert not node.executions()  # nothing was sent to the node while it was offline
    node.start()
    assert handle.wait(WAIT) == "success", handle.history
    assert len(node.executions(tag="once")) == 1


BROKER_RESTART = """\
name: survives
servers: {{pi: "{pi}"}}
initial: work
states:
  work:
    command: counter.work
    params: {{seconds: 1.0, tag: work}}
    timeout: 30s
    retry: {{attempts: 400, interval: 100ms, backoff: 1, on: [offline, timeout, connection_lost]}}
    next: after
  after:
    command: counter.work
    params: {{tag: after}}
    timeout: 30s
    retry: {{attempts: 400, interval: 100ms, backoff: 1, on: [offline, timeout, connection_lost]}}
    next: done
  done: {{final: success}}
"""


def test_a_run_survives_a_broker_restart(nodes, tmp_path):
    with Mosquitto(tmp_path / "broker") as own, WorkflowRunner(state_dir=tmp_path / "c") as runner:
        node = nodes("pi", on=own)
        handle = start(runner, BROKER_RESTART, tmp_path, pi=node.url)
        wait_until(lambda: node.executions(tag="work"), what="the handler to start")
        own.restart()
        assert handle.wait(WAIT * 2) == "success", handle.history
        assert len(node.executions(tag="work")) == 1
        assert len(node.executions(tag="after")) == 1


AWAIT = """\
name: awaits
servers: {{pi: "{pi}"}}
initial: listen
states:
  listen:
    await: device.state
    if: "params.device == 'counter' and params.state == 'busy'"
    timeout: 30s
    save: seen
    next: done
  done: {{final: success}}
"""


def test_await_device_state_through_the_broker(nodes, runner, tmp_path):
    node = nodes("pi")
    handle = start(runner, AWAIT, tmp_path, pi=node.url)
    wait_until(lambda: handle.run.awaiting == ("pi", "device.state"), what="the await")
    with MqttClient(node.url) as client:
        client.call("counter.work", {"tag": "poke"}, timeout=WAIT)
    assert handle.wait(WAIT) == "success", handle.history
    assert handle.context["seen"]["state"] == "busy"


PAUSED = """\
name: paused
servers: {{pi: "{pi}"}}
command_timeout: 20s
initial: first
states:
  first: {{command: counter.work, params: {{tag: first}}, next: hold}}
  hold: {{wait: 1s, next: second}}
  second: {{command: counter.work, params: {{tag: second}}, next: done}}
  done: {{final: success}}
"""


def test_statelink_resume_goes_on_through_the_broker(nodes, tmp_path):
    node = nodes("pi")
    state = tmp_path / "controller"
    with WorkflowRunner(state_dir=state) as runner:
        handle = start(runner, PAUSED, tmp_path, pi=node.url)
        wait_until(lambda: handle.state == "hold", what="the pause")
    # the runner closed mid-run, as after a crash: resume it from its journal
    done = statelink("resume", handle.run_id, "--plain", "--state-dir", str(state))
    assert done.returncode == 0, done.stderr + done.stdout
    assert [e["tag"] for e in node.executions()] == ["first", "second"]
