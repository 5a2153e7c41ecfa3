"""Start a `looprl` server process on port 0 and learn the port it bound from its log: the line
``"<what> listening"`` (``looprl.ops.core.listen``) carries ``url`` and ``port``."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import threading
import time


class LogTail:
    """Reads a process's stderr (JSON log lines and anything else) in a thread, so a test can wait
    for one line with a deadline and still show everything the process said when it fails."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.lines: list[str] = []
        self._q: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self._q.put(line.rstrip("\n"))
        self._q.put(None)

    def text(self) -> str:
        return "\n".join(self.lines)

    def wait_closed(self, timeout: float = 10.0) -> None:
        """Take in what the process wrote until it closed stderr (it has exited)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._q.get(timeout=left)
            except queue.Empty:
                return
            if line is None:
                return
            self.lines.append(line)

    def wait_for(self, msg: str, timeout: float = 90.0) -> dict:
        """The first JSON log record whose ``msg`` is ``msg``; fails with the log so far if the
        process exits or the deadline passes first."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"no {msg!r} log line within {timeout:.0f}s:\n{self.text()[-3000:]}"
            try:
                line = self._q.get(timeout=left)
            except queue.Empty:
                continue
            assert line is not None, f"process exited ({self.proc.poll()}) before {msg!r}:\n{self.text()[-3000:]}"
            self.lines.append(line)
            if line.startswith("{"):
                rec = json.loads(line)
                if rec.get("msg") == msg:
                    return rec


def listening(tail: LogTail, what: str, timeout: float = 90.0) -> tuple[str, int]:
    """(url, port) of the ``"<what> listening"`` line; the port is a real one, never 0."""
    rec = tail.wait_for(f"{what} listening", timeout)
    assert rec["port"] > 0 and f":{rec['port']}" in rec["url"], rec
    return rec["url"], rec["port"]


def stop(proc: subprocess.Popen, timeout: float = 20.0) -> int:
    """SIGINT a looprl process, as Ctrl-C would; kill it if it has not exited within ``timeout``.
    Returns its exit status."""
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()
