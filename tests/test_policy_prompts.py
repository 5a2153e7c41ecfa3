"""Prompt pool: configured files, held-out split, per-step determinism, clear errors."""

import json

import pytest

from looprl.ops.core.chat import Chat
from looprl.ops.core.config import load_config
from looprl.policy import prompts
from looprl.policy.prompts import PromptSampler, build_pool, heldout_prompts, is_heldout, read_prompt_file


def test_prompt_file_feeds_the_pool_and_heldout_is_disjoint(tmp_path):
    lines = [f"prompt number {i}" for i in range(200)]
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(lines) + "\n\n")
    cfg = load_config(environ={}, workspace=tmp_path / "ws", policy={"prompts_file": str(f), "recent_prompts": 0})
    pool, watermark = build_pool(cfg)
    assert pool == [Chat.user(x) for x in lines] and watermark == {}
    held = heldout_prompts(pool, 1000)
    assert 10 < len(held) < 45  # ~1 in 8
    sampler = PromptSampler(pool, seed=0)
    seen = {p for step in range(50) for p in sampler.batch(step, 16)}
    assert not seen & set(held), "training must never see a held-out prompt"
    assert all(is_heldout(p) for p in held)


def test_batches_depend_only_on_seed_and_step():
    pool = [f"p{i}" for i in range(100)]
    a, b = PromptSampler(pool, seed=1), PromptSampler(list(pool), seed=1)
    assert a.batch(5, 8) == b.batch(5, 8)
    assert a.batch(5, 8) != a.batch(6, 8)
    assert PromptSampler(pool, seed=2).batch(5, 8) != a.batch(5, 8)


def test_bad_prompt_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_prompt_file(tmp_path / "missing.txt")
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt key"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: .*'prompt'"):
        read_prompt_file(bad)
    good = tmp_path / "q.jsonl"
    good.write_text('{"prompt": "a"}\n\n{"prompt": "b"}\n')
    assert read_prompt_file(good) == [Chat.user("a"), Chat.user("b")]
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    multi = tmp_path / "m.jsonl"
    multi.write_text(json.dumps({"messages": chat}) + "\n")
    assert read_prompt_file(multi) == [Chat.from_messages(chat)]
    multi.write_text(json.dumps({"messages": [{"role": "wizard", "content": "x"}]}) + "\n")
    with pytest.raises(ValueError, match=r"m.jsonl:1: .*wizard"):
        read_prompt_file(multi)
    for name, text in (("empty.txt", "\n  \n"), ("blank.jsonl", '{"prompt": " "}\n')):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=f"{name} has no prompts"):
            read_prompt_file(tmp_path / name)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt cannot be read as text"):
        read_prompt_file(tmp_path / "latin1.txt")


@pytest.mark.parametrize("name, text", [("missing.txt", None), ("p.jsonl", '{"text": "x"}\n'), ("e.txt", "\n")])
def test_simulator_names_a_bad_prompt_file_once(tmp_path, name, text):
    from looprl.ops.sim.simulator import prompt_sets

    if text is not None:
        (tmp_path / name).write_text(text)
    cfg = load_config(environ={}, workspace=tmp_path / "ws", policy={"prompts_file": str(tmp_path / name)})
    with pytest.raises(ValueError) as err:
        prompt_sets(cfg)
    assert str(err.value).startswith(f"policy.prompts_file {tmp_path / name}")
    assert str(err.value).count("policy.prompts_file") == 1


def test_pool_without_training_prompts_is_an_error():
    held = [p for p in (f"x{i}" for i in range(200)) if is_heldout(p)]
    with pytest.raises(ValueError, match="no training prompts"):
        PromptSampler(held, seed=0)


class _ResponsesView:
    """Stands in for looprl.storage.events.EventLog: the `responses` view as a DuckDB table."""

    rows: list[dict] = []

    def __init__(self, events_dir):
        self.events_dir = events_dir

    def query(self, sql):
        import duckdb
        import pyarrow as pa

        con = duckdb.connect()
        con.register("responses", pa.Table.from_pylist(self.rows))
        return con.sql(sql).to_arrow_table()


def test_recent_traffic_prompts_come_first_newest_first(tmp_path, monkeypatch):
    from datetime import datetime, timedelta, timezone

    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    # recency is when ingest stored a response, not the producer's ts (here far in the future for the oldest)
    _ResponsesView.rows = [
        {"response_id": f"r{i}", "prompt": p, "messages": None, "completion": "x",
         "ingested_at": t0 + timedelta(seconds=i), "ts": datetime(9999, 12, 31, tzinfo=timezone.utc) if i == 0 else t0}
        for i, p in enumerate(["old prompt", "repeated prompt", "new prompt", "repeated prompt", ""])
    ]
    monkeypatch.setattr(prompts, "EventLog", _ResponsesView)
    f = tmp_path / "p.txt"
    f.write_text("file prompt\nnew prompt\n")
    cfg = load_config(environ={}, workspace=tmp_path / "ws", policy={"prompts_file": str(f), "recent_prompts": 2})
    cfg.events_dir.mkdir(parents=True)
    pool, watermark = build_pool(cfg)
    # the two most recently served distinct prompts (a prompt's recency is its latest response),
    # then the configured ones not already in; empty prompts are skipped
    assert pool == [Chat.user(p) for p in ("repeated prompt", "new prompt", "file prompt")]
    assert watermark["responses_max_ingested_at"].startswith("2026-01-01 00:00:03")


def test_chat_traffic_keeps_its_conversation(tmp_path, monkeypatch):
    """A chat's system prompt and history reach the pool (and so PPO) as structured messages; the
    same last question with another history is another prompt."""
    from datetime import datetime, timezone

    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    chat = [{"role": "system", "content": "answer in french"}, {"role": "user", "content": "describe the park"}]
    _ResponsesView.rows = [
        {"response_id": "r1", "prompt": "system: answer in french\nuser: describe the park",
         "messages": json.dumps(chat), "completion": "x", "ingested_at": t0, "ts": t0},
        {"response_id": "r2", "prompt": "describe the park", "messages": None, "completion": "x",
         "ingested_at": t0, "ts": t0},
        {"response_id": "r3", "prompt": "broken", "messages": "{not json", "completion": "x",
         "ingested_at": t0, "ts": t0},
    ]
    monkeypatch.setattr(prompts, "EventLog", _ResponsesView)
    cfg = load_config(environ={}, workspace=tmp_path / "ws", policy={"recent_prompts": 10})
    cfg.events_dir.mkdir(parents=True)
    traffic, _ = prompts.traffic_prompts(cfg, 10)
    assert set(traffic) == {Chat.from_messages(chat), Chat.user("describe the park")}  # the broken row is skipped
    system = next(c for c in traffic if not c.single_turn)
    assert system.messages[0].role == "system" and system.last_user() == "describe the park"
    assert Chat.parse(system.to_json()) == system  # what a run's prompts.json snapshot stores
