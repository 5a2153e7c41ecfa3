"""The process supervisor of `looprl demo`: restart with backoff, ordered clean shutdown, and no
orphans when the supervisor itself dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from looprl.ops.runners import process_gone
from looprl.ops.supervisor import Service, Supervisor, file_ready

PY = sys.executable


def service_script(tmp_path: Path, name: str, ignore_signals: bool = False) -> list[str]:
    """A fake stage: writes <name>.ready, logs 'stopped <name>' to stops.log on SIGINT."""
    code = textwrap.dedent(f"""
        import os, signal, sys, time
        from pathlib import Path
        d = Path({str(tmp_path)!r})
        def stop(*_):
            with open(d / "stops.log", "a") as f:
                f.write("stopped {name}\\n")
            sys.exit(0)
        if {ignore_signals!r}:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        else:
            signal.signal(signal.SIGINT, stop)
            signal.signal(signal.SIGTERM, stop)
        (d / "{name}.ready").write_text(str(os.getpid()))
        while True:
            time.sleep(0.1)
    """)
    return [PY, "-c", code]


def wait_for(pred, timeout=15.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_sigkilled_service_is_restarted_with_backoff(tmp_path):
    svc = Service("ingest", service_script(tmp_path, "ingest"), ready=file_ready(tmp_path / "ingest.ready"))
    before = REGISTRY.get_sample_value("looprl_supervisor_restarts_total", {"service": "ingest"}) or 0.0
    with Supervisor([svc], tmp_path / "logs", backoff_initial_s=0.2, backoff_max_s=5, stable_after_s=60) as sup:
        sup.start_all()
        pid1 = sup.pid("ingest")
        (tmp_path / "ingest.ready").unlink()
        sup.kill("ingest")
        wait_for(lambda: sup.pid("ingest") not in (None, pid1), what="first restart")
        wait_for(lambda: (tmp_path / "ingest.ready").exists(), what="restarted service ready")
        pid2 = sup.pid("ingest")
        sup.kill("ingest")  # a second quick death: the delay doubles (0.2 -> 0.4 s)
        wait_for(lambda: sup.pid("ingest") not in (None, pid2), what="second restart")
        assert sup.procs["ingest"].quick_deaths == 2
        assert sup.restarts("ingest") == 2 and process_gone(pid1) and process_gone(pid2)
    after = REGISTRY.get_sample_value("looprl_supervisor_restarts_total", {"service": "ingest"})
    assert after - before == 2
    assert "==== start" in (tmp_path / "logs/ingest.log").read_text()


def test_backoff_grows_for_a_crash_looping_service(tmp_path):
    svc = Service("crashy", ["/bin/sh", "-c", "exit 3"])
    with Supervisor([svc], tmp_path / "logs", backoff_initial_s=0.05, backoff_max_s=0.2, stable_after_s=60) as sup:
        sup.start_all(wait_ready=False)
        wait_for(lambda: len(sup.procs["crashy"].delays) >= 5, what="five crashes")
        assert sup.procs["crashy"].delays[:5] == [0.05, 0.1, 0.2, 0.2, 0.2]  # doubled, then capped
        assert sup.procs["crashy"].last_exit == 3


def test_a_service_that_ran_long_enough_restarts_fast_again(tmp_path):
    svc = Service("stable", service_script(tmp_path, "stable"), ready=file_ready(tmp_path / "stable.ready"))
    with Supervisor([svc], tmp_path / "logs", backoff_initial_s=0.05, stable_after_s=0.5) as sup:
        sup.start_all()
        for i in range(3):
            time.sleep(0.8)  # longer than stable_after_s: each death counts as the first
            pid = sup.pid("stable")
            sup.kill("stable")
            wait_for(lambda: sup.pid("stable") not in (None, pid), what=f"restart {i}")
        assert sup.procs["stable"].delays == [0.05, 0.05, 0.05]


def test_stop_is_ordered_and_escalates(tmp_path):
    names = ["broker", "ingest", "serve"]
    services = [Service(n, service_script(tmp_path, n), ready=file_ready(tmp_path / f"{n}.ready")) for n in names]
    services.append(Service("stubborn", service_script(tmp_path, "stubborn", ignore_signals=True),
                            ready=file_ready(tmp_path / "stubborn.ready"), stop_timeout_s=1.0))
    sup = Supervisor(services, tmp_path / "logs")
    sup.start_all()
    pids = {n: sup.pid(n) for n in names + ["stubborn"]}
    t0 = time.monotonic()
    codes = sup.stop()
    assert time.monotonic() - t0 < 10
    # reverse start order: the last started (serve) stops first, the broker last
    assert (tmp_path / "stops.log").read_text().split("\n")[:3] == ["stopped serve", "stopped ingest", "stopped broker"]
    assert codes["stubborn"] == -signal.SIGKILL
    assert all(process_gone(p) for p in pids.values())
    # nothing is restarted after a stop
    time.sleep(1.0)
    assert all(sup.pid(n) is None for n in pids)


SUPERVISOR_MAIN = """
import signal, sys, threading, time
from pathlib import Path
from looprl.ops.supervisor import Service, Supervisor, file_ready
d = Path(sys.argv[1])
services = [Service(n, [sys.executable, "-c", open(d / f"{n}.py").read()], ready=file_ready(d / f"{n}.ready"))
            for n in ("a", "b")]
sup = Supervisor(services, d / "logs", backoff_initial_s=0.2)
stop = threading.Event()
for s in (signal.SIGINT, signal.SIGTERM):
    signal.signal(s, lambda *_: stop.set())
sup.start_all()
(d / "pids").write_text(" ".join(str(sup.pid(n)) for n in ("a", "b")))
stop.wait(60)
sup.stop()
(d / "clean").write_text("ok")
"""


@pytest.fixture
def supervisor_proc(tmp_path):
    for n in ("a", "b"):
        (tmp_path / f"{n}.py").write_text(service_script(tmp_path, n)[2])
    (tmp_path / "main.py").write_text(SUPERVISOR_MAIN)
    p = subprocess.Popen([PY, str(tmp_path / "main.py"), str(tmp_path)], start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=open(tmp_path / "main.log", "wb"))
    wait_for(lambda: (tmp_path / "pids").exists(), timeout=30, what="supervisor start")
    pids = [int(x) for x in (tmp_path / "pids").read_text().split()]
    yield p, pids
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def test_sigint_to_the_process_group_shuts_everything_down_cleanly(tmp_path, supervisor_proc):
    p, pids = supervisor_proc
    os.killpg(p.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    assert p.wait(timeout=30) == 0
    assert (tmp_path / "clean").read_text() == "ok"
    assert sorted((tmp_path / "stops.log").read_text().split("\n")[:2]) == ["stopped a", "stopped b"]
    assert all(process_gone(pid) for pid in pids)


def test_children_die_when_the_supervisor_is_sigkilled(tmp_path, supervisor_proc):
    p, pids = supervisor_proc
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    wait_for(lambda: all(process_gone(pid) for pid in pids), timeout=10, what="orphans to exit")


def test_a_crash_looping_service_is_restarted_while_starting_and_the_wait_can_give_up(tmp_path):
    from looprl.ops.supervisor import ServiceFailed

    svc = Service("serve", ["/bin/sh", "-c", "echo 'looprl serving serve: no checkpoint' >&2; exit 2"],
                  ready=file_ready(tmp_path / "never"), ready_timeout_s=30)
    with Supervisor([svc], tmp_path / "logs", backoff_initial_s=0.05, backoff_max_s=0.1, stable_after_s=60) as sup:
        sup.start_monitor()  # as the demo does before starting its stages
        t0 = time.monotonic()
        assert sup.start("serve", give_up=lambda: sup.restarts("serve") > 3) is False
        assert time.monotonic() - t0 < 15 and sup.restarts("serve") == 4
        assert sup.procs["serve"].last_exit == 2
        assert (tmp_path / "logs/serve.log").read_text().count("looprl serving serve: no checkpoint") >= 4
    quick = Service("quick", ["/bin/sh", "-c", "exit 0"], ready=file_ready(tmp_path / "never"), ready_timeout_s=0.5)
    with Supervisor([quick], tmp_path / "logs2") as sup, pytest.raises(ServiceFailed) as e:
        sup.start("quick")
    assert e.value.service == "quick"
