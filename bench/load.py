"""Load generator processes: raw loopback sockets speaking JSON lines, bounded in time.

One load process drives ``conns`` connections from one epoll loop. Each connection keeps
``depth`` requests in flight (``depth=1``: one request in flight, a new one as soon as the reply
arrives; ``depth=256``: pipelined). With ``keyed=True`` every request carries a fresh
idempotency key (top-level ``"key"``), as the workflow runner's commands do. With
``callback=True`` (reference 1) the process also listens on a port, announces it with
``rpc.hello {"callback_port": P}`` and takes each reply from a new connection the server makes
to that port.

Timeline after the parent says "go": ``warmup`` seconds unmeasured, ``duration`` seconds
measured (replies completed in the window count; their latencies are recorded), then no new
requests and at most ``drain`` seconds to collect the replies still due. A request without a
reply by then is reported as ``lost`` (it should never happen: exactly one reply per request).

The parent talks to each process over a pipe: the child sends ``("ready", info)`` once its
connections are open, waits for ``"go"``, and sends ``("result", dict)`` at the end.
"""

from __future__ import annotations

import json
import os
import resource
import select
import socket
import time
from array import array
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from typing import Any

HOST = "127.0.0.1"
#: bytes per recv: below glibc's mmap threshold (128 KiB). A recv(256 KiB) allocates its result
#: with mmap and frees it with munmap on every call: ~18 us per call on the benchmark machine.
RECV_SIZE = 65536
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class LoadSpec:
    port: int
    conns: int = 1
    depth: int = 1
    method: str = "bench.echo"
    params: Any = ("x",)
    warmup: float = 0.5
    duration: float = 3.0
    drain: float = 5.0
    callback: bool = False
    cpu: int | None = None
    server_pid: int | None = None
    host: str = HOST
    #: send a fresh idempotency key (top-level "key") with every request
    keyed: bool = False

    def __post_init__(self) -> None:
        if self.host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("the benchmark only talks to loopback")
        if self.conns < 1 or self.depth < 1:
            raise ValueError("conns and depth must be at least 1")


def proc_cpu_seconds(pid: int | None) -> float | None:
    """user+system CPU seconds of a process (all its threads), from /proc."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs of the machine spent not idle (from /proc/stat)."""
    with open("/proc/stat", "rb") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / CLK_TCK


def self_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _connect(spec: LoadSpec) -> socket.socket:
    sock = socket.create_connection((spec.host, spec.port), timeout=10.0)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _recv_line(sock: socket.socket, deadline: float) -> bytes:
    data = b""
    while b"\n" not in data:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(RECV_SIZE)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        data += chunk
    return data


class _Driver:
    """The epoll loop of one load process."""

    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        self.socks: list[socket.socket] = []
        self.listener: socket.socket | None = None
        method = json.dumps(spec.method)
        params = json.dumps(list(spec.params) if isinstance(spec.params, tuple) else spec.params)
        self.prefix = b'{"jsonrpc":"2.0","id":'
        self.suffix = f',"method":{method},"params":{params}}}\n'.encode()
        # keyed: "key" = a random tag of this process + the request id: fresh on every
        # request, also across the load processes and rounds that share one server
        self.key_head = b',"key":"' + os.urandom(6).hex().encode() + b"-" if spec.keyed else b""
        # pid-based id base: ids are unique across the load processes of one measurement
        self.next_id = (os.getpid() % 100000) * 10_000_000 + 1

    def requests(self, ids: range) -> bytes:
        """The request lines with these ids, one after the other."""
        prefix, key_head, suffix = self.prefix, self.key_head, self.suffix
        if key_head:
            return b"".join(
                [prefix + (r := b"%d" % rid) + key_head + r + b'"' + suffix for rid in ids]
            )
        return b"".join([prefix + b"%d" % rid + suffix for rid in ids])

    def open(self) -> dict[str, Any]:
        spec = self.spec
        if spec.callback:
            self.listener = socket.create_server((HOST, 0), backlog=4096)
            port = self.listener.getsockname()[1]
        for _ in range(spec.conns):
            sock = _connect(spec)
            if spec.callback:
                hello = {
                    "jsonrpc": "2.0",
                    "id": "hello",
                    "method": "rpc.hello",
                    "params": {"callback_port": port},
                }
                sock.sendall(json.dumps(hello).encode() + b"\n")
                _recv_line(sock, time.monotonic() + 10.0)
            self.socks.append(sock)
        return {"conns": len(self.socks)}

    def close(self) -> None:
        for sock in self.socks:
            try:
                sock.close()
            except OSError:
                pass
        if self.listener is not None:
            self.listener.close()

    def run(self, t_go: float) -> dict[str, Any]:  # one hot loop, kept flat on purpose
        spec = self.spec
        perf = time.perf_counter
        perf_ns = time.perf_counter_ns
        ep = select.epoll()
        socks = self.socks
        by_fd: dict[int, int] = {}  # fd -> connection index (request connections)
        bufs: dict[int, bytes] = {}
        cb_socks: dict[int, socket.socket] = {}  # accepted reply connections (callback mode)
        for i, sock in enumerate(socks):
            sock.setblocking(False)
            by_fd[sock.fileno()] = i
            bufs[sock.fileno()] = b""
            ep.register(sock.fileno(), select.EPOLLIN)
        listener = self.listener
        listen_fd = -1
        if listener is not None:
            listener.setblocking(False)
            listen_fd = listener.fileno()
            ep.register(listen_fd, select.EPOLLIN)

        sent_at: dict[int, tuple[int, int]] = {}  # request id -> (send time ns, connection index)
        lat = array("q")
        t_measure = t_go + spec.warmup
        t_stop = t_measure + spec.duration
        ns_measure = int(t_measure * 1e9)
        ns_stop = int(t_stop * 1e9)
        completed = errors = sent = other = 0
        nid = self.next_id
        depth = spec.depth
        encode = self.requests
        sending = True
        cpu0: float | None = None
        cpu1: float | None = None
        srv0 = srv1 = None
        all0 = all1 = 0.0
        t_cpu0 = t_cpu1 = 0.0
        srv_pid = spec.server_pid

        def send(i: int, n: int) -> None:
            nonlocal nid, sent
            now = perf_ns()
            ids = range(nid, nid + n)
            nid += n
            for rid in ids:
                sent_at[rid] = (now, i)
            sent += n
            data = encode(ids)
            sock = socks[i]
            try:
                view = memoryview(data)
                while view:  # small writes; loopback buffers take them at once
                    try:
                        k = sock.send(view)
                    except BlockingIOError:
                        select.select([], [sock], [], 1.0)
                        continue
                    view = view[k:]
            except OSError:
                pass  # the connection died: its requests are reported as lost

        while perf() < t_go:
            time.sleep(min(0.001, max(0.0, t_go - perf())))
        for i in range(len(socks)):
            send(i, depth)

        refill: dict[int, int] = {}
        while True:
            now = perf()
            if sending and now >= t_stop:
                sending = False
            if cpu0 is None and now >= t_measure:
                cpu0, srv0, all0 = (
                    self_cpu_seconds(),
                    proc_cpu_seconds(srv_pid),
                    machine_busy_seconds(),
                )
                t_cpu0 = now
            if not sending and (not sent_at or now >= t_stop + spec.drain):
                break
            events = ep.poll(0.05)
            if not events:
                continue
            t_ns = perf_ns()
            in_window = ns_measure <= t_ns < ns_stop
            refill.clear()
            for fd, _ in events:
                if fd == listen_fd:
                    while True:
                        try:
                            back, _ = listener.accept()  # type: ignore[union-attr]
                        except BlockingIOError:
                            break
                        back.setblocking(False)
                        cb_socks[back.fileno()] = back
                        bufs[back.fileno()] = b""
                        ep.register(back.fileno(), select.EPOLLIN)
                    continue
                sock = cb_socks.get(fd) or socks[by_fd[fd]]
                try:
                    data = sock.recv(RECV_SIZE)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    ep.unregister(fd)
                    bufs.pop(fd, None)
                    if fd in cb_socks:
                        cb_socks.pop(fd).close()
                    continue
                buf = bufs[fd]
                if buf:
                    data = buf + data
                if data[-1] == 10:
                    lines = data.split(b"\n")
                    lines.pop()
                    bufs[fd] = b""
                else:
                    lines = data.split(b"\n")
                    bufs[fd] = lines.pop()
                for line in lines:
                    k = line.find(b'"id":')
                    if k < 0:
                        other += 1
                        continue
                    end = line.find(b",", k)
                    try:
                        rid = int(line[k + 5 : end])
                    except ValueError:
                        other += 1  # e.g. the hello reply or a notification
                        continue
                    entry = sent_at.pop(rid, None)
                    if entry is None:
                        other += 1
                        continue
                    if b'"error"' in line:
                        errors += 1
                    if in_window:
                        completed += 1
                        lat.append(t_ns - entry[0])
                    conn_index = entry[1]
                    refill[conn_index] = refill.get(conn_index, 0) + 1
            if sending:
                for i, n in refill.items():
                    send(i, n)
            if cpu0 is not None and cpu1 is None and not sending:
                cpu1, srv1, all1 = (
                    self_cpu_seconds(),
                    proc_cpu_seconds(srv_pid),
                    machine_busy_seconds(),
                )
                t_cpu1 = perf()
        if cpu0 is None:
            cpu0, srv0, all0 = self_cpu_seconds(), proc_cpu_seconds(srv_pid), machine_busy_seconds()
            t_cpu0 = perf()
        if cpu1 is None:
            cpu1, srv1, all1 = self_cpu_seconds(), proc_cpu_seconds(srv_pid), machine_busy_seconds()
            t_cpu1 = perf()
        ep.close()
        for back in cb_socks.values():
            back.close()
        span = max(1e-9, t_cpu1 - t_cpu0)
        return {
            "sent": sent,
            "completed": completed,
            "errors": errors,
            "lost": len(sent_at),
            "unmatched": other,
            "window": spec.duration,
            "latencies_ns": lat.tobytes(),
            "load_cpu": (cpu1 - cpu0) / span,
            "server_cpu": None if srv0 is None or srv1 is None else (srv1 - srv0) / span,
            "machine_cpu": (all1 - all0) / span,
        }


def load_process(spec_dict: dict[str, Any], pipe: Connection) -> None:
    """Entry point of one load process (multiprocessing target)."""
    spec = LoadSpec(**spec_dict)
    if spec.cpu is not None:
        try:
            os.sched_setaffinity(0, {spec.cpu})
        except OSError:
            pass
    driver = _Driver(spec)
    try:
        try:
            info = driver.open()
        except OSError as exc:
            pipe.send(("error", f"cannot connect: {exc}"))
            return
        pipe.send(("ready", info))
        if not pipe.poll(60.0):
            return
        message = pipe.recv()
        if not (isinstance(message, tuple) and message[0] == "go"):
            return
        pipe.send(("result", driver.run(message[1])))
    finally:
        driver.close()
        pipe.close()


def hold_process(spec_dict: dict[str, Any], pipe: Connection) -> None:
    """Open ``conns`` connections, make one request on each (so the server has set each one
    up), report, and hold them idle until the parent says "release" (at most 60 s)."""
    spec = LoadSpec(**spec_dict)
    socks: list[socket.socket] = []
    try:
        try:
            for i in range(spec.conns):
                sock = _connect(spec)
                socks.append(sock)
                sock.sendall(
                    b'{"jsonrpc":"2.0","id":%d,"method":"bench.echo","params":["x"]}\n' % i
                )
            deadline = time.monotonic() + 30.0
            for sock in socks:
                _recv_line(sock, deadline)
        except OSError as exc:
            pipe.send(("error", f"after {len(socks)} connections: {exc}"))
            return
        pipe.send(("held", len(socks)))
        pipe.poll(60.0)
    finally:
        for sock in socks:
            sock.close()
        pipe.close()


def spec_dict(spec: LoadSpec) -> dict[str, Any]:
    return asdict(spec)
