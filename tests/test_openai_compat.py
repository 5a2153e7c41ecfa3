"""OpenAI compatibility of the embedded server, as client code meets it: the sampling parameters
are honoured (penalties, top_k, logit_bias) or refused with a 400 naming the field, n > 1 answers
n choices each logged under its own response id, every route answers errors in OpenAI's shape,
and validation messages name the field as the client wrote it."""

from __future__ import annotations

import concurrent.futures as cf
import json

import httpx
import openai
import pytest
import torch
from pydantic import ValidationError

from looprl.ops.core.validation import readable_error
from looprl.serving.attribution import choice_response_id
from looprl.serving.protocol import SEED_MAX, SEED_MIN, ChatCompletionRequest, choice_seed
from looprl.serving.sampling import RowSampler, SamplingParams, adjust_logits, sample_next, top_k_filter

PROMPT = "the cat sat on the mat and the cat sat on the"
MSGS = [{"role": "user", "content": "tell me about the river and the park"}]


@pytest.fixture(scope="module")
def srv(serving_server):
    return serving_server


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=60)


def _ids(client, **kw) -> list[int]:
    """The completion's token ids (vLLM's return_token_ids) of a greedy base-model answer."""
    kw = {"model": "base", "prompt": PROMPT, "max_tokens": 24, "temperature": 0, **kw}
    extra = {"return_token_ids": True, "ignore_eos": True, **kw.pop("extra_body", {})}
    r = client.completions.create(**kw, extra_body=extra)
    return r.choices[0].model_extra["token_ids"]


def _repeats(ids: list[int]) -> int:
    return len(ids) - len(set(ids))


# ---------------------------------------------------------------------- the sampler itself
def test_penalties_subtract_openai_amounts_and_bias_adds():
    params = SamplingParams(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.25, logit_bias=((3, 7.0),))
    row = RowSampler.create(params)
    for tok in (1, 2, 2, 2):
        row.observe(tok)
    out = adjust_logits(torch.zeros(1, 5), [row])
    # token 1: 1 x 0.25 + 0.5; token 2: 3 x 0.25 + 0.5; token 3: +7; unseen tokens untouched
    assert out[0].tolist() == pytest.approx([0.0, -0.75, -1.25, 7.0, 0.0])
    plain = RowSampler.create(SamplingParams(temperature=0.0))
    both = adjust_logits(torch.zeros(2, 5), [plain, row])
    assert both[0].tolist() == [0.0] * 5 and both[1].tolist() == pytest.approx(out[0].tolist())


def test_penalty_counts_stay_exact_past_their_first_allocation():
    row = RowSampler.create(SamplingParams(temperature=0.0, frequency_penalty=1.0))
    tokens = [t % 150 for t in range(400)]  # 150 distinct tokens, beyond the first 64 slots
    for tok in tokens:
        row.observe(tok)
    want = -torch.bincount(torch.tensor(tokens), minlength=200).float()
    assert torch.equal(adjust_logits(torch.zeros(1, 200), [row])[0], want)


def test_greedy_rows_follow_bias_and_penalties():
    logits = torch.tensor([[5.0, 4.0, 0.0, 0.0]])
    assert sample_next(logits, [RowSampler.create(SamplingParams(temperature=0.0))]) == [0]
    banned = RowSampler.create(SamplingParams(temperature=0.0, logit_bias=((0, -100.0),)))
    assert sample_next(logits, [banned]) == [1]
    forced = RowSampler.create(SamplingParams(temperature=0.0, logit_bias=((3, 100.0),)))
    assert sample_next(logits, [forced]) == [3]
    penalized = RowSampler.create(SamplingParams(temperature=0.0, frequency_penalty=2.0))
    assert [sample_next(logits, [penalized])[0] for _ in range(3)] == [0, 1, 0]  # 5-2=3 < 4, then 4-2=2 < 3


def test_top_k_keeps_each_rows_k_best():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0], [1.0, 4.0, 3.0, 2.0]])
    out = top_k_filter(logits, torch.tensor([2, 4]))
    assert torch.isfinite(out[0]).tolist() == [False, True, True, False]
    assert torch.isfinite(out[1]).all()
    rows = [RowSampler.create(SamplingParams(temperature=2.0, top_k=1, seed=s)) for s in range(8)]
    assert sample_next(logits[[0] * 8], rows) == [1] * 8


def test_a_seeded_penalized_row_does_not_depend_on_its_neighbours():
    torch.manual_seed(0)
    steps = [torch.randn(6, 50) for _ in range(12)]
    params = SamplingParams(temperature=1.0, top_k=10, top_p=0.9, seed=42, presence_penalty=1.0,
                            frequency_penalty=0.5, logit_bias=((7, 3.0),))

    def run(batch: bool) -> list[int]:
        me = RowSampler.create(params)
        others = [RowSampler.create(SamplingParams(temperature=1.0, frequency_penalty=1.0)) for _ in range(5)]
        picks = []
        for logits in steps:
            rows = [others[0], others[1], me, *others[2:]] if batch else [me]
            out = sample_next(logits[[0, 1, 2, 3, 4, 5]] if batch else logits[[2]], rows)
            picks.append(out[2] if batch else out[0])
        return picks

    assert run(batch=False) == run(batch=True)


def test_sampling_params_refuse_out_of_range_values():
    for bad, match in (({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": float("nan")},
                       "frequency_penalty"), ({"top_k": -2}, "top_k"), ({"logit_bias": ((1, 101.0),)}, "logit_bias"),
                       ({"logit_bias": tuple((i, 1.0) for i in range(301))}, "logit_bias")):
        with pytest.raises(ValueError, match=match):
            SamplingParams(**bad)


def test_choice_seeds_follow_vllm_and_stay_in_range():
    assert [choice_seed(7, i) for i in range(3)] == [7, 8, 9]
    assert choice_seed(SEED_MAX, 1) == SEED_MIN  # wraps instead of overflowing torch's seed
    assert choice_response_id("chatcmpl-x", 0) == "chatcmpl-x" and choice_response_id("chatcmpl-x", 2) == "chatcmpl-x-2"


# ---------------------------------------------------------------------- sampling over HTTP
def test_frequency_and_presence_penalties_reduce_repeated_tokens(client):
    plain = _ids(client)
    assert _repeats(plain) >= 4, plain  # the tiny base loops; the test needs something to reduce
    for field in ("frequency_penalty", "presence_penalty"):
        penalized = _ids(client, **{field: 2.0})
        assert penalized[0] == plain[0]  # nothing generated yet: the first token is the same
        assert _repeats(penalized) < _repeats(plain), (field, plain, penalized)
    assert _repeats(_ids(client, frequency_penalty=-2.0)) >= _repeats(plain)  # negative: more repeats


def test_top_k_one_is_greedy(client):
    greedy = _ids(client)
    for seed in (1, 2):
        assert _ids(client, temperature=2.0, seed=seed, extra_body={"top_k": 1}) == greedy
        assert _ids(client, temperature=2.0, seed=seed, extra_body={"top_k": 50}) != greedy  # still samples
    assert _ids(client, temperature=2.0, seed=1, extra_body={"top_k": -1}) != greedy  # -1: no limit (vLLM)


def test_logit_bias_bans_and_forces_tokens(client, srv):
    greedy = _ids(client, max_tokens=3)
    banned = _ids(client, max_tokens=3, logit_bias={str(greedy[0]): -100})
    assert banned[0] != greedy[0] and greedy[0] not in banned
    forced_id = srv.service.engine.encode(" river")[0]
    assert _ids(client, max_tokens=4, logit_bias={str(forced_id): 100}) == [forced_id] * 4
    # sampled rows too: +100 dominates at any temperature the API allows
    assert _ids(client, max_tokens=4, temperature=2.0, seed=3, logit_bias={str(forced_id): 100}) == [forced_id] * 4


def test_sampling_parameters_are_logged(client, srv):
    srv.logger.events.clear()
    r = client.chat.completions.create(model="base", messages=MSGS, max_tokens=3, temperature=0.7, seed=5,
                                       presence_penalty=0.5, frequency_penalty=-0.5, extra_body={"top_k": 20})
    (event,) = [e for e in srv.logger.events if e.response_id == r.id]
    s = event.sampling
    assert (s.temperature, s.seed, s.presence_penalty, s.frequency_penalty, s.top_k) == (0.7, 5, 0.5, -0.5, 20)


def test_seeded_answers_with_every_knob_do_not_depend_on_the_batch(srv):
    body = {"model": "base", "prompt": PROMPT, "max_tokens": 12, "temperature": 1.3, "seed": 11, "top_k": 40,
            "top_p": 0.95, "frequency_penalty": 0.7, "presence_penalty": 0.3, "logit_bias": {"5": 2.0},
            "ignore_eos": True}

    def post(b):
        return httpx.post(f"{srv.url}/v1/completions", json=b, timeout=60).json()["choices"][0]["text"]

    alone = post(body)
    noise = [{**body, "seed": None, "prompt": f"noise {i}", "frequency_penalty": 0.0} for i in range(6)]
    with cf.ThreadPoolExecutor(7) as ex:
        futures = [ex.submit(post, b) for b in noise[:3] + [body] + noise[3:]]
        assert futures[3].result() == alone


# ---------------------------------------------------------------------- n > 1
def test_n_choices_plain(client, srv):
    srv.logger.events.clear()
    kw = dict(model="base", prompt=PROMPT, max_tokens=8, temperature=1.5, seed=21,
              extra_body={"ignore_eos": True, "return_token_ids": True})
    one = client.completions.create(**kw)
    r = client.completions.create(**kw, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.choices[0].text == one.choices[0].text  # choice i is sampled with seed + i, as in vLLM
    assert len({c.text for c in r.choices}) == 3
    assert r.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counts once
    assert r.usage.completion_tokens == sum(len(c.model_extra["token_ids"]) for c in r.choices) == 24
    ids = [c.model_extra["looprl_response_id"] for c in r.choices]
    assert ids == [r.id, f"{r.id}-1", f"{r.id}-2"]
    logged = {e.response_id: e for e in srv.logger.events}
    for c, rid in zip(r.choices, ids):
        e = logged[rid]
        assert e.completion == c.text and e.completion_token_ids == c.model_extra["token_ids"]
        assert e.sampling.seed == 21 + c.index  # the seed that choice was sampled with
    assert r.model_extra["looprl_adapter_version"] == "base"


def test_n_choices_streamed_add_up_to_the_plain_answer(client, srv):
    srv.logger.events.clear()
    kw = dict(model="base", messages=MSGS, max_tokens=8, temperature=1.5, seed=4, n=3,
              extra_body={"ignore_eos": True})
    plain = client.chat.completions.create(**kw)
    stream = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    texts, roles, finish, ids = {}, {}, {}, {}
    for c in stream:
        for ch in c.choices:
            texts[ch.index] = texts.get(ch.index, "") + (ch.delta.content or "")
            if ch.delta.role:
                roles[ch.index] = ch.delta.role
            if ch.finish_reason:
                finish[ch.index] = ch.finish_reason
                ids[ch.index] = ch.model_extra["looprl_response_id"]
    assert texts == {c.index: c.message.content for c in plain.choices}
    assert roles == {0: "assistant", 1: "assistant", 2: "assistant"} and finish == {0: "length", 1: "length", 2: "length"}
    sid = stream[0].id
    assert ids == {0: sid, 1: f"{sid}-1", 2: f"{sid}-2"}
    assert stream[-1].usage.completion_tokens == plain.usage.completion_tokens == 24
    logged = {e.response_id: e.completion for e in srv.logger.events}
    assert {i: logged[rid] for i, rid in ids.items()} == texts  # each choice logged under its own id


# ---------------------------------------------------------------------- refused fields
CHAT = {"model": "base", "messages": MSGS, "max_tokens": 1}
COMPLETION = {"model": "base", "prompt": "x", "max_tokens": 1}


@pytest.mark.parametrize("body,param,says", [
    ({**CHAT, "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools", "tool calling"),
    ({**CHAT, "tool_choice": "auto"}, "tool_choice", "tool calling"),
    ({**CHAT, "functions": [{"name": "f"}]}, "functions", "function calling"),
    ({**CHAT, "response_format": {"type": "json_object"}}, "response_format", "text"),
    ({**COMPLETION, "echo": True}, "echo", "echo"),
    ({**COMPLETION, "best_of": 2}, "best_of", "best_of"),
    ({**COMPLETION, "suffix": "end"}, "suffix", "suffix"),
    ({**CHAT, "audio": {"voice": "alloy", "format": "wav"}}, "audio", "audio"),
    ({**CHAT, "modalities": ["text", "audio"]}, "modalities", "text"),
    ({**CHAT, "min_p": 0.1}, "min_p", "min_p"),
    ({**CHAT, "repetition_penalty": 1.2}, "repetition_penalty", "frequency_penalty"),
    ({**CHAT, "guided_json": {"type": "object"}}, "guided_json", "guided"),
    ({**CHAT, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]}]},
     "messages[0].content[1].type", "'image_url'"),
    ({**CHAT, "messages": [*MSGS, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]},
     "messages[1].tool_calls", "tool calling"),
])
def test_what_is_not_honoured_is_refused_naming_the_field(srv, body, param, says):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    r = httpx.post(f"{srv.url}{path}", json=body, timeout=60)
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == param and says in err["message"], r.text
    assert err["type"] == "invalid_request_error" and err["code"] == "unsupported"


def test_the_openai_client_sees_refusals_as_bad_requests(client):
    with pytest.raises(openai.BadRequestError, match="tools: tool calling is not supported") as e:
        client.chat.completions.create(model="base", messages=MSGS, max_tokens=1, tools=[
            {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}])
    assert e.value.param == "tools"
    with pytest.raises(openai.BadRequestError, match="response_format") as e:
        client.chat.completions.create(model="base", messages=MSGS, max_tokens=1,
                                       response_format={"type": "json_object"})
    assert e.value.param == "response_format"


def test_harmless_fields_and_default_values_are_accepted(srv):
    body = {**CHAT, "tool_choice": "none", "tools": [], "response_format": {"type": "text"}, "logprobs": False,
            "parallel_tool_calls": True, "store": False, "metadata": {"k": "v"}, "n": 1, "best_of": 1,
            "modalities": ["text"], "repetition_penalty": 1.0, "some_future_knob": {"x": 1}}
    r = httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("bias,says", [
    ({"999999999": 1}, "token id 999999999 is not in the vocabulary"),
    ({"5": 150}, "between -100 and 100"),
    ({str(i): 1 for i in range(301)}, "at most 300 items"),
    ({"five": 1}, "keys must be integers, got 'five'"),
    ({"-3": 1}, "token id -3 is negative"),
])
def test_logit_bias_is_checked_against_the_vocabulary_and_the_bounds(srv, bias, says):
    r = httpx.post(f"{srv.url}/v1/completions", json={**COMPLETION, "logit_bias": bias}, timeout=60)
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "logit_bias" and says in err["message"], r.text


# ---------------------------------------------------------------------- error shape on every route
def test_unknown_paths_and_wrong_methods_answer_in_openai_shape(srv, client):
    r = httpx.get(f"{srv.url}/v1/nope")
    assert r.status_code == 404 and set(r.json()) == {"error"}, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert (err["type"], err["code"]) == ("not_found_error", "not_found") and "GET /v1/nope" in err["message"]
    r = httpx.get(f"{srv.url}/v1/chat/completions")
    err = r.json()["error"]
    assert r.status_code == 405 and err["code"] == "method_not_allowed" and "POST" in r.headers["allow"]
    assert "method GET is not allowed on /v1/chat/completions" in err["message"]
    assert httpx.post(f"{srv.url}/health").json()["error"]["code"] == "method_not_allowed"
    with pytest.raises(openai.NotFoundError, match="no such route: POST /v1/embeddings"):
        client.embeddings.create(model="base", input="x")


# ---------------------------------------------------------------------- readable validation messages
@pytest.mark.parametrize("body,param,message", [
    ({**CHAT, "messages": [{"role": "user", "content": 5}]}, "messages[0].content",
     "messages[0].content: must be a string or a list of text parts"),
    ({**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]},
     "messages[0].content[0].text", "messages[0].content[0].text: must be a string"),
    ({**CHAT, "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role",
     "messages[0].role: must be 'system', 'developer', 'user', 'assistant' or 'tool'"),
    ({**CHAT, "messages": [{"content": "x"}]}, "messages[0].role", "messages[0].role: is required"),
    ({**CHAT, "stop": ["ok", 7]}, "stop[1]", "stop[1]: must be a string"),
    ({**CHAT, "stop": 7}, "stop", "stop: must be a string or a list of strings"),
    ({**CHAT, "max_tokens": "ten"}, "max_tokens", "max_tokens: must be an integer"),
    ({**CHAT, "presence_penalty": 3}, "presence_penalty", "presence_penalty: must be <= 2.0"),
    ({"messages": MSGS}, "model", "model: is required"),
    ({**COMPLETION, "prompt": {"text": "x"}}, "prompt", "prompt: must be a string or a list of strings"),
])
def test_validation_messages_name_the_field_as_the_client_wrote_it(srv, body, param, message):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    r = httpx.post(f"{srv.url}{path}", json=body, timeout=60)
    err = r.json()["error"]
    assert r.status_code == 400 and (err["param"], err["message"]) == (param, message), r.text


def test_bodies_that_are_not_objects_get_a_plain_message(srv):
    r = httpx.post(f"{srv.url}/v1/completions", content=b'{"model": "base", "prompt": ',
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("request body is not valid JSON")
    r = httpx.post(f"{srv.url}/v1/completions", json=[1, 2])
    assert r.status_code == 400 and r.json()["error"]["message"] == "request body must be a JSON object"


def test_union_errors_collapse_without_a_server():
    body = {"model": "m", "messages": [{"role": "user", "content": [{"type": "text"}]}]}
    with pytest.raises(ValidationError) as e:
        ChatCompletionRequest.model_validate(body)
    assert len(e.value.errors()) == 2  # pydantic: one per member of str | list[TextPart]
    assert readable_error(e.value.errors(), body, prefix=()) == (
        "messages[0].content[0]", "messages[0].content[0]: a text part needs its 'text'")
    # without the body, member names are told from field names by their look
    assert readable_error(e.value.errors(), None, prefix=())[0] == "messages[0].content[0]"
    assert json.dumps(readable_error([], None))  # no errors: still a message


def test_a_failing_forward_fails_every_choice_once_and_logs_none(srv, monkeypatch):
    """Kept last: it fails the base model's requests on purpose (a success afterwards resets its health)."""
    engine = srv.service.engine
    srv.logger.events.clear()

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(engine.model, "forward", boom)
    body = {**COMPLETION, "n": 3, "max_tokens": 4}
    r = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 500 and "boom" in r.json()["error"]["message"] and r.json()["error"]["code"] == "forward_error"
    with httpx.stream("POST", f"{srv.url}/v1/completions", json={**body, "stream": True}, timeout=60) as s:
        events = [line for line in s.iter_lines() if line.startswith("data: ")]
    assert len(events) == 1 and json.loads(events[0][6:])["error"]["code"] == "forward_error"
    monkeypatch.undo()
    assert srv.logger.events == [] and engine.stats() == {**engine.stats(), "waiting": 0, "running": 0}
    assert httpx.post(f"{srv.url}/v1/completions", json=body, timeout=60).status_code == 200
