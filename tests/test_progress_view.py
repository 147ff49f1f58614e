"""The live view on a real pseudo-terminal: Ctrl-C (SIGINT) during ``statelink demo`` must
leave a clean screen (one final frame of the view, one summary line), not old frames.

The screen is rebuilt from the bytes with a tiny emulator of the control sequences rich's
live display uses (cursor up, erase line, carriage return, colours)."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import ROOT, WAIT

pty = pytest.importorskip("pty")  # POSIX only

ROWS, COLUMNS = 40, 120
_CSI = re.compile(r"\x1b\[([0-9;?]*)([A-Za-z])")


def screen_lines(output: bytes) -> list[str]:
    """What a terminal of :data:`COLUMNS` columns shows after ``output`` (scrollback
    included): rich moves up with ``ESC[nA``, erases with ``ESC[2K``; colours are ignored."""
    lines: list[list[str]] = [[]]
    row = col = 0
    chars = output.decode("utf-8", "replace")
    i = 0
    while i < len(chars):
        ch = chars[i]
        if ch == "\x1b":
            match = _CSI.match(chars, i)
            if match is None:
                i += 1
                continue
            arg, op = match.group(1), match.group(2)
            n = int(arg) if arg.isdigit() else 1
            if op == "A":
                row = max(0, row - n)
            elif op == "B":
                row += n
            elif op == "K":  # 2K: the whole line; K / 0K: to its end
                lines[row] = [] if arg == "2" else lines[row][:col]
            elif op == "G":
                col = n - 1
            i = match.end()
            continue
        if ch == "\r":
            col = 0
        elif ch == "\n":
            row += 1
            col = 0
        else:
            if col >= COLUMNS:
                row, col = row + 1, 0
            while len(lines) <= row:
                lines.append([])
            line = lines[row]
            line.extend(" " * (col - len(line)))
            if col < len(line):
                line[col] = ch
            else:
                line.append(ch)
            col += 1
        while len(lines) <= row:
            lines.append([])
        i += 1
    return ["".join(line).rstrip() for line in lines]


def test_screen_lines_follows_rich_redraws() -> None:
    frame1 = b"state  a\r\nstep   1"
    redraw = b"\r\x1b[2K\x1b[1A\x1b[2K"
    frame2 = b"state  b\r\nstep   2\r\n"
    assert screen_lines(frame1 + redraw + frame2) == ["state  b", "step   2", ""]


def test_ctrl_c_during_demo_leaves_one_frame_and_one_summary(tmp_path: Path) -> None:
    import fcntl
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
    env = dict(os.environ, TERM="xterm-256color", COLUMNS=str(COLUMNS), LINES=str(ROWS))
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "controller", "demo", "--state-dir", str(tmp_path)],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        cwd=ROOT,
        env=env,
        start_new_session=True,
    )
    os.close(slave)
    output = b""
    interrupted = False
    deadline = time.monotonic() + WAIT
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                output += chunk
            # the calibration reports progress: the run is in progress, mid-command
            if not interrupted and b"step 1/10" in output:
                proc.send_signal(signal.SIGINT)
                interrupted = True
            if proc.poll() is not None and not ready:
                break
        code = proc.wait(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    assert interrupted, output.decode(errors="replace")[-2000:]
    assert code == 130
    screen = [line for line in screen_lines(output) if line]
    shown = "\n".join(screen)
    assert sum(line.lstrip().startswith("workflow  demo") for line in screen) == 1, shown
    assert sum(line.lstrip().startswith("state  ") for line in screen) == 1, shown
    summaries = [line for line in screen if line.startswith("workflow demo (run ")]
    assert len(summaries) == 1 and "aborted" in summaries[0], shown
    assert screen[-1] == summaries[0], shown  # the summary is the last thing on screen
    assert sum("aborting (SIGINT)" in line for line in screen) == 1, shown
