"""controller.journal: run journals on real files (group commit, failures, reading, ownership,
listing). No mocks: real files under tmp_path, /dev/full for a real ENOSPC, real processes
killed with SIGKILL. Waits are on events and process output (bounded by WAIT), never sleeps.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import ROOT, WAIT

from controller.journal import (
    RUNS_DIR,
    JournalBusy,
    JournalClosed,
    JournalCorrupt,
    JournalFile,
    JournalWriter,
    check_new_journal_path,
    journal_owner,
    list_runs,
    read_journal,
)


def _entry(
    event: str, state: str = "s1", time: str = "2026-01-01T00:00:00.000Z", **extra: Any
) -> dict[str, Any]:
    return {"time": time, "state": state, "event": event, **extra}


class Results:
    """``on_durable`` callbacks that record their errors; ``wait(n)`` for n of them."""

    def __init__(self) -> None:
        self.errors: list[OSError | None] = []
        self.fsyncs_seen: list[int] = []
        self._cond = threading.Condition()

    def callback(self, writer: JournalWriter | None = None) -> Any:
        def on_durable(error: OSError | None) -> None:
            with self._cond:
                self.errors.append(error)
                if writer is not None:
                    self.fsyncs_seen.append(writer.fsyncs)
                self._cond.notify_all()

        return on_durable

    def wait(self, count: int) -> list[OSError | None]:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.errors) >= count, WAIT), self.errors
            return list(self.errors)


@pytest.fixture
def runs_dir(tmp_path: Path) -> Path:
    return tmp_path / RUNS_DIR


@pytest.fixture(params=["wal", "files"])
def writer(request: pytest.FixtureRequest, runs_dir: Path) -> Iterator[JournalWriter]:
    with JournalWriter(runs_dir, sync=request.param) as journals:
        yield journals


def _block_writer(writer: JournalWriter, journal: JournalFile) -> tuple[threading.Event, Any]:
    """Park the writer thread in a callback until the returned event is set."""
    entered, release = threading.Event(), threading.Event()

    def hold(_error: OSError | None) -> None:
        entered.set()
        release.wait(WAIT)

    writer.append(journal, _entry("start"), durable=True, on_durable=hold)
    assert entered.wait(WAIT)
    return release, entered


# -- group commit -------------------------------------------------------------------------------


def test_group_commit_batches_entries_of_many_journals(writer: JournalWriter, runs_dir: Path):
    first = writer.create(runs_dir / "first.jsonl")
    release, _ = _block_writer(writer, first)
    batches, fsyncs = writer.batches, writer.fsyncs
    results = Results()
    journals = [writer.create(runs_dir / f"r{i}.jsonl") for i in range(200)]
    for journal in journals:
        writer.append(journal, _entry("start"))
        writer.append(journal, _entry("send", key="k"), durable=True, on_durable=results.callback())
    release.set()
    assert results.wait(200) == [None] * 200
    assert writer.batches - batches == 1  # 400 entries of 200 journals: one batch
    if writer.sync == "wal":
        assert writer.fsyncs - fsyncs == 1  # ...and one fsync, of the write-ahead file
    else:
        assert writer.fsyncs - fsyncs <= 200 + 1  # one per journal (+ their directory)
    for journal in journals:
        assert [e["event"] for e in read_journal(journal.path).entries] == ["start", "send"]


def test_durable_callbacks_run_only_after_the_fsync(writer: JournalWriter, runs_dir: Path):
    journal = writer.create(runs_dir / "r.jsonl")
    results = Results()
    writer.append(journal, _entry("start"), on_durable=results.callback(writer))
    assert results.wait(1) == [None]
    assert results.fsyncs_seen == [0]  # not durable: written, no fsync
    assert journal.path.read_bytes().count(b"\n") == 1
    writer.append(journal, _entry("send"), durable=True, on_durable=results.callback(writer))
    results.wait(2)
    assert results.fsyncs_seen[1] >= 1  # the fsync came before the callback
    assert read_journal(journal.path).entries[-1]["event"] == "send"


def test_entries_keep_their_order_and_start_names_the_process(writer: JournalWriter, runs_dir):
    journal = writer.create(runs_dir / "r.jsonl")
    for i in range(50):
        writer.append(journal, _entry("start" if i == 0 else "reply", n=i), durable=i % 7 == 0)
    assert writer.flush(WAIT)
    entries = read_journal(journal.path).entries
    assert [e["n"] for e in entries] == list(range(50))
    assert entries[0]["pid"] == os.getpid() and Path(entries[0]["lock"]).parent == runs_dir
    assert "pid" not in entries[1]


def test_with_a_commit_delay_entries_wait_to_share_a_commit_until_told(runs_dir: Path):
    """``commit_delay``: a queued entry waits for others (up to the delay) unless ``commit()``
    is called or ``batch_entries`` wait; ``close`` writes what waits at once."""
    results = Results()
    with JournalWriter(runs_dir, commit_delay=3600.0, batch_entries=3) as writer:
        journal = writer.create(runs_dir / "r.jsonl")
        writer.append(journal, _entry("start"), on_durable=results.callback())
        writer.append(journal, _entry("send"), durable=True, on_durable=results.callback())
        assert results.errors == [] and writer.batches == 0  # waiting for company
        writer.commit()  # the producer goes idle: nothing more is coming
        assert results.wait(2) == [None, None]
        assert writer.batches == 1
        for i in range(3):  # batch_entries waiting: committed without being told
            writer.append(journal, _entry("reply", n=i), on_durable=results.callback())
        assert results.wait(5) == [None] * 5
        assert writer.batches == 2
        writer.append(journal, _entry("finished"), on_durable=results.callback())
    assert results.wait(6) == [None] * 6
    assert [e["event"] for e in read_journal(journal.path).entries][-1] == "finished"


def test_entries_are_written_as_json_dumps_writes_them(writer: JournalWriter, runs_dir: Path):
    class Odd:
        def __str__(self) -> str:
            return "odd"

    values = {"text": "é ✓ \u2028", "nan": float("nan"), "inf": -float("inf"), 3: "three"}
    entry = _entry("reply", result={**values, "list": [1, 2.5, None, True], "odd": Odd()})
    lone = _entry("reply", result="\ud800")  # a lone surrogate has no UTF-8: escaped
    journal = writer.create(runs_dir / "r.jsonl")
    writer.append(journal, entry)
    writer.append(journal, lone)
    circular: list[Any] = []
    circular.append(circular)
    with pytest.raises(ValueError, match="Circular"):
        writer.append(journal, _entry("reply", result=circular))
    with pytest.raises(TypeError):
        writer.append(journal, _entry("reply", result={(1, 2): 3}))
    assert writer.flush(WAIT)
    lines = journal.path.read_bytes().splitlines(keepends=True)
    assert lines == [
        (json.dumps(entry, default=str, ensure_ascii=False) + "\n").encode(),
        (json.dumps(lone, default=str) + "\n").encode(),
    ]


def test_the_queue_is_bounded_in_bytes(runs_dir: Path):
    with JournalWriter(runs_dir, max_queue_bytes=4096) as writer:
        journal = writer.create(runs_dir / "r.jsonl")
        release, _ = _block_writer(writer, journal)
        big = _entry("reply", result="x" * 3000)
        writer.append(journal, big)  # fits (the queue was empty)
        appended = threading.Event()

        def append_big() -> None:
            writer.append(journal, big)
            appended.set()

        thread = threading.Thread(target=append_big)
        thread.start()
        assert not appended.wait(0.2)  # blocked: the writer is parked, the queue is full
        release.set()
        assert appended.wait(WAIT)
        thread.join(WAIT)
        assert writer.flush(WAIT)
        assert len(read_journal(journal.path).entries) == 3


def test_a_checkpoint_syncs_the_journals_and_empties_the_wal(runs_dir: Path):
    with JournalWriter(runs_dir, wal_limit=2000) as writer:
        journals = [writer.create(runs_dir / f"r{i}.jsonl") for i in range(5)]
        for i in range(40):
            writer.append(journals[i % 5], _entry("reply", n=i), durable=True)
            assert writer.flush(WAIT)
        assert writer.checkpoints >= 1
        (wal,) = runs_dir.glob(".controller-*.wal")
        assert wal.stat().st_size <= 2000 + 200  # emptied at each checkpoint
        assert sum(len(read_journal(j.path).entries) for j in journals) == 40


def test_close_writes_what_is_queued_then_refuses(runs_dir: Path):
    writer = JournalWriter(runs_dir).start()
    journal = writer.create(runs_dir / "r.jsonl")
    results = Results()
    for i in range(100):
        writer.append(journal, _entry("reply", n=i), durable=True, on_durable=results.callback())
    writer.close()
    assert results.wait(100) == [None] * 100
    assert len(read_journal(journal.path).entries) == 100
    with pytest.raises(JournalClosed):
        writer.append(journal, _entry("reply"))
    writer.close()  # idempotent
    assert sorted(p.name for p in runs_dir.iterdir()) == ["r.jsonl"]  # lock and WAL removed


def test_3000_journals_with_256_open_files(tmp_path: Path):
    script = textwrap.dedent(
        """
        import resource, sys, threading
        from pathlib import Path
        from controller.journal import JournalWriter, read_journal
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
        base = Path(sys.argv[1])
        for sync in ("wal", "files"):
            errors, done = [], threading.Semaphore(0)
            def on_durable(error):
                errors.append(error)
                done.release()
            with JournalWriter(base / sync) as writer:
                journals = [writer.create(base / sync / f"r{i}.jsonl") for i in range(3000)]
                for step in range(3):
                    for journal in journals:
                        entry = {"time": "t", "state": "s", "event": "send", "step": step}
                        writer.append(journal, entry, durable=True, on_durable=on_durable)
                for _ in range(9000):
                    assert done.acquire(timeout=60)
            assert errors == [None] * 9000, [e for e in errors if e][:3]
            assert all(len(read_journal(j.path).entries) == 3 for j in journals)
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# -- failures -----------------------------------------------------------------------------------


def _close_within_wait(writer: JournalWriter) -> None:
    closed = threading.Event()

    def close() -> None:
        writer.close()
        closed.set()

    threading.Thread(target=close, daemon=True).start()
    assert closed.wait(WAIT), "close() hung"


def test_a_full_disk_fails_that_journal_only(writer: JournalWriter, runs_dir: Path):
    full, ok = writer.create(runs_dir / "full.jsonl"), writer.create(runs_dir / "ok.jsonl")
    for journal in (full, ok):
        writer.append(journal, _entry("start"))
    assert writer.flush(WAIT)
    saved = runs_dir / "saved.jsonl"
    os.replace(full.path, saved)
    os.symlink("/dev/full", full.path)  # every write to it: ENOSPC, a real one
    results = Results()
    writer.append(full, _entry("send"), durable=True, on_durable=results.callback())
    writer.append(ok, _entry("send"), durable=True, on_durable=results.callback())
    error, fine = results.wait(2)
    assert isinstance(error, OSError) and error.errno == errno.ENOSPC
    assert error.filename == str(full.path) and str(full.path) in str(error)
    assert fine is None and full.failed and not ok.failed
    # never written again, even once the disk has room: a torn last line stays last
    os.replace(saved, full.path)
    writer.append(full, _entry("reply"), on_durable=results.callback())
    writer.append(ok, _entry("reply"), on_durable=results.callback())
    assert results.wait(4)[2:] == [error, None]
    assert len(read_journal(full.path).entries) == 1
    assert len(read_journal(ok.path).entries) == 3
    _close_within_wait(writer)


def test_a_journal_removed_under_the_writer_fails_cleanly(writer: JournalWriter, runs_dir: Path):
    (runs_dir / "sub").mkdir()
    journal = writer.create(runs_dir / "sub" / "r.jsonl")
    (runs_dir / "sub" / "r.jsonl").unlink()
    results = Results()
    writer.append(journal, _entry("start"), durable=True, on_durable=results.callback())
    (error,) = results.wait(1)
    assert isinstance(error, FileNotFoundError) and error.filename == str(journal.path)
    assert not journal.path.exists()  # the writer never creates a journal itself
    _close_within_wait(writer)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_an_unwritable_journal_fails_with_eacces(writer: JournalWriter, runs_dir: Path):
    journal = writer.create(runs_dir / "r.jsonl")
    journal.path.chmod(0o400)
    results = Results()
    writer.append(journal, _entry("start"), durable=True, on_durable=results.callback())
    (error,) = results.wait(1)
    assert isinstance(error, PermissionError) and error.filename == str(journal.path)


# -- reading ------------------------------------------------------------------------------------


def _write_lines(path: Path, *entries: dict[str, Any], tail: bytes = b"") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(json.dumps(e).encode() + b"\n" for e in entries) + tail)
    return path


def test_a_torn_last_line_is_ignored(tmp_path: Path):
    path = _write_lines(tmp_path / "r.jsonl", _entry("start"), _entry("send"), tail=b'{"time": "2')
    journal = read_journal(path)
    assert journal.torn and [e["event"] for e in journal.entries] == ["start", "send"]
    assert journal.size == path.stat().st_size - len(b'{"time": "2')
    whole = read_journal(_write_lines(tmp_path / "w.jsonl", _entry("start")))
    assert not whole.torn and whole.size == (tmp_path / "w.jsonl").stat().st_size


def test_a_bad_line_elsewhere_names_its_number(tmp_path: Path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(_entry("start")) + "\nnot json\n" + json.dumps(_entry("x")) + "\n")
    with pytest.raises(JournalCorrupt, match=r"r\.jsonl:2: not a JSON line"):
        read_journal(path)
    path.write_text(json.dumps(_entry("start")) + "\n[1, 2]\n")
    with pytest.raises(JournalCorrupt, match=r":2: not a JSON object"):
        read_journal(path)


def test_reopen_drops_a_torn_tail_before_appending(writer: JournalWriter, runs_dir: Path):
    path = _write_lines(runs_dir / "r.jsonl", _entry("start", run="r"), tail=b'{"torn": ')
    journal, before = writer.reopen(path, _entry("resumed"))
    assert before.torn and len(before.entries) == 1
    writer.append(journal, _entry("reply"), durable=True)
    assert writer.flush(WAIT)
    after = read_journal(path)
    assert not after.torn
    assert [e["event"] for e in after.entries] == ["start", "resumed", "reply"]
    assert after.entries[1]["pid"] == os.getpid()
    with pytest.raises(JournalBusy) as busy:  # this process drives it now
        writer.reopen(path, _entry("resumed"))
    assert busy.value.pid == os.getpid()


def test_reopen_refuses_a_finished_run(writer: JournalWriter, runs_dir: Path):
    path = _write_lines(runs_dir / "r.jsonl", _entry("start"), _entry("finished", final="success"))
    with pytest.raises(ValueError, match=r"finished \(success\)"):
        writer.reopen(path, _entry("resumed"))


# -- paths --------------------------------------------------------------------------------------


def test_new_journal_paths_are_checked(tmp_path: Path):
    with pytest.raises(ValueError, match=r"directory .*missing does not exist") as error:
        check_new_journal_path(tmp_path / "missing" / "r.jsonl")
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="is a directory"):
        check_new_journal_path(tmp_path)
    journal = _write_lines(tmp_path / "old.jsonl", _entry("start"))
    with pytest.raises(ValueError, match=f"statelink resume {journal}"):
        check_new_journal_path(journal)
    other = tmp_path / "notes.txt"
    other.write_text("my notes\n")
    with pytest.raises(ValueError, match="never overwritten"):
        check_new_journal_path(other)
    (tmp_path / "empty.jsonl").touch()
    assert check_new_journal_path(tmp_path / "empty.jsonl") == tmp_path / "empty.jsonl"
    assert check_new_journal_path(tmp_path / "new.jsonl") == tmp_path / "new.jsonl"


def test_create_never_overwrites(writer: JournalWriter, tmp_path: Path):
    journal = _write_lines(tmp_path / "old.jsonl", _entry("start"))
    before = journal.read_bytes()
    with pytest.raises(FileExistsError, match="statelink resume"):
        writer.create(journal)
    assert journal.read_bytes() == before
    (tmp_path / "empty.jsonl").touch()
    assert writer.create(tmp_path / "empty.jsonl").path == tmp_path / "empty.jsonl"
    created = writer.create(tmp_path / "new.jsonl")
    assert created.path.stat().st_mode & 0o777 == 0o600


# -- ownership across processes, listing ----------------------------------------------------------

_OWNER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from controller.journal import JournalWriter
    runs = Path(sys.argv[1])
    writer = JournalWriter(runs).start()
    journal = writer.create(runs / "held.jsonl")
    writer.append(journal, {"time": "2026-01-02T00:00:00.000Z", "state": "a", "event": "start",
                            "run": "held", "workflow": "demo", "next": "a"})
    for i in range(int(sys.argv[2])):
        writer.append(journal, {"time": "2026-01-02T00:00:01.000Z", "state": "a",
                                "event": "reply", "n": i}, durable=True)
    writer.flush()
    print("ready", flush=True)
    sys.stdin.readline()
    """
)


@pytest.fixture
def owner_process(runs_dir: Path) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _OWNER, str(runs_dir), "3"],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        proc.kill()
        proc.wait(WAIT)


def test_the_owner_lock_follows_the_process(owner_process: subprocess.Popen[str], runs_dir: Path):
    held = runs_dir / "held.jsonl"
    assert journal_owner(held) == owner_process.pid
    (summary,) = list_runs(runs_dir.parent)
    assert (summary.outcome, summary.owner) == ("running", owner_process.pid)
    assert summary.run_id == "held"
    busy = pytest.raises(JournalBusy, match=f"process {owner_process.pid}")
    with JournalWriter(runs_dir) as writer, busy:  # a second controller: not its run to take
        writer.reopen(held, _entry("resumed"))
    owner_process.send_signal(signal.SIGKILL)
    owner_process.wait(WAIT)
    assert journal_owner(held) is None
    (summary,) = list_runs(runs_dir.parent)
    assert (summary.outcome, summary.owner) == ("interrupted", None)
    with JournalWriter(runs_dir) as writer:
        journal, before = writer.reopen(held, _entry("resumed", time="2026-01-02T00:00:02.000Z"))
        assert [e["event"] for e in before.entries] == ["start", "reply", "reply", "reply"]
        assert journal_owner(held) == os.getpid()
        assert list_runs(runs_dir.parent)[0].outcome == "running"
        writer.append(journal, _entry("finished", state="a", final="success"), durable=True)
    assert journal_owner(held) is None
    assert list_runs(runs_dir.parent)[0].outcome == "success"
    # the dead process's lock and write-ahead file were cleaned up by the next writer
    assert sorted(p.name for p in runs_dir.iterdir()) == ["held.jsonl"]


def test_a_dead_process_wal_is_replayed_into_its_journals(runs_dir: Path):
    """A power loss can lose a journal's unsynced tail; the WAL (fsynced) restores it."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _OWNER, str(runs_dir), "20"],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    finally:
        proc.kill()
        proc.wait(WAIT)
    held = runs_dir / "held.jsonl"
    whole = held.read_bytes()
    assert len(read_journal(held).entries) == 21
    os.truncate(held, len(whole) // 3)  # as if the tail never reached the disk (torn, too)
    with JournalWriter(runs_dir):
        assert held.read_bytes() == whole
    assert sorted(p.name for p in runs_dir.iterdir()) == ["held.jsonl"]


_RESUMER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from controller.journal import JournalWriter
    runs = Path(sys.argv[1])
    writer = JournalWriter(runs).start()
    journal, _before = writer.reopen(runs / "held.jsonl", {"time": "2026-01-02T00:00:02.000Z",
                                     "state": "a", "event": "resumed"})
    for i in range(5):
        writer.append(journal, {"time": "2026-01-02T00:00:03.000Z", "state": "a",
                                "event": "reply", "n": 100 + i}, durable=True)
    writer.flush()
    print("ready", flush=True)
    sys.stdin.readline()
    """
)


def test_a_dead_resumer_wal_restores_what_it_appended(runs_dir: Path):
    """A resumed journal's WAL records carry offsets after the bytes it had (the writer counts
    a journal's size from the file, then by what it appends): a replay puts them back."""
    held = runs_dir / "held.jsonl"
    for script, args in ((_OWNER, ["3"]), (_RESUMER, [])):
        proc = subprocess.Popen(
            [sys.executable, "-c", script, str(runs_dir), *args],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        finally:
            proc.kill()
            proc.wait(WAIT)
    whole = held.read_bytes()
    lines = whole.splitlines(keepends=True)
    assert [json.loads(line)["event"] for line in lines] == [
        "start",
        *["reply"] * 3,
        "resumed",
        *["reply"] * 5,
    ]
    resumed_end = sum(len(line) for line in lines[:5])  # written and synced by reopen itself
    os.truncate(held, resumed_end + 7)  # what came after never reached the disk (torn)
    with JournalWriter(runs_dir):
        assert held.read_bytes() == whole


def test_list_runs_newest_first_with_states(runs_dir: Path, tmp_path: Path):
    def start(run: str, time: str) -> dict[str, Any]:
        return _entry("start", state="a", time=time, run=run, workflow="demo", next="a")

    dead = {"pid": 999999, "lock": str(runs_dir / ".controller-999999-dead.lock")}
    _write_lines(
        runs_dir / "old.jsonl",
        start("old", "2026-01-01T00:00:00.000Z"),
        _entry("finished", state="done", time="2026-01-01T00:00:05.000Z", final="success"),
    )
    _write_lines(
        runs_dir / "crashed.jsonl",
        {**start("crashed", "2026-01-03T00:00:00.000Z"), **dead},
        _entry("reply", state="a", time="2026-01-03T00:00:01.000Z", next="b"),
        tail=b'{"time": "2026-01-03T00:00:02',
    )
    (runs_dir / "being-created.jsonl").touch()
    with JournalWriter(runs_dir) as writer:
        live = writer.create(runs_dir / "live.jsonl")
        writer.append(live, start("live", "2026-01-02T00:00:00.000Z"))
        writer.append(live, _entry("error", state="a", time="2026-01-02T00:00:01.000Z"))
        assert writer.flush(WAIT)
        runs = list_runs(tmp_path)
        assert [r.run_id for r in runs] == ["crashed", "live", "old"]
        crashed, running, old = runs
        assert (crashed.outcome, crashed.state, crashed.last_event) == ("interrupted", "b", "reply")
        assert crashed.last_time == "2026-01-03T00:00:01.000Z"
        assert (running.outcome, running.owner, running.state) == ("running", os.getpid(), "a")
        assert (old.outcome, old.state, old.workflow) == ("success", "done", "demo")
        assert old.started == "2026-01-01T00:00:00.000Z" and old.last_event == "finished"
    assert list_runs(tmp_path)[1].outcome == "interrupted"  # the writer closed: not driven any more
    assert list_runs(tmp_path / "nothing-here") == []


def test_list_runs_reads_long_journals_from_their_tail(runs_dir: Path, tmp_path: Path):
    replies = [_entry("reply", state="a", n=i, result="y" * 200) for i in range(2000)]
    dead: dict[str, Any] = {"pid": 999999, "lock": str(runs_dir / ".controller-999999-x.lock")}
    path = _write_lines(
        runs_dir / "long.jsonl",
        _entry("start", state="a", run="long", workflow="w", next="a"),
        *replies[:1000],
        _entry("resumed", state="a", **dead),
        *replies[1000:],
    )
    assert path.stat().st_size > 400_000
    with JournalWriter(runs_dir) as writer:
        assert list_runs(tmp_path)[0].outcome == "interrupted"  # its resumer is dead too
        writer.reopen(path, _entry("resumed", state="a"))
        (summary,) = list_runs(tmp_path)
        assert (summary.outcome, summary.last_event) == ("running", "resumed")
