"""The command table `looprl <stage> <action>`: the old spellings still run (with a notice naming
the new form), the commands other processes start exist, and start-up logs one line of config."""

from __future__ import annotations

import argparse
import json
import logging

import pytest

from looprl.ops.cli import DEPRECATED, build_parser, main, undeprecate
from looprl.ops.core.config import LooprlConfig
from looprl.ops.demo import STAGE_COMMANDS


# what the actions with a required argument need to parse
_REQUIRED = {("policy", "gate"): ["v1"], ("canary", "promote"): ["v1"], ("scheduler", "trigger"): ["policy"]}


def _parses(words: list[str]) -> argparse.Namespace:
    args = build_parser().parse_args([*words, *_REQUIRED.get(tuple(words), [])])
    assert callable(getattr(args, "func", None)), words
    return args


@pytest.mark.parametrize("old, new", sorted(DEPRECATED.items()))
def test_every_old_spelling_maps_to_a_command_that_exists(old, new):
    argv, notice = undeprecate(["--workspace", "ws", *old, "--quiet"])
    assert argv == ["--workspace", "ws", *new, "--quiet"]
    assert f"`looprl {' '.join(old)}`" in notice and f"`looprl {' '.join(new)}`" in notice
    args = _parses(list(new))
    assert (args.command, args.action) == new


@pytest.mark.parametrize("argv, expected", [
    (["ingest"], ["ingest", "consume"]),
    (["ingest", "--idle-exit", "1"], ["ingest", "consume", "--idle-exit", "1"]),
    (["--config=x.toml", "scheduler", "--once"], ["--config=x.toml", "scheduler", "run", "--once"]),
    (["--work", "ws", "canary"], ["--work", "ws", "canary", "status"]),
    (["train", "policy", "--steps", "3"], ["policy", "train", "--steps", "3"]),
    (["gate", "v3"], ["policy", "gate", "v3"]),
])
def test_old_spellings_are_rewritten(argv, expected):
    assert undeprecate(argv)[0] == expected


@pytest.mark.parametrize("argv", [
    ["ingest", "consume"], ["ingest", "broker", "--port", "0"], ["scheduler", "run", "--once"],
    ["canary", "status"], ["canary", "promote", "v2"], ["ingest", "--help"], ["reward", "serve"],
    ["serving", "serve"], ["policy", "train"], ["--workspace", "serve", "events", "stats"], ["demo"], [],
])
def test_current_spellings_are_left_alone(argv):
    assert undeprecate(argv) == (argv, None)


def test_the_commands_other_processes_start_are_current_and_exist():
    cfg = LooprlConfig()
    for words in [*STAGE_COMMANDS.values(), cfg.scheduler.reward_command, cfg.scheduler.policy_command]:
        assert undeprecate(list(words)) == (list(words), None)
        build_parser().parse_args(words)


def test_an_old_spelling_runs_the_new_command_with_one_notice(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LOOPRL_CONFIG", raising=False)
    assert main(["--workspace", str(tmp_path / "ws"), "runs", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == []
    notices = [line for line in err.splitlines() if "deprecated" in line]
    assert notices == ["looprl: `looprl runs` is deprecated and goes in the next release; "
                       "use `looprl scheduler runs`"]


def test_no_command_prints_the_table(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    for stage in ("ingest", "events", "reward", "policy", "serving", "scheduler", "canary", "init", "config", "demo"):
        assert f"\n    {stage} " in out
    for old in ("broker", "collector", "train", "gate", "serve", "controller", "trigger", "runs", "promote"):
        assert f"\n    {old} " not in out


@pytest.fixture
def looprl_log_level():
    yield
    logging.getLogger("looprl").setLevel(logging.INFO)


def _log_lines(err: str) -> list[dict]:
    return [json.loads(line) for line in err.splitlines() if line.startswith("{")]


def test_start_up_logs_a_one_line_summary_and_the_whole_config_only_at_debug(tmp_path, monkeypatch, capsys,
                                                                             looprl_log_level):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LOOPRL_CONFIG", raising=False)
    monkeypatch.setenv("LOOPRL_SERVING__ADMIN_TOKEN", "s3cret")
    monkeypatch.setenv("LOOPRL_SERVING__PORT", "8123")
    ws = str(tmp_path / "ws")
    assert main(["--workspace", ws, "events", "stats", "--json"]) == 0
    lines = [r for r in _log_lines(capsys.readouterr().err) if r["logger"] == "looprl.ops.cli"]
    assert len(lines) == 1
    line = lines[0]
    assert line["level"] == "info" and line["command"] == "events stats"
    assert line["workspace"] == ws and line["base_model"] == f"{ws}/base" and line["kafka"] == "embedded"
    assert line["ports"]["serving"] == 8123 and "config" not in line

    monkeypatch.setenv("LOOPRL_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("LOOPRL_KAFKA__BOOTSTRAP_SERVERS", "kafka:9092")
    assert main(["--workspace", ws, "events", "stats", "--json"]) == 0
    err = capsys.readouterr().err
    lines = [r for r in _log_lines(err) if r["logger"] == "looprl.ops.cli"]
    assert [r["level"] for r in lines] == ["info", "debug"] and lines[0]["kafka"] == "kafka:9092"
    assert lines[1]["config"]["serving"]["port"] == 8123 and set(lines[1]["config"]) >= {"kafka", "policy", "demo"}
    assert "s3cret" not in err
