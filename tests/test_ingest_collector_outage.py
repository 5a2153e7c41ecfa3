"""The collector under a Kafka outage (issue 30, finding 8): sends that block (librdkafka's local
queue full, up to 10 s each) no longer run on the event loop, and the requests waiting on Kafka
are capped (``ingest.collector_max_concurrent``): beyond it a 503 with Retry-After, at once."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx

from looprl.ingest.collector import create_app
from looprl.ops.core.config import load_config

THUMBS = {"kind": "thumbs", "response_id": "r1", "up": True}


class StalledProducer:
    """Kafka down: every send blocks a while (no room in the local queue) and nothing is
    acknowledged until ``ack_all``."""

    def __init__(self, block_s: float):
        self.block_s = block_s
        self.started = 0
        self.callbacks: list = []
        self._lock = threading.Lock()

    def send(self, topic, value, key=None, headers=None, on_delivery=None):
        with self._lock:
            self.started += 1
        time.sleep(self.block_s)
        with self._lock:
            self.callbacks.append(on_delivery)

    def ack_all(self):
        with self._lock:
            cbs, self.callbacks = self.callbacks, []
        for cb in cbs:
            cb(None)

    def flush(self, timeout):
        return 0

    def close(self, timeout=5.0):
        pass


def test_blocked_sends_leave_the_loop_free_and_the_cap_answers_503(tmp_path):
    cfg = load_config(environ={}, workspace=tmp_path / "ws", ingest={"collector_max_concurrent": 2})
    producer = StalledProducer(block_s=1.0)
    app = create_app(cfg, producer, delivery_timeout_s=20)

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://collector") as c:
            waiting = [asyncio.create_task(c.post("/v1/feedback", json=THUMBS)) for _ in range(2)]
            while producer.started < 2:
                await asyncio.sleep(0.01)
            # both sends are blocked right now: the loop still answers at once
            t0 = time.monotonic()
            assert (await c.get("/health")).status_code == 200
            busy = await c.post("/v1/feedback", json=THUMBS)
            answered_in = time.monotonic() - t0
            while len(producer.callbacks) < 2:
                await asyncio.sleep(0.01)
            producer.ack_all()
            done = await asyncio.gather(*waiting)
            after = await c.post("/v1/feedback", json=THUMBS)  # under the cap again
            return answered_in, busy, done, after

    answered_in, busy, done, after = asyncio.run(_with_acks(scenario(), producer))
    assert answered_in < 0.5, f"the event loop was blocked for {answered_in:.2f}s"
    assert busy.status_code == 503 and busy.json()["error"]["code"] == "busy" and busy.headers["retry-after"] == "1"
    assert "ingest.collector_max_concurrent" in busy.json()["error"]["message"]
    assert [r.status_code for r in done] == [202, 202]
    assert after.status_code == 202


async def _with_acks(scenario, producer: StalledProducer):
    """Run ``scenario`` while acknowledging, in the background, what it sends after the first two."""
    async def acker():
        while True:
            await asyncio.sleep(0.05)
            if producer.started > 2:
                producer.ack_all()

    task = asyncio.create_task(acker())
    try:
        return await scenario
    finally:
        task.cancel()


def test_not_delivered_carries_retry_after(tmp_path):
    cfg = load_config(environ={}, workspace=tmp_path / "ws")
    producer = StalledProducer(block_s=0.0)
    app = create_app(cfg, producer, delivery_timeout_s=0.3)

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://collector") as c:
            return await c.post("/v1/feedback", json=[THUMBS, THUMBS])

    r = asyncio.run(scenario())
    assert r.status_code == 503 and r.json()["error"]["code"] == "not_delivered" and len(r.json()["event_ids"]) == 2
    assert r.headers["retry-after"] == "5"


def test_a_large_request_stops_sending_at_the_delivery_timeout(tmp_path):
    """Each send may block (up to 10 s in librdkafka); a request of many events gives up on the
    rest once its delivery timeout has passed instead of holding a worker thread for all of them."""
    cfg = load_config(environ={}, workspace=tmp_path / "ws")
    producer = StalledProducer(block_s=0.3)
    app = create_app(cfg, producer, delivery_timeout_s=1.0)

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://collector") as c:
            t0 = time.monotonic()
            r = await c.post("/v1/feedback", json=[THUMBS] * 20)
            return r, time.monotonic() - t0

    r, took = asyncio.run(scenario())
    assert r.status_code == 503 and len(r.json()["event_ids"]) == 20
    assert producer.started <= 5 and took < 3.0
