"""`looprl demo` set-up: tuning that never overrides the user's config, clear errors, safe --fresh."""

from __future__ import annotations

import json

import pytest

from looprl.ops.core.config import ConfigError, load_config
from looprl.ops.demo import DEMO_TUNING, _env_name, allocate_ports, demo_env, prepare_workspace, tuning_env


def test_tuning_applies_only_where_the_user_kept_the_default(tmp_path):
    cfg = load_config(environ={}, workspace=tmp_path)
    env = tuning_env(cfg)
    assert env["LOOPRL_POLICY__STEPS"] == str(DEMO_TUNING["policy.steps"])
    assert json.loads(env["LOOPRL_SCHEDULER__JOBS"]) == ["policy"]
    mine = load_config(environ={"LOOPRL_POLICY__STEPS": "7"}, workspace=tmp_path, canary={"min_samples": 99})
    env = tuning_env(mine)
    assert "LOOPRL_POLICY__STEPS" not in env and "LOOPRL_CANARY__MIN_SAMPLES" not in env
    assert {_env_name(k) for k in DEMO_TUNING} <= set(tuning_env(cfg))
    # a value the user set wins also where it is the schema's default, which the demo tunes away
    same = {"LOOPRL_CANARY__PROMOTE_ON_NO_REGRESSION": "true", "LOOPRL_POLICY__TARGET_KL": "3.0"}
    env = tuning_env(load_config(environ=same, workspace=tmp_path))
    assert "LOOPRL_CANARY__PROMOTE_ON_NO_REGRESSION" not in env and "LOOPRL_POLICY__TARGET_KL" not in env
    child = load_config(environ={**same, **env}, workspace=tmp_path)
    assert child.canary.promote_on_no_regression is True and child.policy.target_kl == 3.0
    assert child.policy.steps == DEMO_TUNING["policy.steps"]  # the rest is still tuned
    # every tuned key is a real config key with a valid value
    tuned = load_config(environ=tuning_env(cfg), workspace=tmp_path)
    assert tuned.policy.steps == DEMO_TUNING["policy.steps"] and tuned.scheduler.jobs == ["policy"]
    assert tuned.canary.promote_on_no_regression is False  # a bool survives the environment as one


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


def test_feedback_profiles_set_the_fractions_the_user_left_unset(tmp_path):
    from looprl.ops.sim.profiles import resolve_demo, with_feedback

    generous = resolve_demo(load_config(environ={}, workspace=tmp_path).demo)
    assert (generous.thumbs_fraction, generous.preference_fraction, generous.correction_fraction) == (0.25, 1.0, 0.0)
    sparse = resolve_demo(load_config(environ={"LOOPRL_DEMO__FEEDBACK": "sparse"}, workspace=tmp_path).demo)
    assert (sparse.thumbs_fraction, sparse.preference_fraction, sparse.correction_fraction) == (0.05, 0.05, 0.01)
    assert not sparse.request_comparisons
    # an environment variable (or looprl.toml) wins over the profile, also when it says the default
    mine = load_config(environ={"LOOPRL_DEMO__THUMBS_FRACTION": "0.25", "LOOPRL_DEMO__PREFERENCE_FRACTION": "0.2"},
                       workspace=tmp_path)
    mine = resolve_demo(with_feedback(mine, "targeted").demo)  # --feedback targeted
    assert (mine.thumbs_fraction, mine.preference_fraction, mine.correction_fraction) == (0.25, 0.2, 0.01)
    assert mine.request_comparisons and resolve_demo(mine) == mine
    with pytest.raises(ValueError, match="feedback"):
        load_config(environ={"LOOPRL_DEMO__FEEDBACK": "stingy"}, workspace=tmp_path)


def test_sparse_profiles_tune_the_loop_for_fewer_labels_and_targeted_sets_a_comparison_budget(tmp_path):
    from looprl.ops.demo import PROFILE_TUNING
    from looprl.ops.sim.profiles import comparisons_per_hour

    generous = tuning_env(load_config(environ={}, workspace=tmp_path))
    assert generous["LOOPRL_DEMO__FEEDBACK"] == "generous"
    assert generous["LOOPRL_REWARD__MIN_NEW_EVENTS"] == str(DEMO_TUNING["reward.min_new_events"])
    assert "LOOPRL_SERVING__COMPARE_PER_HOUR" not in generous
    sparse_cfg = load_config(environ={"LOOPRL_DEMO__FEEDBACK": "sparse"}, workspace=tmp_path)
    sparse = load_config(environ=tuning_env(sparse_cfg), workspace=tmp_path)  # what the children read
    assert sparse.demo.feedback == "sparse"
    assert sparse.reward.min_new_events == PROFILE_TUNING["sparse"]["reward.min_new_events"] < 48
    assert sparse.canary.min_samples < DEMO_TUNING["canary.min_samples"]
    # the profile's own value beats the demo's
    assert sparse.canary.max_samples == PROFILE_TUNING["sparse"]["canary.max_samples"] < DEMO_TUNING["canary.max_samples"]
    # PPO starts on the label floor even where the skill bound never clears (generous: no floor)
    assert sparse.scheduler.policy_start_after_labels == PROFILE_TUNING["sparse"]["scheduler.policy_start_after_labels"] > 0
    assert load_config(environ=generous, workspace=tmp_path).scheduler.policy_start_after_labels == 0
    # the sparse reward model's heads read sums over the answer; the generous one's keep the means
    assert sparse.reward.features == "echo_sum"
    assert load_config(environ=generous, workspace=tmp_path).reward.features == "echo"
    # sparse and generous share the demo's leash and line (each run continues the newest gated
    # version); a user's own choice still wins over both
    g = load_config(environ=generous, workspace=tmp_path)
    for key in ("policy.target_kl", "gate.max_kl", "policy.continue_from"):
        section, name = key.split(".")
        assert getattr(getattr(sparse, section), name) == getattr(getattr(g, section), name) == DEMO_TUNING[key]
    assert sparse.policy.continue_from == "newest_gated"
    mine_cfg = load_config(environ={"LOOPRL_DEMO__FEEDBACK": "sparse", "LOOPRL_POLICY__CONTINUE_FROM": "promoted"},
                           workspace=tmp_path)
    assert "LOOPRL_POLICY__CONTINUE_FROM" not in tuning_env(mine_cfg)
    # targeted: serve's budget equals the sparse profile's 5% comparisons at the demo's request rate
    cfg = load_config(environ={"LOOPRL_DEMO__FEEDBACK": "targeted"}, workspace=tmp_path,
                      demo={"max_requests_per_second": 4.0, "eval_fraction": 0.5})
    child = load_config(environ=tuning_env(cfg), workspace=tmp_path)
    assert child.serving.compare_per_hour == pytest.approx(0.05 * 4.0 * 0.5 * 3600)
    assert child.serving.compare == "never"  # asked per request, by product users only
    assert comparisons_per_hour(cfg.demo.model_copy(update={"comparisons_per_hour": 30.0})) == 30.0
    # a budget the user configured for serving wins
    mine = load_config(environ={"LOOPRL_DEMO__FEEDBACK": "targeted", "LOOPRL_SERVING__COMPARE_PER_HOUR": "7"},
                       workspace=tmp_path)
    assert "LOOPRL_SERVING__COMPARE_PER_HOUR" not in tuning_env(mine)


def test_feedback_flag_reaches_the_demo(tmp_path, capsys, monkeypatch):
    from looprl.ops import demo
    from looprl.ops.cli import main

    seen = {}
    monkeypatch.setattr(demo, "run_demo", lambda cfg, **kw: seen.update(kw) or 0)
    assert main(["--workspace", str(tmp_path / "ws"), "demo", "--feedback", "sparse", "--no-ui"]) == 0
    assert seen["feedback"] == "sparse"
    with pytest.raises(SystemExit):
        main(["--workspace", str(tmp_path / "ws"), "demo", "--feedback", "stingy"])
    assert "sparse" in capsys.readouterr().err  # the choices are listed
