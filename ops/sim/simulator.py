"""The product simulator of `looprl demo`: simulated users of a product built on the served model.

Each user thread, paced by a shared rate limit:
  1. sends a prompt through the serving tier's OpenAI API (openai client, model ``policy``,
     ``user`` = the user id, so the canary split is sticky per user);
  2. reads the completion and the adapter version that produced it (``looprl_adapter_version``);
  3. on a share of answers (``demo.thumbs_fraction``) gives a thumbs-up with probability
     ``preference(prompt, completion)`` (the hidden preference, `--preference module:function`),
     sent through the feedback SDK (Kafka) or the HTTP collector (POST /v1/feedback);
  4. on a share of answers (``demo.correction_fraction``) edits the answer into one it likes
     better: writes ``demo.correction_candidates`` answers on the question's topic in the toy
     language (``corpus.answer``), keeps the one its hidden preference scores highest and sends
     it as a correction if it scores higher than the served answer (any preference works);
  5. on a share of requests (``demo.preference_fraction``) asks for two answers to compare
     (``looprl_compare: "always"``: the second comes in the same response, from the other arm
     while a canary runs) and says which one it prefers (the higher hidden preference; nothing
     when equal); a serving tier that sends no second answer gets a second request ("regenerate");
  6. with ``demo.request_comparisons`` (the targeted profile) asks the serving tier to decide
     (``looprl_compare: "auto"``) and, when a response carries a second candidate
     (``looprl_comparison``), answers "which is better?" the same way.

``demo.feedback`` picks the fractions (`looprl.ops.sim.profiles`). Each train interaction records
the labels it sent per kind, so the report can say how many labels the lift cost.

Evaluation traffic measures learning without feeding it: users named ``demo.eval_user_prefix``+N
send *held-out* prompts (those `looprl.policy.prompts.is_heldout` keeps out of PPO), and never
send feedback, so neither the reward model nor the policy trains on them. A share of eval
requests goes to the base model (``model = serving.served_model_name``) as a live baseline.
Every interaction is appended to ``<state>/simulator/interactions.jsonl`` (the report's data);
a status file with running counts is rewritten every second for the demo's live view.
"""

from __future__ import annotations

import json
import random
import re
import secrets
import threading
import time
from collections import Counter as _Counter
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from openai import OpenAI
from prometheus_client import Counter

from looprl.ingest.client import DeliveryError, FeedbackClient
from looprl.ingest.schema import CorrectionEvent, PreferenceEvent, ThumbsEvent, encode_event
from looprl.ops.core.chat import Chat
from looprl.ops.core.config import LooprlConfig
from looprl.ops.core.log import get_logger
from looprl.ops.core.retry import backoff_seconds, retrying
from looprl.ops.sim.corpus import TOPICS
from looprl.ops.sim.corpus import answer as topic_answer
from looprl.ops.sim.preference import Preference
from looprl.ops.sim.profiles import describe, resolve_demo
from looprl.ops.sim.records import simulator_dir
from looprl.policy.model import heldout_prompts
from looprl.policy.prompts import configured_prompts, is_heldout
from looprl.storage.registry import atomic_write_text

log = get_logger(__name__)

REQUESTS = Counter("looprl_simulator_requests_total", "Simulated requests", ["kind", "outcome"])
FEEDBACK = Counter("looprl_simulator_feedback_total", "Feedback events sent by the simulator", ["kind", "channel"])


# --------------------------------------------------------------------------- prompts
def prompt_sets(cfg: LooprlConfig) -> tuple[list[Chat], list[Chat]]:
    """(train prompts, eval prompts).

    Train traffic uses the product's prompts (``policy.prompts_file`` or the base's shipped set).
    Eval prompts are fresh twice over: phrased by the base's held-out templates (never in
    training traffic) *and* held out by `looprl.policy.prompts.is_heldout`, which PPO's prompt
    sampler excludes even though the serving tier logs eval requests like any other; the
    reward model never sees them because eval users send no feedback."""
    try:
        train = list(dict.fromkeys(configured_prompts(cfg)))
    except OSError as e:  # read_prompt_file's messages already name policy.prompts_file
        raise ValueError(str(e)) from None
    fresh = [p for p in map(Chat.user, heldout_prompts()) if p not in set(train)]
    held = [p for p in fresh if is_heldout(p)]
    if len(held) < 4:
        log.warning("few doubly held-out eval prompts; using all held-out-template prompts", n=len(held))
        held = fresh
    if not held:
        raise ValueError("no eval prompts: every held-out prompt is also a training prompt")
    return train, held


# --------------------------------------------------------------------------- feedback channels
class CollectorUnavailable(RuntimeError):
    """The collector answered 5xx: worth trying again."""


class FeedbackChannels:
    """The two ways a product sends feedback: the Kafka SDK and the HTTP collector."""

    def __init__(self, cfg: LooprlConfig, bootstrap: str | None, collector_url: str | None):
        self.cfg = cfg
        self.sdk = None
        self._undelivered: list[Any] = []  # SDK events Kafka did not acknowledge: sent again
        self._lock = threading.Lock()
        if bootstrap:
            self.sdk = FeedbackClient(bootstrap, topic=cfg.kafka.topic_feedback, client=cfg.kafka.client,
                                      security=cfg.kafka.security("feedback"), on_error=self._undelivered_event)
        self.collector_url = collector_url.rstrip("/") if collector_url else None
        token = cfg.ingest.collector_token
        headers = {"Authorization": f"Bearer {token.get_secret_value()}"} if token else {}
        self.http = httpx.Client(timeout=10.0, headers=headers)
        self.sent = _Counter()
        self.failed = _Counter()

    def _post(self, event) -> None:
        assert self.collector_url is not None
        body = encode_event(event)
        # The collector may be restarting (crash, deploy): retry for ~30 s with the same event
        # (same event_id), which ingest stores once even if a first attempt did get through.
        # A 4xx is the event's fault, not the collector's: it is not retried.
        try:
            retrying(8, initial=0.5, cap=8.0, on=(httpx.HTTPError, CollectorUnavailable))(self._post_once, body)
        except (httpx.HTTPError, CollectorUnavailable) as e:
            raise RuntimeError(f"collector unreachable: {e}") from e

    def _post_once(self, body: bytes) -> None:
        r = self.http.post(f"{self.collector_url}/v1/feedback", content=body,
                           headers={"Content-Type": "application/json"})
        if r.status_code >= 500:
            raise CollectorUnavailable(f"collector answered {r.status_code}")
        if r.status_code >= 300:
            raise ValueError(f"collector refused the event: {r.status_code} {r.text[:200]}")

    def _channel(self, use_http: bool) -> str:
        if use_http and self.collector_url:
            return "http"
        return "sdk" if self.sdk is not None else "http"

    def _send(self, kind: str, use_http: bool, make_event) -> bool:
        """Send one feedback event (built by ``make_event()``) on Kafka or to the collector; True
        when it was handed over (the SDK confirms delivery later, in flush)."""
        ch = self._channel(use_http)
        try:
            event = make_event()
            if ch == "sdk":
                self.sdk.send(event)
            else:
                self._post(event)
            self.sent[kind] += 1
            FEEDBACK.labels(kind=kind, channel=ch).inc()
            return True
        except Exception as e:
            self.failed[kind] += 1
            log.warning("feedback not sent", kind=kind, channel=ch, error=str(e)[:200])
            return False

    def thumbs(self, response_id: str, up: bool, user: str, use_http: bool) -> bool:
        return self._send("thumbs", use_http, lambda: ThumbsEvent(response_id=response_id, up=up, user_id=user))

    def preference(self, chosen_id: str, rejected_id: str, user: str, use_http: bool) -> bool:
        return self._send("preference", use_http, lambda: PreferenceEvent(
            chosen_response_id=chosen_id, rejected_response_id=rejected_id, user_id=user))

    def correction(self, response_id: str, corrected: str, user: str, use_http: bool) -> bool:
        return self._send("correction", use_http, lambda: CorrectionEvent(
            response_id=response_id, corrected=corrected, user_id=user))

    def _undelivered_event(self, event: Any, err: Exception) -> None:
        with self._lock:
            self._undelivered.append(event)

    def resend_undelivered(self) -> int:
        """Send again what Kafka did not acknowledge (same event ids: ingest stores each once)."""
        with self._lock:
            events, self._undelivered = self._undelivered, []
        for e in events:
            self.sdk.send(e)
        if events:
            log.info("feedback re-sent after failed delivery", events=len(events))
        return len(events)

    def flush(self, attempts: int = 3) -> None:
        """Wait until every SDK event is acknowledged, re-sending failures; what still fails is
        counted in ``failed`` (and no longer in ``sent``)."""
        if self.sdk is None:
            return
        for attempt in range(attempts):
            try:
                self.sdk.flush()
            except DeliveryError as e:
                with self._lock:  # failures already reported through on_error are queued once
                    queued = {str(x.event_id) for x in self._undelivered}
                    self._undelivered.extend(x for x in e.events if str(x.event_id) not in queued)
            if not self.resend_undelivered():
                return
        with self._lock:
            lost, self._undelivered = self._undelivered, []
        for e in lost:
            self.sent[e.kind] -= 1
            self.failed[e.kind] += 1
        if lost:
            log.error("feedback not delivered after retries", events=len(lost))

    def close(self) -> None:
        if self.sdk is not None:
            try:
                self.flush()
            finally:
                try:
                    self.sdk.close(timeout=5.0)
                except Exception as e:  # already reported by flush
                    log.warning("feedback client close", error=str(e)[:200])
        self.http.close()


# --------------------------------------------------------------------------- the simulator
@dataclass
class Interaction:
    ts: float
    kind: str  # "train" | "eval"
    user: str
    model: str
    version: str
    p: float  # the hidden preference's P(thumbs-up) of this completion
    up: bool
    prompt: str = ""
    completion: str = ""
    # Labels this interaction sent, per kind (thumbs, correction, preference): train traffic only.
    labels: dict[str, int] = field(default_factory=dict)


class RateLimiter:
    def __init__(self, per_second: float):
        self.interval = 1.0 / per_second
        self._next = time.monotonic()
        self._lock = threading.Lock()

    def wait(self, stop: threading.Event) -> bool:
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next)
            self._next = slot + self.interval
        delay = slot - time.monotonic()
        return not stop.wait(delay) if delay > 0 else not stop.is_set()


class Simulator:
    def __init__(self, cfg: LooprlConfig, base_url: str, preference: Preference, channels: FeedbackChannels | None,
                 *, seed: int | None = None, out_dir: Path | None = None):
        self.cfg, self.d = cfg, resolve_demo(cfg.demo)
        self.preference = preference
        self.channels = channels
        self.client = OpenAI(base_url=base_url.rstrip("/") + "/v1", api_key="looprl-demo", timeout=60.0, max_retries=2)
        self.train_prompts, self.eval_prompts = prompt_sets(cfg)
        # demo.seed None (the default): each start draws its users' luck afresh, so two demos are
        # two samples, not one sample twice (with one fixed seed, fresh runs drew the same eval
        # prompts and coin flips: their base arms missed the expected rate by the same few points).
        if seed is None:
            seed = self.d.seed if self.d.seed is not None else secrets.randbits(31)
        self.seed = seed
        self.rng = random.Random(self.seed)
        self._rng_lock = threading.Lock()
        self.out_dir = Path(out_dir or simulator_dir(cfg))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._log_lock = threading.Lock()
        self._log = open(self.out_dir / "interactions.jsonl", "a")
        self.counts: dict[str, Any] = defaultdict(int)
        self.by_version: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0, 0, 0.0]))
        self.started = time.time()

    def _random(self) -> float:
        with self._rng_lock:
            return self.rng.random()

    def _choice(self, seq: list):
        with self._rng_lock:
            return self.rng.choice(seq)

    def complete(self, prompt: Chat, user: str, model: str | None = None) -> tuple[str, str, str]:
        """(response id, completion text, adapter version) of one chat request to the serving tier."""
        rid, text, version, _ = self._complete(prompt, user, model)
        return rid, text, version

    def _complete(self, prompt: Chat, user: str, model: str | None = None,
                  compare: str | None = None) -> tuple[str, str, str, dict[str, Any]]:
        """``complete`` plus the response's extension fields; ``compare`` (``looprl_compare``):
        "auto" lets the serving tier add a second candidate for a "which is better?" question,
        "always" asks for one."""
        try:
            r = self.client.chat.completions.create(model=model or self.cfg.serving.alias, messages=prompt.to_dicts(),
                                                    max_tokens=self.d.max_tokens, temperature=1.0, user=user,
                                                    extra_body={"looprl_compare": compare} if compare else None)
        except Exception:
            # Counted per request as the users see them (server errors, refused connections,
            # timeouts): the demo's failure view shows them next to what the server counted.
            with self._log_lock:
                self.counts["serving_requests"] += 1
                self.counts["serving_failed"] += 1
            raise
        with self._log_lock:
            self.counts["serving_requests"] += 1
        extra = r.model_extra or {}
        version = str(extra.get("looprl_adapter_version") or "unknown")
        return r.id, r.choices[0].message.content or "", version, extra

    def _record(self, it: Interaction) -> None:
        with self._log_lock:
            self._log.write(json.dumps(asdict(it)) + "\n")
            self._log.flush()
            self.counts[f"{it.kind}_requests"] += 1
            self.counts[f"{it.kind}_ups"] += int(it.up)
            agg = self.by_version[it.kind][it.version]
            agg[0] += 1
            agg[1] += int(it.up)
            agg[2] += it.p

    def interact(self, user_index: int) -> None:
        """One simulated interaction (train traffic with feedback, or eval traffic without)."""
        if self.eval_prompts and self._random() < self.d.eval_fraction:
            self._eval(user_index)
        else:
            self._train(user_index)

    def _train(self, user_index: int) -> None:
        user = f"user-{user_index}"
        prompt = self._choice(self.train_prompts)
        question = prompt.last_user()
        # Drawn only when comparisons are on, so a profile without them keeps the same draws.
        pair = self.d.preference_fraction > 0 and self._random() < self.d.preference_fraction
        mode = "always" if pair else "auto" if self.d.request_comparisons else None
        rid, text, version, extra = self._complete(prompt, user, compare=mode)
        p = float(self.preference(question, text))
        up = self._random() < p
        it = Interaction(time.time(), "train", user, self.cfg.serving.alias, version, p, up)
        try:  # recorded whatever happens to the feedback (a failed "regenerate" request)
            self._feedback(it, prompt, question, rid, text, extra, pair)
        finally:
            self._record(it)

    def _feedback(self, it: Interaction, prompt: Chat, question: str, rid: str, text: str,
                  extra: dict[str, Any], pair: bool = False) -> None:
        """The feedback a train user gives on one answer, counted in ``it.labels``; ``pair``: the
        user asked for two answers to compare."""
        if self.channels is None:
            return
        user, p, labels = it.user, it.p, it.labels
        use_http = self._random() < self.d.collector_fraction
        if self._random() < self.d.thumbs_fraction and self.channels.thumbs(rid, it.up, user, use_http):
            labels["thumbs"] = labels.get("thumbs", 0) + 1
        # Drawn only when corrections are on, so a profile without them keeps the same draws.
        if self.d.correction_fraction > 0 and self._random() < self.d.correction_fraction:
            corrected = self._correction(question, text, p)
            if corrected is not None and self.channels.correction(rid, corrected, user, use_http):
                labels["correction"] = labels.get("correction", 0) + 1
        offered = extra.get("looprl_comparison")
        if isinstance(offered, dict) and offered.get("response_id") and isinstance(offered.get("content"), str):
            # A second candidate, logged as its own response: asked for, or serving asked "which is
            # better?" (targeted comparisons).
            if not pair:
                with self._log_lock:
                    self.counts["comparisons_offered"] += 1
            self._compare(labels, question, user, use_http, rid, text, p, str(offered["response_id"]),
                          offered["content"])
        elif pair:
            # A serving tier without comparisons: "regenerate", a second answer to the same prompt.
            rid2, text2, _ = self.complete(prompt, user)
            self._compare(labels, question, user, use_http, rid, text, p, rid2, text2)

    def _compare(self, labels: dict[str, int], question: str, user: str, use_http: bool,
                 rid: str, text: str, p: float, rid2: str, text2: str) -> None:
        """The user says which of two answers they like more, and nothing when they like both
        equally (an indifferent user is not asked)."""
        p2 = float(self.preference(question, text2))
        if p2 == p or text2.strip() == text.strip():
            return
        chosen, rejected = (rid, rid2) if p > p2 else (rid2, rid)
        if self.channels.preference(chosen, rejected, user, use_http):
            labels["preference"] = labels.get("preference", 0) + 1
            with self._log_lock:
                self.counts["pairs"] += 1

    def _correction(self, question: str, served: str, p_served: float) -> str | None:
        """The answer the user would rather have had: the favourite of ``demo.correction_candidates``
        answers on the question's topic, if the hidden preference scores it above the served answer;
        else None (nothing to correct). The topic is the question's last word that is one of the toy
        language's topics ("what is the dog like"), else its last word."""
        words = re.findall(r"[a-z]+", question.lower())
        if not words:
            return None
        topic = next((w for w in reversed(words) if w in TOPICS), words[-1])
        with self._rng_lock:
            candidates = [topic_answer(self.rng, topic) for _ in range(self.d.correction_candidates)]
        lead = served[:len(served) - len(served.lstrip())]  # written where the served answer starts
        best_p, best = max(((float(self.preference(question, lead + c)), lead + c) for c in candidates),
                           key=lambda pc: pc[0])
        return best if best_p > p_served else None

    def _eval(self, user_index: int) -> None:
        user = f"{self.d.eval_user_prefix}{user_index}-{int(self._random() * 1000)}"
        prompt = self._choice(self.eval_prompts)
        model = self.cfg.serving.served_model_name if self._random() < self.d.base_eval_fraction else self.cfg.serving.alias
        _rid, text, version = self.complete(prompt, user, model=model)
        p = float(self.preference(prompt.last_user(), text))
        up = self._random() < p
        self._record(Interaction(time.time(), "eval", user, model, version, p, up, prompt.text(), text))

    def status(self) -> dict[str, Any]:
        with self._log_lock:
            versions = {kind: {v: {"n": a[0], "ups": a[1], "p_mean": a[2] / a[0] if a[0] else None}
                               for v, a in vs.items()} for kind, vs in self.by_version.items()}
            out = {"ts": time.time(), "started": self.started, "seed": self.seed, **self.counts,
                   "by_version": versions, "feedback": describe(self.d)}
        if self.channels is not None:
            out["feedback_sent"] = dict(self.channels.sent)
            out["feedback_failed"] = dict(self.channels.failed)
        return out

    def write_status(self) -> None:
        atomic_write_text(self.out_dir / "status.json", json.dumps(self.status()))

    def run(self, stop: threading.Event, duration_s: float | None = None) -> dict[str, Any]:
        """Run the user threads until ``stop`` is set (or ``duration_s`` passed)."""
        limiter = RateLimiter(self.d.max_requests_per_second)
        deadline = time.monotonic() + duration_s if duration_s else None

        def user_loop(i: int) -> None:
            failures = 0
            while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
                if not limiter.wait(stop):
                    return
                try:
                    self.interact(i)
                    REQUESTS.labels(kind="any", outcome="ok").inc()
                    failures = 0
                except Exception as e:  # the server restarting, a canary flip: keep simulating
                    self.counts["errors"] += 1
                    REQUESTS.labels(kind="any", outcome="error").inc()
                    log.warning("simulated request failed", user=i, error=str(e)[:200])
                    failures += 1
                    stop.wait(backoff_seconds(failures, 0.5, cap=10.0))

        threads = [threading.Thread(target=user_loop, args=(i,), daemon=True, name=f"user-{i}")
                   for i in range(self.d.users)]
        for t in threads:
            t.start()
        try:
            while any(t.is_alive() for t in threads):
                if self.channels is not None and getattr(self.channels, "sdk", None) is not None:
                    self.channels.resend_undelivered()
                self.write_status()
                if stop.wait(1.0):
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    break
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=70)
            if self.channels is not None:
                self.channels.flush()
            self.write_status()
        return self.status()

    def close(self) -> None:
        if self.channels is not None:
            self.channels.close()
        self._log.close()
