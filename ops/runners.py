"""How the scheduler runs a job and what it learns from a run. A `Runner` submits the job and returns
a `Handle` to poll; the `RunResult` holds the exit code, the details (the last JSON object the job
printed on stdout), the tail of its output (kept for failed runs) and whether it hit its timeout.

* `SubprocessRunner`: the job's argv as a local subprocess in its own session, killed with its
  process group at the timeout.
* `RayRunner`: a Ray actor on ``policy.ray_address`` or on a local cluster in the workspace. The
  actor (`JobWorker`) runs the job's Python command (``python -m MODULE ARGS`` or ``python SCRIPT
  ARGS``) in its own process, as the interpreter would: no subprocess and no second Ray driver.
  The PPO trainer in the job finds Ray connected and puts its learner and rollout actors on the
  same cluster. Each run gets a fresh worker that is killed after it, so the job's memory (torch,
  the model) and its process-wide settings go with it; the worker was started, and imported
  ``scheduler.preload_modules``, while the job before ran. It reserves no CPU (it waits on the
  actors, which get the cluster's CPUs). At the timeout the scheduler kills the worker, and with it
  the actors it owns.
* `CallableRunner`: Python callables returning a dict of details (raise to fail), for tests.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import runpy
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Protocol

from looprl.ops.core.config import LooprlConfig
from looprl.ops.core.log import get_logger
from looprl.ops.supervisor import child_preexec

log = get_logger(__name__)

TAIL_CHARS = 4000
KILL_WAIT_S = 30.0


@dataclass
class RunResult:
    returncode: int
    output_tail: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    timed_out: bool = False


def last_json_line(text: str) -> dict[str, Any]:
    """A job's result: its whole stdout if that is one JSON object, else the last line that is."""
    try:
        whole = json.loads(text)
        if isinstance(whole, dict):
            return whole
    except ValueError:
        pass
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                return obj
    return {}


def _result(returncode: int, stdout: str, stderr: str, timed_out: bool = False) -> RunResult:
    tail = (stderr[-TAIL_CHARS // 2:] + "\n" + stdout[-TAIL_CHARS // 2:]).strip()
    return RunResult(returncode, tail, last_json_line(stdout), timed_out)


class Handle(Protocol):
    def done(self) -> bool: ...
    def result(self) -> RunResult: ...
    def cancel(self) -> None: ...


class Runner(Protocol):
    def submit(self, job: str, command: Any, env: dict[str, str], timeout_s: float) -> Handle: ...
    def close(self) -> None: ...


class NotStarted:
    """A submission that could not even start: reported as a failed run on the next tick."""

    def __init__(self, error: str):
        self.error = error

    def done(self) -> bool:
        return True

    def result(self) -> RunResult:
        return RunResult(1, f"could not start: {self.error}")

    def cancel(self) -> None:
        pass


def _log_path(log_dir: Path | None, job: str) -> str | None:
    return str(log_dir / f"job-{job}.log") if log_dir else None


# --------------------------------------------------------------------------- local subprocesses
def run_command(argv: list[str], env: dict[str, str], timeout_s: float, log_path: str | None = None) -> RunResult:
    """Run one job command to completion (or its timeout); the job dies with its parent.

    stdout is the job's result (its last JSON line becomes the run's details); stderr (the
    structured log) is appended to ``log_path`` and its tail kept for failed runs."""
    proc = subprocess.Popen(argv, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=child_preexec, start_new_session=True)
    timed_out = False
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, err = proc.communicate()
        timed_out = True
    stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a") as f:
            f.write(stderr + stdout)
    return _result(-9 if timed_out else proc.returncode, stdout, stderr, timed_out)


class _ThreadHandle:
    def __init__(self, fn: Callable[[], RunResult]):
        self._result: RunResult | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], RunResult]) -> None:
        try:
            self._result = fn()
        except BaseException as e:  # a crashing job is a failed run, never a dead scheduler
            self._result = RunResult(1, f"{type(e).__name__}: {e}")

    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self) -> RunResult:
        self._thread.join()
        assert self._result is not None
        return self._result

    def cancel(self) -> None:  # threads cannot be killed; the job's own timeout ends it
        pass


class SubprocessRunner:
    """Jobs as local subprocesses (no Ray): tests and single-node setups without Ray."""

    def __init__(self, log_dir: Path | None = None):
        self.log_dir = log_dir

    def submit(self, job: str, command: list[str], env: dict[str, str], timeout_s: float) -> Handle:
        log_path = _log_path(self.log_dir, job)
        return _ThreadHandle(lambda: run_command(command, env, timeout_s, log_path))

    def close(self) -> None:
        pass


class CallableRunner:
    """Jobs as Python callables returning a dict of details (raise to fail). For tests."""

    def submit(self, job: str, command: Callable[[], dict], env: dict[str, str], timeout_s: float) -> Handle:
        def call() -> RunResult:
            details = command() or {}
            return RunResult(0, json.dumps(details), details)

        return _ThreadHandle(call)

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- Ray
def python_entry(argv: list[str]) -> tuple[str, str, list[str]]:
    """``("module", NAME, ARGS)`` for ``python -m NAME ARGS``, ``("script", PATH, ARGS)`` for
    ``python PATH ARGS``: the commands a worker can run in its own interpreter."""
    if len(argv) >= 3 and argv[1] == "-m":
        return "module", argv[2], argv[3:]
    if len(argv) >= 2 and not argv[1].startswith("-"):
        return "script", argv[1], argv[2:]
    raise ValueError(f"not a `python -m MODULE ...` or `python SCRIPT ...` command: {argv[:3]}")


def _exit_status(kind: str, target: str) -> int:
    """Run the module or script as ``__main__``; the exit status the interpreter would give."""
    try:
        if kind == "module":
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(target, run_name="__main__")
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


@contextlib.contextmanager
def _stderr_file(log_path: str | None) -> Iterator[IO[str]]:
    """The job log, appended as the job writes it, so a run killed at its timeout leaves its output."""
    if log_path is None:
        with tempfile.TemporaryFile("w+", errors="replace") as f:
            yield f
        return
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a+", errors="replace") as f:
        yield f


def run_in_worker(argv: list[str], env: dict[str, str], log_path: str | None) -> RunResult:
    """The job's Python command in this (fresh, single-use) worker process."""
    kind, target, args = python_entry(argv)
    os.environ.update(env)
    sys.argv = [target, *args]
    stdout = io.StringIO()
    with _stderr_file(log_path) as err:
        start = err.tell()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(err):
            code = _exit_status(kind, target)
        err.seek(start)
        stderr = err.read()
        err.write(stdout.getvalue())  # the log holds stderr then stdout, as run_command writes it
    return _result(code, stdout.getvalue(), stderr)


def process_gone(pid: int) -> bool:
    """Whether process ``pid`` has exited (a zombie has: its memory and sockets are freed)."""
    if not os.path.isdir("/proc"):  # macOS: whether the pid still exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def _file_size(path: str | None) -> int:
    try:
        return os.path.getsize(path) if path else 0
    except OSError:
        return 0


class _RayHandle:
    """One run on its own `JobWorker` actor: the actor is killed when the run's result is read or
    the run is cancelled, so the job's process, and the actors it owns, go with it."""

    def __init__(self, ray: Any, actor: Any, ref: Any, timeout_s: float, log_path: str | None, log_start: int):
        self._ray, self.actor, self.ref = ray, actor, ref
        self.deadline = time.monotonic() + timeout_s
        self.log_path, self.log_start = log_path, log_start

    def _ready(self, wait_s: float = 0.0) -> bool:
        ready, _ = self._ray.wait([self.ref], timeout=wait_s)
        return bool(ready)

    def done(self) -> bool:
        return self._ready() or time.monotonic() >= self.deadline

    def result(self) -> RunResult:
        if not self._ready(max(0.0, self.deadline - time.monotonic())):
            self.cancel()
            return RunResult(-9, self._log_tail(), {}, timed_out=True)
        try:
            worker, result = self._ray.get(self.ref)
        except Exception as e:  # the worker died (OOM, node lost): a failed run
            self._kill()
            return RunResult(1, f"{self._log_tail()}\nray task failed: {type(e).__name__}: {str(e)[:500]}".strip())
        self._kill(worker)
        return result

    def cancel(self) -> None:
        self._kill()

    def _kill(self, worker: tuple[str, int] | None = None) -> None:
        """Kill the worker; given its (node id, pid) and on this node, wait (at most ``KILL_WAIT_S``)
        until its process is gone: the next job starts at once on an already warm worker, and must
        not meet this one's ports (its metrics server) or memory. Ray reports the actor dead before
        its process has exited."""
        try:
            self._ray.kill(self.actor, no_restart=True)
        except Exception as e:  # already gone with its node: nothing left to kill
            log.debug("job worker already gone", error=str(e)[:200])
            return
        if worker is None or worker[0] != self._ray.get_runtime_context().get_node_id():
            return
        deadline = time.monotonic() + KILL_WAIT_S
        while not process_gone(worker[1]):
            if time.monotonic() > deadline:
                log.warning("job worker still alive after kill", pid=worker[1], seconds=KILL_WAIT_S)
                return
            time.sleep(0.05)

    def _log_tail(self) -> str:
        """What the run wrote to its log (readable here when the log dir is local or shared)."""
        if not self.log_path:
            return ""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self.log_start)
                return f.read().decode(errors="replace")[-TAIL_CHARS:].strip()
        except OSError:
            return ""


class JobWorker:
    """A Ray actor that is one job's process. It imports ``preload`` when it starts, before any job
    is given to it: the runner starts the next job's worker while the current job runs, so the
    next job finds torch, transformers and the trainer imported instead of spending its first
    seconds (on a busy 2-core machine, a minute) importing them. It runs one job and is killed
    after it, so no job sees another's module state, environment or memory."""

    def __init__(self, preload: list[str]):
        import importlib

        for name in preload:
            try:
                importlib.import_module(name)
            except Exception as e:  # the job itself then fails with the real error, in its log
                print(f"looprl job worker: could not preload {name}: {type(e).__name__}: {e}", file=sys.stderr)

    def run(self, argv: list[str], env: dict[str, str], log_path: str | None) -> tuple[tuple[str, int], RunResult]:
        """The job's result, with where it ran (node id, pid) for the runner to wait on its end."""
        import ray

        return (ray.get_runtime_context().get_node_id(), os.getpid()), run_in_worker(argv, env, log_path)

    def pid(self) -> int:
        return os.getpid()


class RayRunner:
    """Jobs on Ray, each in its own `JobWorker` actor, on ``policy.ray_address`` or a small local
    cluster in the workspace. One spare worker, with ``scheduler.preload_modules`` imported, waits
    for the next job; it is started when the runner starts and whenever a job takes the spare."""

    def __init__(self, cfg: LooprlConfig, log_dir: Path | None = None):
        # Imported here: Ray, and looprl.policy.ray_backend with torch, cost seconds and hundreds of
        # MB; `runner = "subprocess"` and `looprl scheduler runs|trigger` import this module without them.
        import ray

        from looprl.policy.ray_backend import init_ray

        self._ray, self.log_dir = ray, log_dir
        self.started = init_ray(cfg, num_cpus=max(2, cfg.policy.num_rollout_workers + 1))
        # No CPU reserved: a job waits on its PPO actors, which get the cluster's CPUs.
        self._worker = ray.remote(num_cpus=0, max_restarts=0, max_task_retries=0)(JobWorker)
        self.preload = list(cfg.scheduler.preload_modules)
        self._spare: Any = None
        self._start_spare()
        log.info("scheduler on ray", address=ray.get_runtime_context().gcs_address, started_local=self.started,
                 preload=self.preload)

    def _start_spare(self) -> None:
        self._spare = self._worker.remote(self.preload)

    def submit(self, job: str, command: list[str], env: dict[str, str], timeout_s: float) -> Handle:
        python_entry(command)  # a command the worker cannot run fails here, not on the cluster
        log_path = _log_path(self.log_dir, job)
        start = _file_size(log_path)
        actor, self._spare = self._spare, None
        try:
            ref = actor.run.remote(command, env, log_path)
        finally:
            self._start_spare()  # imports while this job runs, ready for the next
        return _RayHandle(self._ray, actor, ref, timeout_s, log_path, start)

    def close(self) -> None:
        if self._spare is not None and self._ray.is_initialized():
            with contextlib.suppress(Exception):
                self._ray.kill(self._spare, no_restart=True)
            self._spare = None
        if self.started and self._ray.is_initialized():
            self._ray.shutdown()
