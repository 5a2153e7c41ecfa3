"""Short jobs push their final metrics to a Pushgateway (``metrics.pushgateway_url``).

No Pushgateway needed here: a small HTTP server records what the client sends (method, path,
body), the way a Pushgateway would receive it, and answers as told. The body must be the job's
final looprl metrics in the Prometheus text format; a push that fails must never fail the job.
(tests/test_monitoring_stack.py pushes to a real Pushgateway where one is installed.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge
from prometheus_client.parser import text_string_to_metric_families

from looprl.ops.core.metrics import push_metrics, pushed_when_done


class Recorder:
    """An HTTP server that records every request and answers ``status``."""

    def __init__(self, status: int = 200):
        self.status = status
        self.requests: list[dict] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                recorder.requests.append({"method": self.command, "path": self.path, "body": body.decode(),
                                          "content_type": self.headers.get("Content-Type", "")})
                self.send_response(recorder.status)
                self.end_headers()

            do_PUT = do_POST = do_DELETE = _any

            def log_message(self, *args):  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Recorder:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def families(body: str) -> dict[str, dict[tuple, float]]:
    """name -> {(sample name, sorted labels): value} of a text-format body (parse errors raise)."""
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(body):
        out[fam.name] = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in fam.samples}
    return out


def test_a_push_replaces_the_job_group_with_the_looprl_metrics_in_text_format():
    reg = CollectorRegistry()
    steps = Counter("looprl_policy_steps_total", "steps", registry=reg)
    kl = Gauge("looprl_policy_kl_nats", "kl", registry=reg)
    Gauge("python_unrelated_bytes", "not ours", registry=reg).set(1)
    steps.inc(40)
    kl.set(2.5)
    with Recorder() as gw:
        assert push_metrics(gw.url, "looprl-policy-train", instance="prod-eu", registry=reg) is True
    [req] = gw.requests
    assert req["method"] == "PUT"  # PUT replaces the whole group: the last run's values, nothing stale
    assert req["path"] == "/metrics/job/looprl-policy-train/instance/prod-eu"
    assert req["content_type"].startswith("text/plain; version=0.0.4")
    fams = families(req["body"])
    assert fams["looprl_policy_steps"][("looprl_policy_steps_total", ())] == 40.0
    assert fams["looprl_policy_kl_nats"][("looprl_policy_kl_nats", ())] == 2.5
    assert not any(name.startswith("python_") for name in fams)


@pytest.mark.parametrize("status", [500, 400])
def test_a_refused_push_is_counted_and_logged_never_raised(status, caplog):
    reg = CollectorRegistry()
    Gauge("looprl_reward_prequential_accuracy_ratio", "acc", registry=reg).set(0.8)
    before = REGISTRY.get_sample_value("looprl_metrics_push_failures_total", {"job": "looprl-reward-update"}) or 0
    with Recorder(status=status) as gw:
        assert push_metrics(gw.url, "looprl-reward-update", instance="looprl", registry=reg) is False
    assert len(gw.requests) == 1
    after = REGISTRY.get_sample_value("looprl_metrics_push_failures_total", {"job": "looprl-reward-update"})
    assert after == before + 1
    assert "metrics push failed" in caplog.text


def test_an_unreachable_pushgateway_does_not_fail_the_block_and_a_failing_block_still_pushes():
    with Recorder() as gw:
        dead = gw.url  # this port closes when the recorder stops
    reg = CollectorRegistry()
    Gauge("looprl_policy_kl_nats", "kl", registry=reg).set(1.0)
    with pushed_when_done(dead, "looprl-policy-gate", instance="looprl", timeout=2, registry=reg):
        pass  # the push fails after the block; nothing raises
    failures = Counter("looprl_policy_run_failures_total", "failed runs", ["reason"], registry=reg)
    with Recorder() as gw:
        with pytest.raises(RuntimeError, match="ppo blew up"):
            with pushed_when_done(gw.url, "looprl-policy-train", instance="looprl", registry=reg):
                failures.labels(reason="RuntimeError").inc()
                raise RuntimeError("ppo blew up")
    [req] = gw.requests  # a failed job's failure counters are its final metrics too
    fams = families(req["body"])
    assert fams["looprl_policy_run_failures"][("looprl_policy_run_failures_total", (("reason", "RuntimeError"),))] == 1
    with pushed_when_done(None, "looprl-policy-gate", instance="looprl", registry=reg):
        pass  # no URL: no push, no error


def _job_env(tmp_path, url: str, base=None) -> dict[str, str]:
    env = {**os.environ, "LOOPRL_WORKSPACE": str(tmp_path / "ws"), "LOOPRL_METRICS__PUSHGATEWAY_URL": url,
           "LOOPRL_METRICS__PUSH_INSTANCE": "test", "LOOPRL_POLICY__METRICS_PORT": "0", "OMP_NUM_THREADS": "1"}
    if base is not None:
        env["LOOPRL_MODEL__BASE_PATH"] = str(base)
    return env


def test_a_policy_train_job_pushes_its_final_metrics(tmp_path, tiny_base):
    """The real command, as the scheduler runs it: the pushed values are the job's own last step."""
    env = {**_job_env(tmp_path, "", tiny_base), "LOOPRL_POLICY__ROLLOUT_BATCH_SIZE": "4",
           "LOOPRL_POLICY__MINIBATCH_SIZE": "4", "LOOPRL_POLICY__PPO_EPOCHS": "1"}
    with Recorder() as gw:
        env["LOOPRL_METRICS__PUSHGATEWAY_URL"] = gw.url
        r = subprocess.run([sys.executable, "-m", "looprl.ops.cli", "policy", "train", "--steps", "1", "--no-ray",
                            "--scorer", "cheerful"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    [req] = gw.requests
    assert (req["method"], req["path"]) == ("PUT", "/metrics/job/looprl-policy-train/instance/test")
    fams = families(req["body"])
    assert fams["looprl_policy_steps"][("looprl_policy_steps_total", ())] == 1.0
    # one step: the manifest's kl_last / reward_last (means of the last steps) are that step's values
    assert fams["looprl_policy_kl_nats"][("looprl_policy_kl_nats", ())] == pytest.approx(out["kl_last"])
    assert fams["looprl_policy_reward_mean_score"][("looprl_policy_reward_mean_score", ())] == pytest.approx(
        out["reward_last"])
    assert not any(name.startswith(("process_", "python_")) for name in fams)


def test_a_failing_job_keeps_its_exit_status_when_the_push_fails_too(tmp_path):
    with Recorder(status=503) as gw:
        r = subprocess.run([sys.executable, "-m", "looprl.ops.cli", "policy", "gate", "v9", "--scorer", "cheerful"],
                           env=_job_env(tmp_path, gw.url), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "policy/v9 does not exist" in r.stderr
    [req] = gw.requests
    assert req["path"] == "/metrics/job/looprl-policy-gate/instance/test"
    assert "metrics push failed" in r.stderr
