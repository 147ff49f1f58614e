"""The README's tour, pasted line by line into fresh shells, works as written (issue 14).

The tour's shell blocks are read from README.md and run with ``bash`` in a scratch directory
that looks like a fresh clone with its set-up done: ``config/`` (a link to the repository's)
and ``.venv`` (a link to the venv this test runs in, the one whose ``statelink`` sits next to
``sys.executable``). The ``PATH`` starts without any ``statelink``: a bare ``statelink`` works
only after the tour's own ``. .venv/bin/activate``. Nothing is installed here (no pip).

The first block is terminal 1 (the server, kept running); every later block is terminal 2,
where a line like ``. .venv/bin/activate`` stays in effect for the lines after it. The only
changes to the text: the server gets ``--port 0`` (a free port, read from its log line), and
the tour's default port, and the default ``--server`` of ``statelink call``, become that port.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support import ROOT, WAIT

from statemachines.addresses import DEFAULT_PORT

README = ROOT / "README.md"
VENV = Path(sys.executable).parent.parent
STATELINK = Path(sys.executable).with_name("statelink")


@dataclass
class Line:
    command: str
    comment: str


def tour() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("## A 5-minute tour")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def shell_blocks(section: str) -> list[list[Line]]:
    blocks = []
    for body in re.findall(r"```sh\n(.*?)```", section, re.DOTALL):
        lines = []
        for raw in body.splitlines():
            if not raw.strip() or raw.lstrip().startswith("#"):
                continue
            command, _, comment = raw.partition("  # ")
            lines.append(Line(command.strip(), comment.strip()))
        blocks.append(lines)
    return blocks


def saved_files(section: str) -> dict[str, str]:
    """``Save this as `NAME` ...`` followed by a YAML block: NAME -> the block's text."""
    found = re.findall(r"Save this as `([^`]+)`[^\n]*\n+```yaml\n(.*?)```", section, re.DOTALL)
    return dict(found)


def without_statelink(path: str) -> str:
    return os.pathsep.join(
        d for d in path.split(os.pathsep) if d and not (Path(d) / "statelink").exists()
    )


class Tour:
    """The scratch clone, the shell environment, and the server of terminal 1."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = {**os.environ, "PATH": without_statelink(os.environ.get("PATH", ""))}
        for name in ("VIRTUAL_ENV", "STATELINK_SECRET", "PYTHONPATH"):
            self.env.pop(name, None)
        self.env["COLUMNS"] = "120"
        self.port = 0
        self.server: subprocess.Popen[str] | None = None

    def localize(self, command: str) -> str:
        """The README's line with the tour's port replaced by the server's."""
        command = command.replace(str(DEFAULT_PORT), str(self.port))
        return re.sub(
            r"\bstatelink call ", f"statelink call --server 127.0.0.1:{self.port} ", command
        )

    def run(self, setup: list[str], command: str) -> subprocess.CompletedProcess[str]:
        script = "\n".join([*setup, command])
        return subprocess.run(
            ["bash", "-c", script],
            capture_output=True,
            text=True,
            timeout=3 * WAIT,
            cwd=self.root,
            env=self.env,
        )

    def serve(self, setup: list[str], command: str) -> None:
        assert command.startswith("statelink serve "), command
        script = "\n".join([*setup, f"exec {command} --port 0"])
        self.server = subprocess.Popen(
            ["bash", "-c", script],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            cwd=self.root,
            env=self.env,
        )
        assert self.server.stderr is not None
        for line in self.server.stderr:  # ends at EOF if the server dies
            match = re.search(r"serving on [\d.]+:(\d+)", line)
            if match:
                self.port = int(match.group(1))
                return
        raise AssertionError(f"statelink serve exited with {self.server.wait(WAIT)}")

    def stop(self) -> tuple[int, str]:
        """Ctrl-C for the server: its exit code and the rest of its log."""
        assert self.server is not None and self.server.stderr is not None
        if self.server.poll() is None:
            self.server.send_signal(signal.SIGINT)
        try:
            code = self.server.wait(WAIT)
        finally:
            if self.server.poll() is None:
                self.server.kill()
                self.server.wait(WAIT)
        log = self.server.stderr.read()
        self.server.stderr.close()
        return code, log


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Tour]:
    if not STATELINK.exists() or not (VENV / "bin" / "activate").exists():
        pytest.skip(f"no venv with statelink next to {sys.executable}")
    (tmp_path / "config").symlink_to(ROOT / "config", target_is_directory=True)
    (tmp_path / ".venv").symlink_to(VENV, target_is_directory=True)
    tour = Tour(tmp_path)
    try:
        yield tour
    finally:
        if tour.server is not None and tour.server.poll() is None:
            tour.server.kill()
            tour.server.wait(WAIT)


def expected_json(comment: str) -> re.Pattern[str] | None:
    """A ``# {"a": 1, "b": ...}`` comment as a pattern for the compact JSON (``...``: any)."""
    if not comment.startswith(("{", "[", '"')):
        return None
    parts = [re.escape(part) for part in comment.split("...")]
    return re.compile(".*".join(parts) + r"\Z")


def compact(text: str) -> str:
    return json.dumps(json.loads(text))


def ping_without_nc(command: str, port: int) -> dict[str, Any]:
    """The same bytes as ``printf ... | nc``, sent without nc: one line, one reply line."""
    printf = command.partition("|")[0]
    sent = subprocess.run(["bash", "-c", printf], capture_output=True, check=True).stdout
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        sock.sendall(sent)
        return json.loads(sock.makefile("rb").readline())


def check_line(tour: Tour, setup: list[str], line: Line) -> None:
    command = tour.localize(line.command)
    if command.startswith("printf ") and "| nc " in command and shutil.which("nc") is None:
        reply = ping_without_nc(command, tour.port)
        assert reply.get("result") == "pong", reply
        return
    result = tour.run(setup, command)
    said = f"{line.command!r}:\n{result.stdout}{result.stderr}"
    assert "command not found" not in result.stderr, said
    assert "Traceback" not in result.stderr, said
    error = re.match(r"error (-?\d+): (.*)", line.comment)
    if error:
        assert result.returncode == 1, said
        wanted = f"error {error.group(1)}: {error.group(2).removesuffix('...').rstrip()}"
        assert result.stderr.startswith(wanted), said
        return
    assert result.returncode == 0, said
    pattern = expected_json(line.comment)
    if pattern is not None:
        assert pattern.match(compact(result.stdout)), said
    words = command.split()
    if words[:2] == ["statelink", "call"] or words[0] == "printf":
        json.loads(result.stdout)  # one JSON document, whatever the comment says
    if words[:2] == ["statelink", "check"]:
        assert result.stdout.startswith(f"{words[2]}: ok"), said
    if words[:2] == ["statelink", "graph"]:
        assert "stateDiagram-v2" in result.stdout, said
    if words[:2] == ["statelink", "run"] and "--journal" in words:
        journal = tour.root / words[words.index("--journal") + 1]
        entries = [json.loads(entry) for entry in journal.read_text().splitlines()]
        assert entries[-1]["event"] == "finished" and entries[-1]["final"] == "success"


def test_the_tour_runs_as_written(scratch: Tour) -> None:
    section = tour()
    blocks = shell_blocks(section)
    files = saved_files(section)
    assert "my.yaml" in files, "the tour says where to save the workflow it runs"
    assert len(blocks) >= 3 and len(blocks[0]) == 2, blocks

    # terminal 1: activate, serve (kept running)
    setup = [blocks[0][0].command]
    assert setup == [". .venv/bin/activate"]
    scratch.serve(setup, blocks[0][1].command)
    for name, text in files.items():
        (scratch.root / name).write_text(scratch.localize(text))

    # terminal 2: every later block, in order
    setup, ran = [], []
    for block in blocks[1:]:
        for line in block:
            if line.command.startswith((". ", "source ", "cd ")):
                setup.append(line.command)
                continue
            check_line(scratch, setup, line)
            ran.append(line.command.split()[:2])
    assert setup and setup[0] == ". .venv/bin/activate"
    assert {tuple(words) for words in ran} >= {
        ("statelink", "call"),
        ("statelink", "check"),
        ("statelink", "run"),
        ("statelink", "graph"),
    }

    code, log = scratch.stop()
    assert code == 0, log  # Ctrl-C stops the server cleanly
    assert "Traceback" not in log and "Exception in thread" not in log, log


def test_without_activation_statelink_is_not_found(scratch: Tour) -> None:
    """The check above means something: in these shells only the tour's own activation puts
    ``statelink`` on the PATH."""
    bare = scratch.run([], "statelink --version")
    assert bare.returncode == 127 and "command not found" in bare.stderr
    activated = scratch.run([". .venv/bin/activate"], "statelink --version")
    assert activated.returncode == 0, activated.stderr


def test_the_first_commands_are_the_demo_and_the_tests() -> None:
    """The README starts with the two set-up commands of the brief: demo, and dev + tests."""
    text = README.read_text(encoding="utf-8")
    first, second = re.findall(r"```sh\n(.*?)\n```", text, re.DOTALL)[:2]
    assert first == "python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/statelink demo"
    dev = ".venv/bin/pip install -e '.[dev]' && .venv/bin/python -m pytest -q"
    assert second == f"python3 -m venv .venv && {dev}"
    assert text.index(first) < text.index("## A 5-minute tour")


def test_the_python_example_of_the_tour_runs() -> None:
    (example,) = re.findall(r"```python\n(.*?)```", tour(), re.DOTALL)
    result = subprocess.run(
        [sys.executable, "-c", example],
        capture_output=True,
        text=True,
        timeout=3 * WAIT,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "19\n"
