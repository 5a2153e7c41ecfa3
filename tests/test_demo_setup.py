"""`looprl demo` set-up: tuning that never overrides the user's config, clear errors, safe --fresh."""

from __future__ import annotations

import json

import pytest

from looprl.ops.core.config import ConfigError, load_config
from looprl.ops.demo import DEMO_TUNING, allocate_ports, demo_env, prepare_workspace, tuning_env


def test_tuning_applies_only_where_the_user_kept_the_default(tmp_path):
    cfg = load_config(environ={}, workspace=tmp_path)
    env = tuning_env(cfg)
    assert env["LOOPRL_POLICY__STEPS"] == str(DEMO_TUNING["policy.steps"])
    assert json.loads(env["LOOPRL_SCHEDULER__JOBS"]) == ["policy"]
    mine = load_config(environ={"LOOPRL_POLICY__STEPS": "7"}, workspace=tmp_path, canary={"min_samples": 99})
    env = tuning_env(mine)
    assert "LOOPRL_POLICY__STEPS" not in env and "LOOPRL_CANARY__MIN_SAMPLES" not in env
    # every tuned key is a real config key with a valid value
    tuned = load_config(environ=tuning_env(cfg), workspace=tmp_path)
    assert tuned.policy.steps == DEMO_TUNING["policy.steps"] and tuned.scheduler.jobs == ["policy"]


def test_children_get_free_ports_and_the_workspace(tmp_path):
    cfg = load_config(environ={}, workspace=tmp_path / "ws")
    ports = allocate_ports()
    assert len(set(ports.values())) == len(ports)
    env = demo_env(cfg, ports, "secret")
    child = load_config(environ=env)
    assert child.workspace == (tmp_path / "ws").resolve()
    assert child.serving.port == ports["serve"] and child.serving.endpoints == [f"http://127.0.0.1:{ports['serve']}"]
    assert child.kafka.bootstrap_servers == f"127.0.0.1:{ports['broker']}"
    assert child.serving.admin_token.get_secret_value() == "secret"
    assert child.log_format == "json"  # the failure watch parses the children's logs, even under log_format=human
    assert env["OMP_NUM_THREADS"] == "1"
    # a configured Kafka is used as is (no embedded broker)
    real = load_config(environ={}, workspace=tmp_path, kafka={"bootstrap_servers": "kafka:9092"})
    assert load_config(environ=demo_env(real, ports, "s")).kafka.bootstrap_servers == "kafka:9092"


def test_fresh_refuses_to_delete_a_directory_that_is_not_a_workspace(tmp_path):
    d = tmp_path / "important"
    d.mkdir()
    (d / "thesis.tex").write_text("years of work")
    cfg = load_config(environ={}, workspace=d)
    with pytest.raises(ConfigError, match="not a looprl workspace"):
        prepare_workspace(cfg, fresh=True)
    assert (d / "thesis.tex").exists()


def test_fresh_keeps_the_built_base_model(tmp_path):
    ws = tmp_path / "ws"
    (ws / "base").mkdir(parents=True)
    (ws / "base" / "config.json").write_text("{}")
    (ws / "registry" / "policy").mkdir(parents=True)
    (ws / "state").mkdir()
    prepare_workspace(load_config(environ={}, workspace=ws), fresh=True)
    assert (ws / "base" / "config.json").exists()
    assert not (ws / "registry").exists() and not (ws / "state").exists()


def test_bad_preference_is_refused_before_anything_starts(tmp_path, capsys):
    from looprl.ops.cli import main

    rc = main(["--workspace", str(tmp_path / "ws"), "demo", "--preference", "no_such_module:fn", "--no-ui"])
    assert rc == 2
    assert "no_such_module:fn" in capsys.readouterr().err
    assert not (tmp_path / "ws").exists()
