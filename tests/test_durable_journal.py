"""Durable run journals (issue 12): every run journaled by default under the state directory, a
self-contained ``start`` entry, a ``send`` entry on disk before each command goes out, journals
never overwritten, a journal that cannot be written failing the run (on_abort, exit 1, no hang),
the history bounded in bytes. Real servers on loopback, real files, real processes."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support import ROOT, WAIT, statelink

from controller import CommandServer
from controller.journal import read_journal
from controller.runner import WorkflowRunner
from statemachines.workflow import load_workflow
from statemachines.workflow.run import HISTORY_BYTES, HISTORY_ENTRY_BYTES

TWO_STEPS = """\
name: durable
servers:
  s: "{address}"
command_timeout: 5s
on_abort: cleanup
initial: one
states:
  one:
    command: probe
    params: {{n: 1}}
    next: two
  two:
    command: probe
    params: {{n: 2}}
    next: done
  done:
    final: success
  cleanup:
    command: cleanup
    next: stopped
    on_error: stopped
  stopped:
    final: failure
"""

#: sends ``probe`` for ever (each with a 400-byte param): only a journal failure stops it
FOREVER = """\
name: filler
servers:
  s: "{address}"
command_timeout: 5s
on_abort: cleanup
initial: step
states:
  step:
    command: probe
    params: {{n: 0, pad: "{pad}"}}
    next: step
    on_error: stopped
  cleanup:
    command: cleanup
    next: stopped
    on_error: stopped
  stopped:
    final: failure
"""


class Device:
    """A server with ``probe`` (calls ``check(n)`` first, then counts) and ``cleanup``."""

    def __init__(self, server: CommandServer) -> None:
        self.server = server
        self.probes: list[int] = []
        self.cleanups = 0
        self.check: Callable[[int], None] = lambda n: None
        self.problems: list[str] = []
        self.lock = threading.Lock()

        @server.command("probe")
        def probe(n: int, pad: str = "") -> dict[str, int]:
            try:
                self.check(n)
            except AssertionError as exc:  # reported by the test, not lost in the server
                self.problems.append(str(exc))
            with self.lock:
                self.probes.append(n)
            return {"n": n}

        @server.command("cleanup")
        def cleanup() -> str:
            with self.lock:
                self.cleanups += 1
            return "clean"

    @property
    def address(self) -> str:
        host, port = self.server.address
        return f"{host}:{port}"


@pytest.fixture
def device(make_server: Callable[..., CommandServer]) -> Device:
    return Device(make_server())


def write_workflow(tmp_path: Path, device: Device, text: str = TWO_STEPS, **fields: Any) -> Path:
    path = tmp_path / "wf.yaml"
    path.write_text(text.format(address=device.address, **fields))
    return path


def sends(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in entries if e["event"] == "send"]


def complete_entries(path: Path) -> list[dict[str, Any]]:
    """The entries of the complete lines of a journal (a torn last line is ignored)."""
    return read_journal(path).entries


# --- every run is journaled, self-contained ------------------------------------------------


def test_every_run_is_journaled_by_default_with_a_self_contained_start(
    device: Device, tmp_path: Path
) -> None:
    workflow = write_workflow(tmp_path, device)
    state = tmp_path / "state"
    with WorkflowRunner(state_dir=state) as runner:
        handle = runner.start(load_workflow(workflow))
        assert handle.wait(WAIT) == "success"
    path = state / "runs" / f"{handle.run_id}.jsonl"
    assert handle.journal_path == path
    entries = complete_entries(path)
    start = entries[0]
    assert start["event"] == "start" and start["run"] == handle.run_id
    assert start["workflow_text"] == workflow.read_text()
    assert start["workflow_file"] == str(workflow)
    assert start["servers"] == {"s": device.address}
    assert start["options"] == {"secret_file": None, "tls": False, "tls_ca": None}
    assert start["pid"] == os.getpid() and Path(start["lock"]).parent == state / "runs"
    assert isinstance(start["started"], float) and start["started"] == start["at"]
    assert all(isinstance(e["at"], float) for e in entries)
    assert [e["at"] for e in entries] == sorted(e["at"] for e in entries)
    assert entries[-1]["event"] == "finished" and entries[-1]["final"] == "success"
    run_id = handle.run_id
    assert [
        (s["state"], s["command"], s["params"], s["key"], s["attempt"], s["visit"], s["server"])
        for s in sends(entries)
    ] == [
        ("one", "probe", {"n": 1}, f"{run_id}:1", 1, 1, "s"),
        ("two", "probe", {"n": 2}, f"{run_id}:2", 1, 2, "s"),
    ]
    for send in sends(entries):
        assert send["timeout"] == 5.0
        assert send["deadline"] == pytest.approx(send["at"] + 5.0, abs=0.002)
    events = [e["event"] for e in entries]
    assert events == ["start", "send", "reply", "send", "reply", "finished"]


def test_runs_get_unique_journals_and_false_means_none(device: Device, tmp_path: Path) -> None:
    spec = load_workflow(write_workflow(tmp_path, device))
    state = tmp_path / "state"
    with WorkflowRunner(state_dir=state) as runner:
        handles = [runner.start(spec) for _ in range(5)]
        quiet = runner.start(spec, journal=False)
        assert all(h.wait(WAIT) == "success" for h in [*handles, quiet])
    assert quiet.journal is None and quiet.journal_path is None
    journals = sorted(p.name for p in (state / "runs").glob("*.jsonl"))
    assert journals == sorted(f"{h.run_id}.jsonl" for h in handles)


# --- a send is on disk before the device sees the command -----------------------------------


def test_the_send_entry_is_durable_before_the_command_reaches_the_device(
    device: Device, tmp_path: Path
) -> None:
    path = tmp_path / "run.jsonl"
    with WorkflowRunner(state_dir=tmp_path / "state") as runner:
        synced_before = runner.journals.fsyncs

        def check(n: int) -> None:  # on the server's worker: the entry must be on disk now
            mine = sends(complete_entries(path))
            assert len(mine) == n and mine[-1]["params"] == {"n": n}, mine
            # one fsync (of the write-ahead file) per batch holding a send, at least
            assert runner.journals.fsyncs - synced_before >= n

        device.check = check
        handle = runner.start(load_workflow(write_workflow(tmp_path, device)), journal=path)
        assert handle.wait(WAIT) == "success"
    assert device.problems == [] and device.probes == [1, 2]


def test_statelink_run_journals_each_send_before_the_command(
    device: Device, tmp_path: Path
) -> None:
    path = tmp_path / "cli.jsonl"

    def check(n: int) -> None:
        mine = sends(complete_entries(path))
        assert [s["params"]["n"] for s in mine] == list(range(1, n + 1)), mine

    device.check = check
    workflow = write_workflow(tmp_path, device)
    result = statelink("run", str(workflow), "--plain", "--journal", str(path))
    assert result.returncode == 0, result.stderr
    assert device.problems == [] and device.probes == [1, 2]
    run_id = complete_entries(path)[0]["run"]
    assert f"run {run_id}, journal {path}" in result.stderr.splitlines()


# --- journals are never overwritten; bad paths are usage errors -----------------------------


def test_a_journal_is_never_overwritten_and_bad_paths_exit_2(
    device: Device, tmp_path: Path
) -> None:
    workflow = write_workflow(tmp_path, device)
    path = tmp_path / "run.jsonl"
    first = statelink("run", str(workflow), "--plain", "--journal", str(path))
    assert first.returncode == 0, first.stderr
    before = path.read_bytes()
    other = tmp_path / "notes.txt"
    other.write_text("keep me\n")
    cases = {
        str(path): "statelink resume",  # a journal: says how to continue it
        str(other): "never overwritten",
        str(tmp_path / "missing" / "run.jsonl"): "does not exist",
        str(tmp_path): "is a directory",
    }
    for journal, says in cases.items():
        refused = statelink("run", str(workflow), "--plain", "--journal", journal)
        assert refused.returncode == 2, (journal, refused.stderr)
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1 and says in lines[0], (journal, refused.stderr)
    assert path.read_bytes() == before and other.read_text() == "keep me\n"
    assert device.probes == [1, 2]  # only the first run drove the device
    with (
        WorkflowRunner(state_dir=tmp_path / "state") as runner,
        pytest.raises(ValueError, match="statelink resume"),
    ):
        runner.start(load_workflow(workflow), journal=path)


def test_a_state_dir_that_cannot_be_used_exits_2(device: Device, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    workflow = write_workflow(tmp_path, device)
    result = statelink("run", str(workflow), "--plain", "--state-dir", str(blocker))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "state directory" in lines[0], result.stderr
    assert device.probes == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_an_unwritable_journal_directory_exits_2(device: Device, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    workflow = write_workflow(tmp_path, device)
    result = statelink("run", str(workflow), "--plain", "--journal", str(locked / "j.jsonl"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot create it" in lines[0], result.stderr
    assert device.probes == []


def test_a_command_aborted_before_its_send_entry_is_on_disk_is_never_sent(
    device: Device, tmp_path: Path
) -> None:
    """The run is aborted while the journal writer is busy (parked in a callback): its first
    command's ``send`` entry is not durable yet, so that command never goes out; the on_abort
    command queued behind it goes out once its own entry is on disk."""
    path = tmp_path / "run.jsonl"
    with WorkflowRunner(state_dir=tmp_path / "state") as runner:
        parked, release = threading.Event(), threading.Event()

        def hold(_error: OSError | None) -> None:  # on the journal writer's thread
            parked.set()
            release.wait(WAIT)

        other = runner.journals.create(tmp_path / "other.jsonl")
        entry = {"time": "2026-01-01T00:00:00.000Z", "state": "x", "event": "reply"}
        runner.journals.append(other, entry, durable=True, on_durable=hold)
        runner.journals.commit()
        assert parked.wait(WAIT)
        handle = runner.start(load_workflow(write_workflow(tmp_path, device)), journal=path)
        handle.abort()  # after the start on the dispatcher: probe 1 is queued, not on disk
        release.set()
        assert handle.wait(WAIT) == "aborted"
    assert device.probes == [] and device.cleanups == 1
    assert [e["command"] for e in sends(complete_entries(path))] == ["probe", "cleanup"]


# --- a journal that cannot be written fails the run ------------------------------------------


def test_a_journal_lost_mid_run_sends_the_run_to_on_abort(device: Device, tmp_path: Path) -> None:
    """The journal file disappears after the first command (its next write fails): the run
    goes to its on_abort path with the reason, whose command is never sent (no record)."""
    path = tmp_path / "run.jsonl"
    device.check = lambda n: path.unlink()
    with WorkflowRunner(state_dir=tmp_path / "state") as runner:
        handle = runner.start(load_workflow(write_workflow(tmp_path, device)), journal=path)
        assert handle.wait(WAIT) == "failure"
    assert handle.journal_error is not None
    assert handle.run.reason is not None
    assert handle.run.reason.startswith("journal write failed: No such file or directory")
    assert device.probes == [1] and device.cleanups == 0
    assert handle.state == "stopped"
    events = [e["event"] for e in handle.history]
    assert events[-3:] == ["abort", "error", "finished"]
    assert handle.history[-3]["reason"] == handle.run.reason
    assert handle.history[-2]["error"]["kind"] == "internal_error"


def _mount_tmpfs(directory: Path, size: str) -> bool:
    if os.geteuid() != 0:
        return False
    directory.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
        capture_output=True,
    )
    return mounted.returncode == 0


@contextlib.contextmanager
def small_disk(tmp_path: Path, how: str) -> Iterator[tuple[Path, Callable[[], None] | None]]:
    """A place to put a journal that fills at about 64 KiB, and a ``preexec_fn`` for the
    process writing it: a 64 KiB tmpfs (root only: ENOSPC), or any directory with the
    process's file size limit at 64 KiB (EFBIG; Python ignores SIGXFSZ)."""
    if how == "tmpfs":
        directory = tmp_path / "tiny"
        if not _mount_tmpfs(directory, "64k"):
            pytest.skip("cannot mount a tmpfs here (needs root)")
        try:
            yield directory, None
        finally:
            subprocess.run(["umount", "-l", str(directory)], check=False)
        return

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    yield tmp_path, limit


@pytest.mark.parametrize("how", ["file_size_limit", "tmpfs"])
def test_a_full_disk_fails_the_run_exit_1_without_hanging(
    device: Device, tmp_path: Path, how: str
) -> None:
    workflow = write_workflow(tmp_path, device, FOREVER, pad="x" * 400)
    with small_disk(tmp_path, how) as (directory, preexec):
        path = directory / "run.jsonl"
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}  # no .pyc cut by the limit
        started = time.monotonic()
        result = subprocess.run(
            [
                sys.executable,
                "-B",
                "-m",
                "controller",
                "run",
                str(workflow),
                "--plain",
                "--journal",
                str(path),
                "--state-dir",
                str(tmp_path / "state"),
            ],
            capture_output=True,
            text=True,
            timeout=WAIT,
            cwd=ROOT,
            env=env,
            preexec_fn=preexec,
        )
        elapsed = time.monotonic() - started
        assert path.exists(), result.stderr
        entries = complete_entries(path)
    assert result.returncode == 1, result.stderr
    assert elapsed < WAIT
    assert "journal write failed" in result.stderr
    summary = result.stdout.strip().splitlines()[-1]
    assert ": failure (journal write failed: " in summary, result.stdout
    # never a device command without its record: every probe the device ran has its send
    # entry on disk (the last one may have been sent, its reply entry not written)
    recorded = len(sends(entries))
    assert recorded > 5
    assert len(device.probes) <= recorded <= len(device.probes) + 1
    assert device.cleanups == 0  # the on_abort command could not be recorded: never sent


# --- the history is bounded in bytes ---------------------------------------------------------


def test_history_is_bounded_in_bytes_large_results_stay_in_the_journal(
    make_server: Callable[..., CommandServer], tmp_path: Path
) -> None:
    server = make_server()

    @server.command("big")
    def big(size: int) -> str:
        return "y" * size

    host, port = server.address
    states = "\n".join(
        f"  s{i}:\n    command: big\n    params: {{size: {300_000 + i}}}\n    next: s{i + 1}"
        for i in range(8)
    )
    text = (
        f'name: big\nservers:\n  s: "{host}:{port}"\ncommand_timeout: 10s\ninitial: s0\n'
        f"states:\n{states}\n  s8:\n    final: success\n"
    )
    workflow = tmp_path / "big.yaml"
    workflow.write_text(text)
    with WorkflowRunner(state_dir=tmp_path / "state") as runner:
        handle = runner.start(load_workflow(workflow))
        assert handle.wait(WAIT) == "success"
    history = handle.history
    size = sum(len(json.dumps(e, default=str)) for e in history)
    assert size <= HISTORY_BYTES
    replies = [e for e in history if e["event"] == "reply"]
    assert len(replies) == 8  # few entries: all kept, their large values noted, not held
    for i, reply in enumerate(replies):
        assert reply["result"] == f"({300_000 + i + 2} bytes: in the journal)"
    assert handle.context["result"] == "y" * 300_007  # the run still has its last result
    assert handle.journal_path is not None
    journaled = [e for e in complete_entries(handle.journal_path) if e["event"] == "reply"]
    assert [len(e["result"]) for e in journaled] == [300_000 + i for i in range(8)]
    assert all(len(json.dumps(e)) <= HISTORY_ENTRY_BYTES for e in history)


def test_history_drops_the_oldest_entries_beyond_the_byte_bound(
    make_server: Callable[..., CommandServer], tmp_path: Path
) -> None:
    server = make_server()

    @server.command("medium")
    def medium() -> str:
        return "z" * 40_000  # under the per-entry bound: kept whole, until the total is full

    host, port = server.address
    steps = 60  # 60 x 40 KB = 2.4 MB of results
    states = "\n".join(f"  s{i}:\n    command: medium\n    next: s{i + 1}" for i in range(steps))
    workflow = tmp_path / "medium.yaml"
    workflow.write_text(
        f'name: medium\nservers:\n  s: "{host}:{port}"\ncommand_timeout: 10s\ninitial: s0\n'
        f"states:\n{states}\n  s{steps}:\n    final: success\n"
    )
    with WorkflowRunner(state_dir=tmp_path / "state") as runner:
        handle = runner.start(load_workflow(workflow), journal=False)
        assert handle.wait(WAIT) == "success"
    history = handle.history
    assert sum(len(json.dumps(e, default=str)) for e in history) <= HISTORY_BYTES
    assert history[-1]["event"] == "finished"
    kept = [e for e in history if e["event"] == "reply"]
    assert 10 < len(kept) < steps  # the oldest were dropped, the newest kept whole
    assert kept[-1]["state"] == f"s{steps - 1}" and kept[-1]["result"] == "z" * 40_000
