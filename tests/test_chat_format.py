"""One chat format everywhere: a conversation served by the embedded server (system prompt,
history, last user turn) is logged with its messages, read back from the event log by the reward
data and the PPO prompt pool as the same ``Chat``, and rendered by them to exactly the tokens the
server fed the model; the reward model reads the answer as the tokens that were generated."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone

import httpx
import pytest
import torch

from looprl.ingest.schema import ThumbsEvent
from looprl.ops.core.chat import Chat, ChatError
from looprl.ops.sim.feedback import SimulatedLog
from looprl.policy.model import completion_ids, end_of_turn_id, render_prompt_ids
from looprl.policy.prompts import traffic_prompts
from looprl.policy.rollout import encode_prompts
from looprl.reward.data import FeedbackSource, connect_event_log
from looprl.reward.model import encode_answer

MESSAGES = [
    {"role": "system", "content": "answer about animals"},
    {"role": "user", "content": "tell me about the dog"},
    {"role": "assistant", "content": " the dog is old."},
    {"role": "user", "content": "describe the park"},
]


@pytest.fixture
def spied(serving_server, monkeypatch):
    """The prompt ids each request was submitted with, and the token ids each one generated."""
    engine = serving_server.service.engine
    submitted, generated = [], []
    real_submit, real_finish = engine.submit_many, engine._finish

    def submit_many(prompt_ids, params, adapter, sinks):
        submitted.append(list(prompt_ids))
        return real_submit(prompt_ids, params, adapter, sinks)

    def finish(r, reason, *a, **kw):
        if not r.done:
            generated.append((list(r.generated), reason))
        return real_finish(r, reason, *a, **kw)

    monkeypatch.setattr(engine, "submit_many", submit_many)
    monkeypatch.setattr(engine, "_finish", finish)
    return serving_server, submitted, generated


def test_served_tokens_are_the_tokens_trained_and_scored(spied, tmp_path):
    srv, submitted, generated = spied
    tok = srv.service.engine.tokenizer
    n_logged = len(srv.logger.events)
    r = httpx.post(f"{srv.url}/v1/chat/completions", timeout=60,
                   json={"model": "base", "messages": MESSAGES, "max_tokens": 48, "temperature": 0, "user": "u1"})
    assert r.status_code == 200, r.text
    served = r.json()["choices"][0]
    (prompt_ids,), ((gen_ids, reason),) = submitted, generated
    event = srv.logger.events[n_logged]

    # The event keeps the conversation as structured messages, not a flattened string.
    assert [m.model_dump() for m in event.messages] == MESSAGES
    assert event.completion == served["message"]["content"]

    # Through the event log: the reward data and the PPO prompt pool read the same conversation.
    cfg = srv.cfg.model_copy(update={"workspace": tmp_path / "ws"})
    log = SimulatedLog(cfg.events_dir)
    thumbs = ThumbsEvent(event_id=uuid.uuid4(), ts=datetime.now(timezone.utc), response_id=event.response_id, up=True)
    log.append([event, thumbs])
    (example,) = FeedbackSource(connect_event_log(cfg.events_dir)).new_examples(set())
    pooled, _ = traffic_prompts(cfg, 10)
    chat = Chat.from_messages(MESSAGES)
    assert example.prompt == chat and pooled == [chat]

    # ... and render it to the very prompt tokens the server fed the model,
    assert render_prompt_ids(tok, example.prompt) == prompt_ids
    ids, mask = encode_prompts(tok, pooled, max_prompt_tokens=10_000)  # a PPO rollout's prompt rows
    assert ids[0][mask[0].bool()].tolist() == prompt_ids
    # and the answer to the tokens the model generated, closed by the end of turn it stopped at.
    assert reason == "stop"  # the tiny base ends its answers well within 48 tokens
    row = encode_answer(tok, example.prompt, example.completion, max_len=10_000)
    assert completion_ids(tok, example.completion) == gen_ids
    assert row == prompt_ids + gen_ids + [end_of_turn_id(tok)]
    # The response log holds the same tokens, stop token included (what off-policy PPO replays).
    assert list(event.completion_token_ids) == gen_ids + [end_of_turn_id(tok)]
    assert len(event.completion_logprobs) == len(event.completion_token_ids)


def test_developer_role_is_the_system_prompt_and_bad_conversations_are_refused(spied):
    srv, submitted, _ = spied
    tok = srv.service.engine.tokenizer
    body = {"model": "base", "max_tokens": 2, "messages": [{"role": "developer", "content": "be brief"},
                                                           {"role": "user", "content": "describe the park"}]}
    assert httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=60).status_code == 200
    system = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "describe the park"}]
    assert submitted[-1] == render_prompt_ids(tok, Chat.from_messages(system))
    r = httpx.post(f"{srv.url}/v1/chat/completions", timeout=60,
                   json={"model": "base", "messages": [{"role": "wizard", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages")
    with pytest.raises(ChatError, match="role"):
        Chat.parse(messages='[{"role": "wizard", "content": "x"}]')
    with pytest.raises(ChatError, match="JSON"):
        Chat.parse(messages="{nope")
    assert Chat.parse("hi") == Chat.parse(messages='[{"role": "user", "content": "hi"}]') == Chat.user("hi")
    assert torch.is_tensor(encode_prompts(tok, ["hi"], 8)[0])
