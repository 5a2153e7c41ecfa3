"""Fixtures of the loop tests (scheduler, canary, Prometheus, compose, demo).

`prometheus_tools` installs Debian's ``prometheus`` package when the binaries are missing (the
project's own test setup: ``apt-get install -y --no-install-recommends prometheus``), without
letting the package start its system service, and fails clearly if it cannot.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_POLICY_RC = Path("/usr/sbin/policy-rc.d")


@dataclass(frozen=True)
class PrometheusTools:
    prometheus: str
    promtool: str


def _which() -> PrometheusTools | None:
    p, t = shutil.which("prometheus"), shutil.which("promtool")
    return PrometheusTools(p, t) if p and t else None


def _apt(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(["apt-get", *args], capture_output=True, text=True, env=env, timeout=600)


def install_prometheus() -> PrometheusTools:
    found = _which()
    if found:
        return found
    if os.geteuid() != 0:
        pytest.fail("prometheus/promtool are missing and the tests are not root: "
                    "run `apt-get install -y --no-install-recommends prometheus` first")
    # policy-rc.d exit 101 = "do not start services": the package must not launch a system
    # Prometheus (the tests run their own, on loopback, with a temporary config).
    created = False
    if not _POLICY_RC.exists():
        _POLICY_RC.write_text("#!/bin/sh\nexit 101\n")
        _POLICY_RC.chmod(0o755)
        created = True
    try:
        r = _apt("install", "-y", "--no-install-recommends", "prometheus")
        if r.returncode != 0:
            u = _apt("update")
            r = _apt("install", "-y", "--no-install-recommends", "prometheus")
            if r.returncode != 0:
                pytest.fail("could not install Debian's prometheus package "
                            f"(apt-get update rc={u.returncode}): {(u.stderr + r.stderr)[-1500:]}")
    finally:
        if created:
            _POLICY_RC.unlink(missing_ok=True)
    found = _which()
    if not found:
        pytest.fail("apt-get installed 'prometheus' but the prometheus/promtool binaries are not on PATH")
    return found


@pytest.fixture(scope="session")
def prometheus_tools() -> PrometheusTools:
    return install_prometheus()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout_s: float = 60.0, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-2000:] if log and log.exists() else ""
            raise AssertionError(f"process for {url} exited with {proc.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status < 500:
                    return
        except Exception:
            time.sleep(0.2)
    tail = log.read_text()[-2000:] if log and log.exists() else ""
    raise AssertionError(f"{url} not ready within {timeout_s}s\n{tail}")


def stop_process_groups(procs) -> None:
    """SIGINT every process group still running, then wait for each (SIGKILL after 20 s)."""
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGINT)
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


@pytest.fixture
def run_prometheus(prometheus_tools, tmp_path):
    """Start a real Prometheus on a free loopback port scraping the given targets every second.

    ``start({"job": ["127.0.0.1:PORT", ...]}, rule_files=[...], honor_labels={"job"}) -> base URL``
    (``honor_labels``: jobs whose targets' own job/instance labels are kept, as for a Pushgateway);
    stopped at teardown."""
    procs: list[subprocess.Popen] = []

    def start_plain(targets: dict[str, list[str]], rule_files: list[Path] = (),
                    honor_labels: set[str] = frozenset()) -> str:
        port = free_port()
        cfg = tmp_path / "prometheus.yml"
        lines = ["global:", "  scrape_interval: 1s", "  evaluation_interval: 1s"]
        if rule_files:
            lines.append("rule_files:")
            lines += [f"  - {Path(p).resolve()}" for p in rule_files]
        lines.append("scrape_configs:")
        for job, tgts in targets.items():
            lines += [f"  - job_name: {job}", *(["    honor_labels: true"] if job in honor_labels else []),
                      "    static_configs:", "      - targets: [" + ", ".join(f'"{t}"' for t in tgts) + "]"]
        cfg.write_text("\n".join(lines) + "\n")
        log = tmp_path / "prometheus.log"
        proc = subprocess.Popen(
            [prometheus_tools.prometheus, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h"],
            stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/-/ready", 60, proc, log)
        return url

    yield start_plain
    for p in procs:
        p.terminate()
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@pytest.fixture(scope="session")
def demo_base(tmp_path_factory) -> Path:
    """The base model exactly as `looprl init` builds it for the demo (default pre-training; ~40 s
    once per session): the end-to-end loop test must learn on what a newcomer gets."""
    from looprl.ops.core.config import load_config
    from looprl.ops.sim.base import create_base

    root = tmp_path_factory.mktemp("demo-base")
    return create_base(load_config(environ={}, workspace=root / "ws"), out_dir=root / "base", progress=False)
