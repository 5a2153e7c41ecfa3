"""The local Ray cluster looprl starts (no ``policy.ray_address``: the scheduler's, a policy
job's) listens on loopback only and takes only callers holding its token.

Ray on Linux binds its servers to every interface unless the node IP is exactly 127.0.0.1 (``ss``
showed gcs_server and raylet on ``*:port``), and anyone who can reach them runs code as the
looprl user; on loopback that is still every user of the machine, hence the token. The cluster is
started in a child process, the way `init_ray` starts it and with the environment a production
process has (no RAY_AUTH_MODE), with an actor so worker processes exist too; every listening
socket of that process tree is inspected.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys

import psutil
import pytest
import ray
from ray._private import ray_constants

from looprl.ops.core.config import is_loopback, load_config
from looprl.policy import ray_backend

DRIVER = """
import os
import sys
import ray
from looprl.ops.core.config import load_config
from looprl.policy.ray_backend import init_ray

init_ray(load_config(environ={}, workspace=sys.argv[1]), num_cpus=1)


@ray.remote(num_cpus=1)
class Echo:
    def ping(self):
        return "pong"

    def niceness(self):
        return os.nice(0)


echo = Echo.remote()
assert ray.get(echo.ping.remote(), timeout=300) == "pong"
print(ray.get_runtime_context().gcs_address, ray.get(echo.niceness.remote(), timeout=60), os.nice(0), flush=True)
sys.stdin.readline()  # the cluster stays up until the tests have looked
ray.shutdown()
"""


def _listening(procs: list[psutil.Process]) -> list[tuple[str, str, int]]:
    """(process name, ip, port) of every listening TCP socket and bound UDP socket."""
    found = []
    for p in procs:
        try:
            conns = p.net_connections(kind="inet")
            name = p.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for c in conns:
            listening = c.status == psutil.CONN_LISTEN if c.type == socket.SOCK_STREAM else not c.raddr
            if listening:
                found.append((name, c.laddr.ip, c.laddr.port))
    return found


def _routable_ipv4() -> str | None:
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not ipaddress.ip_address(a.address).is_loopback:
                return a.address
    return None


# A GCS client, as every Ray driver and worker opens one first; it sends the token of its
# environment when RAY_AUTH_MODE=token.
PROBE = """
import sys
from ray._raylet import GcsClient
from ray.exceptions import AuthenticationError

try:
    GcsClient(address=sys.argv[1])
    print("accepted")
except AuthenticationError:
    print("refused")
"""


def _gcs_answer(address: str, token: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token} if token else {"RAY_AUTH_MODE": "disabled"})
    r = subprocess.run([sys.executable, "-c", PROBE, address], capture_output=True, text=True, env=env, timeout=120)
    return r.stdout.strip().splitlines()[-1] if r.stdout.strip() else f"no answer: {r.stderr[-500:]}"


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """(gcs address, the session's processes, its HOME, (a worker's niceness, the driver's))."""
    ws, home = tmp_path_factory.mktemp("ray-loopback"), tmp_path_factory.mktemp("home")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env["HOME"] = str(home)
    with open(ws / "driver.err", "w") as errors:
        proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(ws)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=errors, text=True, env=env)
        try:
            line = proc.stdout.readline().strip()
            if not line:
                proc.wait(timeout=30)
                log = (ws / "driver.err").read_text()[-3000:]
                pytest.fail(f"local Ray did not start (rc={proc.returncode}):\n{log}")
            driver = psutil.Process(proc.pid)
            address, worker_nice, driver_nice = line.split()
            yield address, [driver, *driver.children(recursive=True)], home, (int(worker_nice), int(driver_nice))
        finally:
            if proc.poll() is None:
                proc.stdin.write("\n")
                proc.stdin.flush()
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def test_every_socket_of_the_local_ray_session_is_on_loopback(session):
    gcs_address, procs, _, _ = session
    assert gcs_address.startswith("127.0.0.1:"), gcs_address
    sockets = _listening(procs)
    names = {name for name, _, _ in sockets}
    # not vacuous: the control plane and the actor's worker listen, all inspected
    assert {"gcs_server", "raylet", "ray::Echo"} <= names, sorted(names)
    exposed = [s for s in sockets if not is_loopback(s[1])]
    assert not exposed, f"Ray listens beyond loopback: {exposed}"


def test_the_gcs_refuses_connections_on_the_machines_routable_address(session):
    ip = _routable_ipv4()
    if ip is None:
        pytest.skip("this machine has no non-loopback IPv4 address to try")
    gcs_port = int(session[0].rpartition(":")[2])
    with pytest.raises(OSError):
        socket.create_connection((ip, gcs_port), timeout=5).close()


def test_the_local_ray_refuses_callers_without_its_token(session):
    gcs_address, procs, home, _ = session
    gcs = next(p for p in procs if p.name() == "gcs_server")
    env = gcs.environ()
    assert env.get("RAY_AUTH_MODE") == "token" and len(env.get("RAY_AUTH_TOKEN", "")) >= 32
    assert _gcs_answer(gcs_address, None) == "refused"
    assert _gcs_answer(gcs_address, "0" * 64) == "refused"
    assert _gcs_answer(gcs_address, env["RAY_AUTH_TOKEN"]) == "accepted"  # the token decides, not the call
    # the token lives in the cluster's environment only, never written to the home directory
    assert not (home / ".ray").exists()


def test_the_local_rays_workers_run_at_the_drivers_niceness(session):
    # Ray's default is 15: PPO then ran only when serving and the reward updater left a core idle
    worker_nice, driver_nice = session[3]
    assert worker_nice == driver_nice, session[3]


def test_a_local_ray_that_comes_up_beyond_loopback_is_shut_down_and_refused(monkeypatch, tmp_path):
    """Should a Ray release stop honouring the loopback node IP, jobs must not run on it."""
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(("init", kw.get("_node_ip_address"))))
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append(("shutdown", None)))
    monkeypatch.setattr(ray, "get_runtime_context", lambda: type("Ctx", (), {"gcs_address": "192.0.2.2:6379"})())
    switch = ray_constants.ENABLE_RAY_CLUSTER
    with pytest.raises(ray_backend.PolicyJobError, match="came up on 192.0.2.2:6379, not on 127.0.0.1"):
        ray_backend.init_ray(load_config(environ={}, workspace=tmp_path), num_cpus=1)
    assert calls == [("init", "127.0.0.1"), ("shutdown", None)]
    assert ray_constants.ENABLE_RAY_CLUSTER == switch  # Ray's own switch is left as it was
