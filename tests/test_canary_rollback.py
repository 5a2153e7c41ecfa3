"""A deliberately worse adapter is rolled back automatically, end to end through the real
components: the embedded server (canary split sticky per user, answers logged to Kafka), the
controller (registry pointers -> routes), ingest (Kafka -> Parquet log), the simulator (thumbs via
the feedback SDK), and the canary's sequential test on ``feedback_joined.adapter_version``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from prometheus_client import REGISTRY

from fixtures_loop import free_port


def likes_plain_words(prompt: str, completion: str) -> float:
    """The hidden preference of this test: answers in the base model's language ('the', 'is', ...)
    are liked; the broken adapter's garbage is not."""
    words = completion.lower().split()
    return 0.9 if ("the" in words or "is" in words or "was" in words) else 0.1


@pytest.fixture
def loop(tmp_path, tiny_base, kafka_bootstrap):
    import torch

    from looprl.ingest.client import ResponseLogger
    from looprl.ops.core.config import load_config
    from looprl.serving.server import ServerThread, build_service

    torch.set_num_threads(1)
    topics = {"topic_feedback": f"fb-{os.getpid()}-{time.time_ns()}", "topic_responses": f"rs-{time.time_ns()}",
              "topic_dlq": f"dlq-{time.time_ns()}"}
    port = free_port()
    cfg = load_config(environ={}, workspace=tmp_path / "ws", model={"base_path": str(tiny_base)},
                      kafka={"bootstrap_servers": kafka_bootstrap, **topics},
                      ingest={"metrics_port": 0, "batch_max_seconds": 0.5},
                      serving={"port": port, "endpoints": [f"http://127.0.0.1:{port}"], "torch_threads": 1,
                               "max_batch_size": 8, "admin_token": "tok"},
                      # 4 users split 2 and 2 by the sticky hash: each holds about half its arm's votes
                      canary={"traffic_share": 0.5, "min_samples": 25, "max_samples": 400,
                              "rollback_probability": 0.95, "max_user_share": 0.6},
                      demo={"users": 4, "max_requests_per_second": 20, "max_tokens": 8, "eval_fraction": 0.0,
                            "preference_fraction": 0.0, "collector_fraction": 0.0, "thumbs_fraction": 1.0})
    env = {**os.environ, "LOOPRL_WORKSPACE": str(cfg.workspace), "LOOPRL_MODEL__BASE_PATH": str(tiny_base),
           "LOOPRL_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap, "LOOPRL_INGEST__METRICS_PORT": "0",
           "LOOPRL_INGEST__BATCH_MAX_SECONDS": "0.5", "OMP_NUM_THREADS": "1",
           **{f"LOOPRL_KAFKA__{k.upper()}": v for k, v in topics.items()}}
    from looprl.ingest.transport import ensure_topics

    ensure_topics(kafka_bootstrap, {t: 1 for t in topics.values()})
    ingest = subprocess.Popen([sys.executable, "-m", "looprl.ops.cli", "ingest", "consume"], env=env,
                              start_new_session=True, stdout=open(tmp_path / "ingest.log", "wb"),
                              stderr=subprocess.STDOUT)
    logger = ResponseLogger(kafka_bootstrap, topic=topics["topic_responses"])
    server = ServerThread(build_service(cfg), admin_token="tok", response_logger=logger,
                          default_max_tokens=8, port=port).start()
    try:
        yield cfg
    finally:
        server.stop()
        logger.close()
        os.killpg(ingest.pid, signal.SIGINT)
        try:
            ingest.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(ingest.pid, signal.SIGKILL)
            ingest.wait()


def test_worse_canary_is_rolled_back_automatically(loop, tiny_base, tmp_path):
    from adapters_testing import make_adapter

    from looprl.ingest.client import FeedbackClient
    from looprl.ops.canary import CanaryManager
    from looprl.ops.sim.simulator import FeedbackChannels, Simulator
    from looprl.policy.model import base_checksum
    from looprl.serving.controller import AdapterController
    from looprl.storage.registry import Registry

    cfg = loop
    reg = Registry(cfg.registry_dir)
    # a deliberately broken adapter: large random LoRA on attention and experts -> word salad
    make_adapter(tiny_base, tmp_path / "bad", seed=3, rank=4, scale=30.0)
    bad = reg.publish("policy", tmp_path / "bad", base_checksum=base_checksum(tiny_base)).version
    reg.set_status("policy", bad, "gated", "test: passed the offline gate")
    mgr = CanaryManager(cfg)
    before = REGISTRY.get_sample_value("looprl_canary_decisions_total", {"decision": "rollback"}) or 0.0
    mgr.step()
    assert reg.pointer("policy", "canary") == bad
    ctl = AdapterController(cfg)
    assert ctl.reconcile().converged

    channels = FeedbackChannels(cfg, cfg.kafka.bootstrap_servers, None)
    assert isinstance(channels.sdk, FeedbackClient)
    sim = Simulator(cfg, f"http://127.0.0.1:{cfg.serving.port}", likes_plain_words, channels, seed=0)
    stop = threading.Event()
    th = threading.Thread(target=sim.run, args=(stop,), daemon=True)
    th.start()
    decision = None
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            d = mgr.step()
            if d is not None and d.action != "wait":
                decision = d
                break
            time.sleep(2)
    finally:
        stop.set()
        th.join(timeout=60)
        sim.close()
    assert decision is not None and decision.action == "rollback", f"no rollback; last status {mgr.status()}"
    n = decision.numbers
    assert n["candidate_n"] >= 25 and n["control_n"] >= 25 and n["control"] == "base"
    assert n["candidate_rate"] < n["control_rate"] and n["prob_better"] <= 0.05
    # recorded: manifest status with numbers, decisions log, metric; the pointer is gone
    m = reg.manifest("policy", bad)
    assert m.status == "rolled_back" and m.history[-1].numbers["candidate_n"] == n["candidate_n"]
    assert mgr.decisions()[-1]["action"] == "rollback"
    assert reg.pointer("policy", "canary") is None
    assert REGISTRY.get_sample_value("looprl_canary_decisions_total", {"decision": "rollback"}) == before + 1
    # and the controller takes the canary route away: all traffic is back on the base model
    assert ctl.reconcile().converged
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{cfg.serving.port}/v1", api_key="x")
    versions = {client.completions.create(model="policy", prompt="tell me about the park", max_tokens=4,
                                          user=f"u{i}").model_extra["looprl_adapter_version"] for i in range(12)}
    assert versions == {"base"}
    ctl.close()
