"""The collector's CORS (``ingest.collector_cors_origins``) and its error bodies, which have the shape
of serving's and the gateway's (OpenAI's ``{"error": {"message", "type", "param", "code"}}``)."""

from __future__ import annotations

import json

from fastapi.testclient import TestClient

from kafka_testing import RecordingProducer
from looprl.ingest.collector import create_app
from looprl.ops.core.config import load_config
from looprl.ops.core.errors import error_body


TOKEN = "s3cret"
APP_ORIGIN = "https://app.example.com"
THUMBS = {"kind": "thumbs", "response_id": "r1", "up": True}


def collector(tmp_path, **ingest) -> tuple[TestClient, RecordingProducer]:
    cfg = load_config(environ={}, workspace=tmp_path / "ws",
                      ingest={"collector_token": TOKEN, "collector_max_body_bytes": 2048, **ingest})
    rec = RecordingProducer()
    return TestClient(create_app(cfg, rec)), rec


AUTH = {"Authorization": f"Bearer {TOKEN}"}
PREFLIGHT = {"Origin": APP_ORIGIN, "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization,content-type"}


def assert_error_shape(r, status: int, code: str, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body["error"]) == set(error_body("m", type="t")["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code and body["error"]["param"] == param
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body


def test_a_web_front_end_of_an_allowed_origin_may_post(tmp_path):
    c, rec = collector(tmp_path, collector_cors_origins=[APP_ORIGIN])
    pre = c.options("/v1/feedback", headers=PREFLIGHT)
    assert pre.status_code == 200
    assert pre.headers["access-control-allow-origin"] == APP_ORIGIN
    assert "POST" in pre.headers["access-control-allow-methods"]
    assert {"authorization", "content-type"} <= {h.strip().lower() for h in
                                                 pre.headers["access-control-allow-headers"].split(",")}
    r = c.post("/v1/feedback", json={**THUMBS, "comment": "from the page"}, headers={**AUTH, "Origin": APP_ORIGIN})
    assert r.status_code == 202 and r.headers["access-control-allow-origin"] == APP_ORIGIN
    assert json.loads(rec.values[0])["comment"] == "from the page"
    # an error is readable by the page too
    r = c.post("/v1/feedback", json=THUMBS, headers={"Origin": APP_ORIGIN})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == APP_ORIGIN

    other = c.options("/v1/feedback", headers={**PREFLIGHT, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    assert_error_shape(other, 400, "cors_refused")
    r = c.post("/v1/feedback", json=THUMBS, headers={**AUTH, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers  # the browser keeps the answer from the page


def test_no_cors_unless_configured(tmp_path):
    c, _ = collector(tmp_path)
    pre = c.options("/v1/feedback", headers=PREFLIGHT)
    assert "access-control-allow-origin" not in pre.headers
    assert_error_shape(pre, 405, "method_not_allowed")
    r = c.post("/v1/feedback", json=THUMBS, headers={**AUTH, "Origin": APP_ORIGIN})
    assert r.status_code == 202 and "access-control-allow-origin" not in r.headers


def test_error_bodies_have_one_shape(tmp_path):
    c, rec = collector(tmp_path)
    body = assert_error_shape(c.post("/v1/feedback", json=THUMBS), 401, "unauthorized")
    assert body["error"]["type"] == "authentication_error" and "ingest.collector_token" in body["error"]["message"]

    body = assert_error_shape(c.post("/v1/feedback", content=b"x" * 3000, headers=AUTH), 413, "too_large")
    assert body["error"]["type"] == "invalid_request_error"
    assert "ingest.collector_max_body_bytes" in body["error"]["message"]

    # one bad event: its reason is the code, its field the param
    body = assert_error_shape(c.post("/v1/feedback", json={**THUMBS, "up": "maybe"}, headers=AUTH), 400,
                              "invalid_fields", "up")
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["message"].startswith("up: ")
    # in a batch the param says which event; every refused event is listed beside "error"
    batch = {"events": [THUMBS, {"kind": "score", "response_id": "r1", "name": "n", "value": {"no": 1}},
                        {**THUMBS, "metadata": {"a": {"b": {"c": {"d": [1]}}}}}]}
    body = assert_error_shape(c.post("/v1/feedback", json=batch, headers=AUTH), 400, "invalid_fields",
                              "events.1.value")
    assert body["error"]["message"].startswith("event 1: value: expected a finite number")
    assert "(and 1 more refused events)" in body["error"]["message"]
    assert [(e["index"], e["reason"]) for e in body["errors"]] == [(1, "invalid_fields"), (2, "invalid_fields")]
    assert "nested deeper" in body["errors"][1]["detail"]
    body = assert_error_shape(c.post("/v1/feedback", json=[THUMBS, {"kind": "response"}], headers=AUTH), 400,
                              "kind_not_accepted", "1.kind")
    assert_error_shape(c.post("/v1/feedback", content=b"{nope", headers=AUTH), 400, "bad_json")
    assert_error_shape(c.get("/v1/nothing-here"), 404, "not_found")
    assert rec.sent == []


def test_any_origin(tmp_path):
    c, _ = collector(tmp_path, collector_cors_origins=["*"])
    pre = c.options("/v1/feedback", headers={**PREFLIGHT, "Origin": "https://anything.example"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] in ("*", "https://anything.example")
