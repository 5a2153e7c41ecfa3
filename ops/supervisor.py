"""A small process supervisor: the stages of `looprl demo` as separate processes, restarted with
backoff when they die, stopped cleanly (in reverse start order) on Ctrl-C / SIGTERM.

Each service is a command line (in the demo: the same `looprl <cmd>` a production deployment
runs under docker-compose or systemd). Children run in their own session, so a Ctrl-C in the
terminal reaches only the supervisor, which then stops them in order (the simulator before
the server, ingest before the broker) instead of all at once. Children also get
``PR_SET_PDEATHSIG``: if the supervisor itself is SIGKILLed they are terminated too, so no
orphan keeps a port or the Ray cluster.

Restart backoff: a service that dies within ``stable_after_s`` of its start waits
``backoff_initial_s * 2^k`` (capped at ``backoff_max_s``) before its k-th consecutive restart; one
that ran longer is restarted after ``backoff_initial_s``.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from prometheus_client import Counter, Gauge

from looprl.ops.core.log import get_logger
from looprl.ops.core.retry import backoff_seconds

log = get_logger(__name__)

RESTARTS = Counter("looprl_supervisor_restarts_total", "Service restarts after an unexpected exit", ["service"])
UP = Gauge("looprl_supervisor_up", "1 while the service's process is alive", ["service"])

_PR_SET_PDEATHSIG = 1


def child_preexec() -> None:
    """In a child after fork: die (SIGTERM) when the parent goes away, even by SIGKILL."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # not Linux: orphans are possible, clean shutdown still works
        pass


# --------------------------------------------------------------------------- readiness probes
def http_ready(url: str, timeout_s: float = 1.0) -> Callable[[], bool]:
    def probe() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as r:
                return 200 <= r.status < 500
        except Exception:
            return False

    return probe


def tcp_ready(host: str, port: int) -> Callable[[], bool]:
    def probe() -> bool:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            return False

    return probe


def file_ready(path: Path) -> Callable[[], bool]:
    return lambda: Path(path).exists()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- services
@dataclass
class Service:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    ready: Callable[[], bool] | None = None
    ready_timeout_s: float = 180.0
    stop_timeout_s: float = 20.0
    restart: bool = True


@dataclass
class _Proc:
    service: Service
    popen: subprocess.Popen | None = None
    started_at: float = 0.0
    restarts: int = 0
    quick_deaths: int = 0
    restart_at: float | None = None
    last_exit: int | None = None
    delays: list[float] = field(default_factory=list)  # backoff chosen for each restart


class ServiceFailed(RuntimeError):
    """A service did not become ready (the message names it and points at its log)."""

    def __init__(self, message: str, service: str | None = None):
        super().__init__(message)
        self.service = service


class Supervisor:
    def __init__(self, services: list[Service], log_dir: Path, *, backoff_initial_s: float = 1.0,
                 backoff_max_s: float = 30.0, stable_after_s: float = 30.0, base_env: dict[str, str] | None = None):
        names = [s.name for s in services]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate service names: {names}")
        self.procs = {s.name: _Proc(s) for s in services}
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.backoff_initial_s, self.backoff_max_s, self.stable_after_s = backoff_initial_s, backoff_max_s, stable_after_s
        self.base_env = dict(os.environ if base_env is None else base_env)
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._monitor: threading.Thread | None = None

    # ---- inspection
    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def pid(self, name: str) -> int | None:
        p = self.procs[name].popen
        return p.pid if p is not None and p.poll() is None else None

    def alive(self, name: str) -> bool:
        return self.pid(name) is not None

    def restarts(self, name: str) -> int:
        return self.procs[name].restarts

    def log_tail(self, name: str, chars: int = 2000) -> str:
        try:
            return self.log_path(name).read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    # ---- starting
    def _spawn(self, pr: _Proc) -> None:
        s = pr.service
        out = open(self.log_path(s.name), "ab")
        out.write(f"\n==== start {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(s.argv)}\n".encode())
        out.flush()
        try:
            pr.popen = subprocess.Popen(s.argv, env={**self.base_env, **s.env}, stdout=out, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=child_preexec)
        finally:
            out.close()  # the child holds its own descriptor
        pr.started_at, pr.restart_at = time.monotonic(), None
        UP.labels(service=s.name).set(1)
        log.info("service started", service=s.name, pid=pr.popen.pid)

    def start(self, name: str, wait_ready: bool = True, give_up: Callable[[], bool] | None = None) -> bool:
        """Start ``name`` (if not running) and wait until it is ready; False if ``give_up`` said so
        (or the supervisor is stopping) first."""
        with self._lock:
            pr = self.procs[name]
            if pr.popen is not None and pr.popen.poll() is None:
                return True
            self._spawn(pr)
        return self.wait_ready(name, give_up) if wait_ready else True

    def wait_ready(self, name: str, give_up: Callable[[], bool] | None = None) -> bool:
        """Poll the readiness probe until ready (True), ``give_up()`` or a stop (False), or the
        timeout (ServiceFailed). A service that dies meanwhile is restarted by the monitor, if it runs."""
        pr = self.procs[name]
        s = pr.service
        if s.ready is None:
            return True
        deadline = time.monotonic() + s.ready_timeout_s
        while time.monotonic() < deadline and not self._stopping.is_set():
            if s.ready():
                log.info("service ready", service=name)
                return True
            if pr.popen is not None and pr.popen.poll() is not None and not s.restart:
                break
            if give_up is not None and give_up():
                return False
            time.sleep(0.25)
        if self._stopping.is_set():
            return False
        raise ServiceFailed(f"service {name} not ready within {s.ready_timeout_s:.0f}s; "
                            f"see {self.log_path(name)}:\n{self.log_tail(name, 1500)}", service=name)

    def start_all(self, wait_ready: bool = True) -> None:
        for name in self.procs:
            if self._stopping.is_set():
                return
            self.start(name, wait_ready=wait_ready)
        self.start_monitor()

    # ---- watching
    def check(self) -> None:
        """Restart services that died (after their backoff). Called by the monitor thread."""
        now = time.monotonic()
        with self._lock:
            if self._stopping.is_set():
                return
            for name, pr in self.procs.items():
                if pr.popen is None:
                    continue
                rc = pr.popen.poll()
                if rc is None:
                    if now - pr.started_at >= self.stable_after_s:
                        pr.quick_deaths = 0
                    continue
                if not pr.service.restart:
                    continue
                if pr.restart_at is None:
                    UP.labels(service=name).set(0)
                    pr.last_exit = rc
                    quick = now - pr.started_at < self.stable_after_s
                    pr.quick_deaths = pr.quick_deaths + 1 if quick else 0
                    # A service that ran stably (no quick deaths) restarts after the initial wait.
                    delay = backoff_seconds(max(1, pr.quick_deaths), self.backoff_initial_s, self.backoff_max_s)
                    pr.restart_at = now + delay
                    pr.delays.append(delay)
                    log.warning("service died; restarting", service=name, returncode=rc, restart_in_s=delay,
                                restarts=pr.restarts)
                elif now >= pr.restart_at:
                    pr.restarts += 1
                    RESTARTS.labels(service=name).inc()
                    self._spawn(pr)

    def start_monitor(self, interval_s: float = 0.5) -> None:
        if self._monitor is not None:
            return

        def loop() -> None:
            while not self._stopping.wait(interval_s):
                try:
                    self.check()
                except Exception as e:  # never let the watcher die silently
                    log.exception("supervisor check failed", error=str(e))

        # The monitor thread forks restarted children; PDEATHSIG follows the *thread*, so it must
        # live as long as the supervisor (it does: it only ends in stop()).
        self._monitor = threading.Thread(target=loop, name="supervisor", daemon=True)
        self._monitor.start()

    # ---- stopping
    def _signal(self, pr: _Proc, sig: int) -> None:
        if pr.popen is None or pr.popen.poll() is not None:
            return
        try:
            os.killpg(pr.popen.pid, sig)
        except ProcessLookupError:
            pass

    def stop_service(self, name: str) -> int | None:
        """SIGINT (Python's graceful path), then SIGTERM, then SIGKILL; returns the exit code."""
        pr = self.procs[name]
        if pr.popen is None:
            return None
        if pr.popen.poll() is not None:  # already stopped (retired, or died and not restarted yet)
            UP.labels(service=name).set(0)
            return pr.popen.returncode
        for sig, share in ((signal.SIGINT, 0.6), (signal.SIGTERM, 0.4), (signal.SIGKILL, None)):
            self._signal(pr, sig)
            try:
                rc = pr.popen.wait(timeout=pr.service.stop_timeout_s * share if share else 10)
                break
            except subprocess.TimeoutExpired:
                log.warning("service did not stop; escalating", service=name, signal=signal.Signals(sig).name)
        else:  # pragma: no cover - SIGKILL always ends a process
            rc = pr.popen.poll()
        UP.labels(service=name).set(0)
        log.info("service stopped", service=name, returncode=rc)
        return rc

    def retire(self, name: str) -> int | None:
        """Stop one service for good (no restart), e.g. the producers before draining the log."""
        with self._lock:
            self.procs[name].service.restart = False
            return self.stop_service(name)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> int | None:
        """Send ``sig`` to one service's process only (tests: simulate a crash). Returns its pid."""
        pid = self.pid(name)
        if pid is not None:
            os.kill(pid, sig)
        return pid

    def stop(self) -> dict[str, int | None]:
        self._stopping.set()
        with self._lock:
            codes = {}
            for name in reversed(list(self.procs)):
                codes[name] = self.stop_service(name)
        if self._monitor is not None and self._monitor is not threading.current_thread():
            self._monitor.join(timeout=5)
        return codes

    def __enter__(self) -> "Supervisor":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
