"""The one config schema: file < environment < overrides; unknown keys and bad values are
errors that name the key."""

from pathlib import Path

import pytest

from looprl.ops.cli import main
from looprl.ops.core.config import ConfigError, load_config


def test_defaults_without_file_or_env(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(environ={})
    assert cfg.kafka.bootstrap_servers is None  # embedded broker by default
    assert cfg.base_path == Path("looprl-workspace") / "base"


def test_file_then_env_then_overrides(tmp_path):
    f = tmp_path / "looprl.toml"
    f.write_text('workspace = "/srv/ws"\n[kafka]\nbootstrap_servers = "k1:9092"\n[reward]\nbatch_size = 7\n')
    cfg = load_config(f, environ={"LOOPRL_KAFKA__BOOTSTRAP_SERVERS": "k2:9092"})
    assert cfg.kafka.bootstrap_servers == "k2:9092"  # env beats file
    assert cfg.reward.batch_size == 7  # file beats default
    assert cfg.registry_dir == Path("/srv/ws/registry")
    cfg = load_config(f, environ={}, reward={"batch_size": 3})
    assert cfg.reward.batch_size == 3 and cfg.kafka.bootstrap_servers == "k1:9092"


def test_env_list_values_are_json(tmp_path):
    cfg = load_config(environ={"LOOPRL_SERVING__ENDPOINTS": '["http://a:1", "http://b:2"]'})
    assert cfg.serving.endpoints == ["http://a:1", "http://b:2"]


@pytest.mark.parametrize(
    "toml, key",
    [
        ("[reward]\nbatch_sise = 3\n", "reward.batch_sise"),  # typo: unknown key
        ("[reward]\nbatch_size = -1\n", "reward.batch_size"),  # out of range
        ("[kafka]\nclient = 'java'\n", "kafka.client"),  # not one of the choices
        ("[nope]\nx = 1\n", "nope"),  # unknown section
    ],
)
def test_bad_file_values_name_the_key(tmp_path, toml, key):
    f = tmp_path / "looprl.toml"
    f.write_text(toml)
    with pytest.raises(ConfigError) as e:
        load_config(f, environ={})
    assert f"'{key}" in str(e.value) and str(f) in str(e.value)


def test_bad_env_names_the_key():
    with pytest.raises(ConfigError, match="policy.stepz"):
        load_config(environ={"LOOPRL_POLICY__STEPZ": "3"})
    with pytest.raises(ConfigError, match="policy.steps"):
        load_config(environ={"LOOPRL_POLICY__STEPS": "many"})


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.toml", environ={})
    bad = tmp_path / "bad.toml"
    bad.write_text("[reward\n")
    with pytest.raises(ConfigError, match="bad.toml"):
        load_config(bad, environ={})


def test_cli_reports_config_errors(tmp_path, capsys, monkeypatch):
    f = tmp_path / "looprl.toml"
    f.write_text("[serving]\nport = 'eighty'\n")
    monkeypatch.setenv("LOOPRL_CONFIG", str(f))
    assert main(["config"]) == 2
    assert "serving.port" in capsys.readouterr().err


def test_cli_config_prints_effective_config(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LOOPRL_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LOOPRL_SERVING__ADMIN_TOKEN", "s3cret")
    monkeypatch.setenv("LOOPRL_REWARD__BATCH_SIZE", "5")
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert '"batch_size": 5' in out
    assert "s3cret" not in out  # secrets are masked


def test_metrics_host_is_configurable_for_containers(tmp_path):
    """Prometheus in another container can only scrape a /metrics bound beyond loopback."""
    import urllib.request

    from looprl.ops.core.metrics import serve_metrics

    assert load_config(environ={}).metrics_host == "127.0.0.1"
    cfg = load_config(environ={"LOOPRL_METRICS_HOST": "0.0.0.0"})
    assert cfg.metrics_host == "0.0.0.0"
    port = serve_metrics(0, host=cfg.metrics_host)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        assert b"python_info" in r.read()


def test_structured_logs_follow_a_replaced_stderr(monkeypatch):
    # The handler is made once per process; a stderr replaced (and closed) later, as pytest's
    # capture and daemonizing wrappers do, must not turn every log line into a logging error.
    import io
    import json
    import sys

    from looprl.ops.core.log import get_logger, setup_logging

    setup_logging("INFO")
    old = io.StringIO()
    monkeypatch.setattr(sys, "stderr", old)
    get_logger("test").info("first", n=1)
    old.close()
    new = io.StringIO()
    monkeypatch.setattr(sys, "stderr", new)
    get_logger("test").info("second", n=2)
    line = json.loads(new.getvalue().strip().splitlines()[-1])
    assert line["msg"] == "second" and line["n"] == 2 and line["logger"] == "looprl.test"
