"""controller.keystore: the durable record of idempotency keys, on real SQLite files.

No mocks: every test opens a real file in tmp_path; the crash test kills a real process with
SIGKILL. Waits are on events (bounded by WAIT), never sleeps.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import ROOT, WAIT

from controller.keystore import (
    DONE,
    INTERRUPTED,
    KEYS_FILE,
    RUNNING,
    Interrupted,
    KeyStore,
    KeyStoreClosed,
    KeyStoreError,
    KeyStoreFull,
    KeyStoreLocked,
    Outcome,
    Record,
    check_key,
    fingerprint,
)
from controller.statedir import default_state_dir, ensure_private_dir
from statemachines import errorkinds as ek


class Clock:
    """An injected wall clock the test moves by hand."""

    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


class Durable:
    """An ``on_durable`` callback that records its error and lets the test wait for it."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.errors: list[BaseException | None] = []

    def __call__(self, error: BaseException | None) -> None:
        self.errors.append(error)
        self.event.set()

    def wait(self) -> BaseException | None:
        assert self.event.wait(WAIT), "on_durable was not called"
        return self.errors[-1]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / KEYS_FILE


@pytest.fixture
def store(path: Path) -> Iterator[KeyStore]:
    with KeyStore(path) as opened:
        yield opened


def begin(store: KeyStore, key: str, method: str = "door.open", params: object = None) -> Record:
    durable = Durable()
    record = store.begin(key, method, fingerprint(params or {}), on_durable=durable)
    assert durable.wait() is None
    return record


def finish(store: KeyStore, key: str, outcome: Outcome) -> Record:
    durable = Durable()
    record = store.finish(key, outcome, on_durable=durable)
    assert durable.wait() is None
    return record


def get(store: KeyStore, key: str) -> Record:
    record = store.lookup(key)
    assert record is not None, f"{key} is not recorded"
    return record


def test_begin_finish_lookup(store: KeyStore) -> None:
    assert store.lookup("k1") is None
    record = begin(store, "k1", "door.open", {"speed": 2})
    assert record.state == RUNNING and record.outcome is None and record.finished is None
    assert record.device == "door"
    assert store.lookup("k1") == record
    done = finish(store, "k1", Outcome.success({"position": 100}))
    assert done.state == DONE and done.outcome == Outcome.success({"position": 100})
    assert store.lookup("k1") == done
    assert done.finished is not None and done.finished >= done.created


def test_lookup_sees_a_begin_before_it_is_durable(store: KeyStore) -> None:
    release = threading.Event()
    durable = Durable()
    try:
        hold_writer(store, release)
        store.begin("k2", "door.open", fingerprint({}), on_durable=durable)
        assert get(store, "k2").state == RUNNING
        assert not durable.event.is_set()
    finally:
        release.set()
    assert durable.wait() is None


def test_error_outcome_round_trips(path: Path) -> None:
    with KeyStore(path) as store:
        begin(store, "k1")
        finish(store, "k1", Outcome.failure(ek.DEVICE_FAULT, "motor stalled", {"at": 42}))
    with KeyStore(path) as store:
        record = store.lookup("k1")
        assert record is not None and record.state == DONE
        assert record.outcome == Outcome(
            error={"code": ek.DEVICE_FAULT, "message": "motor stalled", "data": {"at": 42}}
        )


def test_conflicts_by_method_and_by_params(store: KeyStore) -> None:
    record = begin(store, "k1", "door.open", {"speed": 2, "mode": "soft"})
    same = fingerprint({"mode": "soft", "speed": 2})  # key order does not matter
    assert not store.conflicts(record, "door.open", same)
    assert store.conflicts(record, "door.close", same)
    assert store.conflicts(record, "door.open", fingerprint({"speed": 3, "mode": "soft"}))
    assert store.conflicts(record, "door.open", fingerprint({"speed": 2}))


def test_fingerprint_is_canonical_json_sha256() -> None:
    assert fingerprint({"b": 1, "a": [1, 2]}) == fingerprint({"a": [1, 2], "b": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 1.0})
    assert fingerprint({}) != fingerprint(None)
    assert len(fingerprint({"x": "é"})) == 64


def test_begin_refuses_a_recorded_key_and_finish_an_unknown_one(store: KeyStore) -> None:
    begin(store, "k1")
    with pytest.raises(ValueError, match="already recorded"):
        store.begin("k1", "door.open", fingerprint({}), on_durable=Durable())
    with pytest.raises(KeyError):
        store.finish("nope", Outcome.success(1))
    finish(store, "k1", Outcome.success(1))
    with pytest.raises(ValueError, match="not running"):
        store.finish("k1", Outcome.success(2))


def test_forget_drops_the_key_for_good(path: Path) -> None:
    with KeyStore(path) as store:
        begin(store, "refused")
        begin(store, "kept")
        store.forget("refused")
        store.forget("never-recorded")  # no-op
        assert store.lookup("refused") is None
        begin(store, "refused", "door.close")  # the key is free again
        store.forget("refused")
    with KeyStore(path) as store:
        assert store.lookup("refused") is None
        assert store.lookup("kept") is not None


def test_records_persist_across_close_and_open(path: Path) -> None:
    with KeyStore(path) as store:
        for i in range(20):
            store.begin(f"k{i}", "door.open", fingerprint({"i": i}), on_durable=Durable())
            store.finish(f"k{i}", Outcome.success({"i": i}))
    # close() wrote everything queued, without any flush by the test
    with KeyStore(path) as store:
        assert len(store) == 20
        assert store.interrupted_at_open == []
        record = store.lookup("k7")
        assert record is not None and record.state == DONE
        assert record.outcome == Outcome.success({"i": 7})
        assert record.fingerprint == fingerprint({"i": 7})


def test_running_records_become_interrupted_at_open(path: Path) -> None:
    with KeyStore(path) as store:
        begin(store, "a", "door.open")
        begin(store, "b", "lamp.on", {"level": 3})
        finish(store, "b", Outcome.success(True))
        store.begin("c", "pump.run", fingerprint({}), on_durable=Durable(), device="pump-2")
    # "a" and "c" were left running (close() does not finish them)
    with KeyStore(path) as store:
        assert store.interrupted_at_open == [
            Interrupted("a", "door.open", "door"),
            Interrupted("c", "pump.run", "pump-2"),
        ]
        a = store.lookup("a")
        assert a is not None and a.state == INTERRUPTED and a.outcome is None
        assert a.finished is not None
        assert get(store, "b").state == DONE
    with KeyStore(path) as store:  # reported once: they are interrupted on disk now
        assert store.interrupted_at_open == []
        assert get(store, "a").state == INTERRUPTED


CRASHING_SERVER = textwrap.dedent(
    """
    import sys, threading
    from controller.keystore import KeyStore, fingerprint, Outcome

    store = KeyStore(sys.argv[1], fsync=sys.argv[2] == "fsync").open()
    store.begin("done-key", "door.close", fingerprint({}), on_durable=lambda e: None)
    store.finish("done-key", Outcome.success("closed"))
    durable = threading.Event()
    store.begin("k-crash", "door.open", fingerprint({"speed": 1}),
                on_durable=lambda error: durable.set())
    assert durable.wait(20)
    print("durable", flush=True)
    threading.Event().wait()  # the handler "runs" until the test kills us
    """
)


@pytest.mark.parametrize("sync", ["fsync", "no-fsync"])
def test_a_killed_process_leaves_its_running_key_interrupted(path: Path, sync: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASHING_SERVER, str(path), sync],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "durable"
        with pytest.raises(KeyStoreLocked):  # the live process holds the store
            KeyStore(path).open()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(WAIT)
        if proc.stdout is not None:
            proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    with KeyStore(path) as store:
        assert store.interrupted_at_open == [Interrupted("k-crash", "door.open", "door")]
        record = store.lookup("k-crash")
        assert record is not None and record.state == INTERRUPTED
        assert record.fingerprint == fingerprint({"speed": 1})
        done = store.lookup("done-key")
        assert done is not None and done.state == DONE and done.outcome == Outcome.success("closed")


def test_retention_by_clock(path: Path) -> None:
    clock = Clock()
    with KeyStore(path, retention=100.0, clock=clock) as store:
        begin(store, "old")
        finish(store, "old", Outcome.success(1))
        begin(store, "old-running")  # never expires while running
        clock.now += 50
        begin(store, "young")
        finish(store, "young", Outcome.success(2))
        clock.now += 60  # "old" finished 110 s ago, "young" 60 s ago
        assert store.lookup("old") is None  # expired, even before any sweep
        assert store.lookup("young") is not None
        assert store.lookup("old-running") is not None
        begin(store, "trigger")  # begin sweeps
        assert len(store) == 3
        begin(store, "old", "door.close")  # an expired key may be used again
        assert store.flush(WAIT)
    with KeyStore(path, retention=100.0, clock=clock) as store:
        assert get(store, "old").method == "door.close"
        clock.now += 200  # the records interrupted at this open expire from now on
        assert store.prune() == 4
        assert len(store) == 0
    with KeyStore(path, retention=100.0, clock=clock) as store:
        assert len(store) == 0  # the pruned records are gone from disk too


def test_open_drops_records_expired_while_closed(path: Path) -> None:
    clock = Clock()
    with KeyStore(path, retention=100.0, clock=clock) as store:
        begin(store, "k1")
        finish(store, "k1", Outcome.success(1))
    clock.now += 101
    with KeyStore(path, retention=100.0, clock=clock) as store:
        assert store.lookup("k1") is None and len(store) == 0
    rows = sqlite3.connect(path).execute("SELECT count(*) FROM keys").fetchone()[0]
    assert rows == 0


def test_max_keys_drops_the_oldest_finished_first(path: Path) -> None:
    clock = Clock()
    with KeyStore(path, max_keys=3, clock=clock) as store:
        begin(store, "running-oldest")
        for key in ("f1", "f2"):
            clock.now += 1
            begin(store, key)
            finish(store, key, Outcome.success(key))
        clock.now += 1
        begin(store, "f3")  # 4 records: f1, the oldest finished one, goes
        assert store.lookup("f1") is None
        assert [store.lookup(k) is not None for k in ("running-oldest", "f2", "f3")] == [True] * 3
        finish(store, "f3", Outcome.success("f3"))
        clock.now += 1
        begin(store, "f4")  # f2 goes, not the older running one
        assert store.lookup("f2") is None
        assert store.lookup("running-oldest") is not None
        assert len(store) == 3
        assert store.flush(WAIT)
    with KeyStore(path, max_keys=3, clock=clock) as store:
        assert sorted(k for k in ("running-oldest", "f1", "f2", "f3", "f4") if store.lookup(k)) == [
            "f3",
            "f4",
            "running-oldest",
        ]
    with KeyStore(path, max_keys=1, clock=clock) as store:  # a smaller bound applies at open
        assert len(store) == 1 and store.lookup("f4") is not None


def test_running_records_are_never_dropped_by_the_bound(path: Path) -> None:
    with KeyStore(path, max_keys=2) as bounded:
        for key in ("r1", "r2", "r3"):
            begin(bounded, key)
        assert len(bounded) == 3


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "1-128 characters"),
        ("x" * 129, "1-128 characters"),
        ("a\nb", "character 2 is '\\\\n'"),
        ("tab\there", "character 4"),
        ("\x00", "character 1"),
        (42, "must be a string, not int"),
        (None, "must be a string, not NoneType"),
    ],
)
def test_check_key_refuses_with_a_clear_message(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_key(value)


def test_check_key_accepts_printable_keys(store: KeyStore) -> None:
    for key in ("a", "x" * 128, "run-42/visit 3:door.open", "tür-ß"):
        assert check_key(key) == key
    with pytest.raises(ValueError, match="printable"):
        store.begin("bad\x7fkey", "door.open", fingerprint({}), on_durable=Durable())
    assert len(store) == 0


def test_group_commit_batches_queued_writes(store: KeyStore) -> None:
    for i in range(1000):
        store.begin(f"k{i}", "door.open", fingerprint({}), on_durable=Durable())
    assert store.flush(WAIT)
    release = threading.Event()
    durables = [Durable() for _ in range(1000)]
    try:
        hold_writer(store, release)
        commits = store.commits
        for i, durable in enumerate(durables):
            store.finish(f"k{i}", Outcome.success(i), on_durable=durable)
    finally:
        release.set()  # the writer takes the 1,000 queued finishes at once
    for durable in durables:
        assert durable.wait() is None
    assert store.commits - commits == 1
    assert store.failures == 0 and store.failed is None


def on_disk(path: Path) -> dict[str, str]:
    """key -> state, as committed to the file (read by a second SQLite connection)."""
    with contextlib.closing(sqlite3.connect(path, timeout=WAIT)) as db:
        return dict(db.execute("SELECT key, state FROM keys"))


def test_with_max_delay_a_write_waits_for_commit_soon(path: Path) -> None:
    with KeyStore(path, max_delay=3600.0) as store:
        commits = store.commits
        durables = [Durable() for _ in range(3)]
        for i, durable in enumerate(durables):
            store.begin(f"k{i}", "door.open", fingerprint({}), on_durable=durable)
        assert store.commits == commits and not durables[0].event.is_set()  # it waits
        assert on_disk(path) == {}
        store.commit_soon()  # somebody waits for k0..k2: one commit for the three
        for durable in durables:
            assert durable.wait() is None
        assert store.commits == commits + 1
        assert on_disk(path) == {f"k{i}": RUNNING for i in range(3)}


def test_max_delay_bounds_how_long_a_write_waits(path: Path) -> None:
    with KeyStore(path, max_delay=0.05) as store:
        durable = Durable()
        store.begin("late", "door.open", fingerprint({}), on_durable=durable)
        assert durable.wait() is None  # nobody asked: committed after max_delay anyway
        store.finish("late", Outcome.success(1))
        assert store.flush(WAIT)  # flush does not wait for max_delay either
        assert on_disk(path) == {"late": DONE}


def test_with_max_delay_half_a_queue_is_committed_at_once(path: Path) -> None:
    with KeyStore(path, max_delay=3600.0, max_queue=8) as store:
        durables = [Durable() for _ in range(4)]
        for i, durable in enumerate(durables):
            store.begin(f"k{i}", "door.open", fingerprint({}), on_durable=durable)
        for durable in durables:
            assert durable.wait() is None


def test_a_batch_of_any_size_is_written_whole(path: Path) -> None:
    """Batches are written a few statements of many rows each (sizes padded to powers of two,
    the last row repeated): every row and every deletion of a batch reaches the file."""
    release = threading.Event()
    for count in (1, 3, 300):
        with KeyStore(path) as store:
            try:
                hold_writer(store, release)  # what follows is one batch
                for i in range(count):
                    store.begin(f"n{count}-{i}", "door.open", fingerprint({}), on_durable=Durable())
                for i in range(0, count, 2):
                    store.forget(f"n{count}-{i}")
                store.forget("hold")
            finally:
                release.set()
            assert store.flush(WAIT)
            release.clear()
            disk = on_disk(path)
            mine = {key: state for key, state in disk.items() if key.startswith(f"n{count}-")}
            assert mine == {f"n{count}-{i}": RUNNING for i in range(1, count, 2)}
            assert "hold" not in disk


def hold_writer(store: KeyStore, release: threading.Event) -> None:
    """Block the writer thread in an on_durable callback until ``release`` is set."""
    holding = threading.Event()

    def hold(_error: BaseException | None) -> None:
        holding.set()
        release.wait(WAIT)

    store.begin("hold", "door.open", fingerprint({}), on_durable=hold)
    assert holding.wait(WAIT)


def test_full_queue_refuses_begin_but_never_finish(path: Path) -> None:
    release = threading.Event()
    with KeyStore(path, max_queue=3) as store:
        try:
            hold_writer(store, release)  # from here on, writes stay queued
            for key in ("a", "b", "c"):
                store.begin(key, "door.open", fingerprint({}), on_durable=Durable())
            with pytest.raises(KeyStoreFull, match="queue full"):
                store.begin("d", "door.open", fingerprint({}), on_durable=Durable())
            assert store.lookup("d") is None
            for key in ("a", "b", "c"):
                store.finish(key, Outcome.success(key))  # accepted beyond the bound
        finally:
            release.set()
        assert store.flush(WAIT)
        begin(store, "d")


def test_a_failed_write_reports_its_error_and_the_store_recovers(path: Path) -> None:
    with KeyStore(path, busy_timeout=0.05) as store:
        begin(store, "k1")
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        failed = Durable()
        store.finish("k1", Outcome.success("retried"), on_durable=failed)
        error = failed.wait()
        assert isinstance(error, sqlite3.OperationalError) and "locked" in str(error)
        assert store.failed is error and store.failures == 1
        assert get(store, "k1").state == DONE
        other.execute("ROLLBACK")
        other.close()
        begin(store, "k2")  # this batch also retries the failed finish of k1
        assert store.failed is None and store.failures == 1
        finish(store, "k2", Outcome.success("kept"))
    with KeyStore(path) as store:
        assert store.interrupted_at_open == []
        assert get(store, "k1").outcome == Outcome.success("retried")
        assert get(store, "k2").state == DONE


def test_a_finish_that_never_reached_the_disk_reads_interrupted(path: Path) -> None:
    store = KeyStore(path, busy_timeout=0.05).open()
    begin(store, "k1")
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # held until the store is closed: every write fails
    try:
        failed = Durable()
        store.finish("k1", Outcome.success("lost"), on_durable=failed)
        assert isinstance(failed.wait(), sqlite3.OperationalError)
        store.close()  # retries once, fails again, returns
        assert store.failures == 2
    finally:
        other.execute("ROLLBACK")
        other.close()
    with KeyStore(path) as reopened:
        # on disk k1 is still "running": interrupted, never a wrong "done"
        assert reopened.interrupted_at_open == [Interrupted("k1", "door.open", "door")]


def test_a_failing_store_still_closes(path: Path) -> None:
    store = KeyStore(path, busy_timeout=0.05).open()
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    durable = Durable()
    store.begin("k1", "door.open", fingerprint({}), on_durable=durable)
    store.close()  # writes the queue (it fails), calls back, retries once, returns
    assert durable.event.is_set() and isinstance(durable.errors[0], sqlite3.OperationalError)
    assert store.failures == 2
    other.execute("ROLLBACK")
    other.close()


def test_closed_store_refuses_writes_and_close_is_idempotent(path: Path) -> None:
    store = KeyStore(path).open()
    begin(store, "k1")
    store.close()
    store.close()
    with pytest.raises(KeyStoreClosed):
        store.begin("k2", "door.open", fingerprint({}), on_durable=Durable())
    with pytest.raises(KeyStoreFull):  # a closed store answers busy, like a full one
        store.finish("k1", Outcome.success(1))
    with pytest.raises(KeyStoreClosed):
        KeyStore(path).begin("k3", "door.open", fingerprint({}), on_durable=Durable())


def test_one_store_per_file(path: Path) -> None:
    with KeyStore(path), pytest.raises(KeyStoreLocked, match="in use"):
        KeyStore(path).open()
    with KeyStore(path) as store:  # released by close
        assert len(store) == 0


def test_a_callback_that_raises_does_not_stop_the_writer(store: KeyStore) -> None:
    def broken(_error: BaseException | None) -> None:
        raise RuntimeError("callback bug")

    store.begin("k1", "door.open", fingerprint({}), on_durable=broken)
    begin(store, "k2")


def test_new_files_are_private(tmp_path: Path) -> None:
    path = tmp_path / "new" / "dir" / KEYS_FILE
    with KeyStore(path):
        pass
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_not_a_database_is_a_clear_error(path: Path) -> None:
    ensure_private_dir(path.parent)
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(KeyStoreError, match="cannot open key store"):
        KeyStore(path).open()
    path.unlink()
    with KeyStore(path) as store:  # the failed open released its lock
        assert len(store) == 0


def test_an_unusable_directory_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(KeyStoreError, match="cannot open key store"):
        KeyStore(tmp_path / "file" / KEYS_FILE).open()


def test_default_state_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert default_state_dir({"STATE_DIRECTORY": "/var/lib/statelink"}) == Path(
        "/var/lib/statelink"
    )
    assert default_state_dir({"STATE_DIRECTORY": "/var/lib/a:/var/lib/b"}) == Path("/var/lib/a")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_state_dir({}) == tmp_path / ".local" / "state" / "statelink"
    monkeypatch.setenv("STATE_DIRECTORY", "/srv/state")
    assert default_state_dir() == Path("/srv/state")


def test_a_store_without_a_path_lives_in_memory(tmp_path: Path) -> None:
    with KeyStore(None) as store:
        assert store.memory
        begin(store, "k1")
        finish(store, "k1", Outcome.success(1))
        assert get(store, "k1").outcome == Outcome.success(1)
        assert KeyStore(None).open().lookup("k1") is None  # each its own; nothing on disk
    with KeyStore(None) as store:
        assert store.lookup("k1") is None  # nothing survives close


def test_a_locked_store_names_the_process_that_holds_it(path: Path) -> None:
    with KeyStore(path), pytest.raises(KeyStoreLocked, match=f"in use by process {os.getpid()}"):
        KeyStore(path).open()
