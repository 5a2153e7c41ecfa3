"""Kafka TLS/SASL settings: the config keys and their checks, the one mapping onto kafka-python
and librdkafka, the principal each role connects as, and real client objects carrying them.

No end-to-end SASL test: the embedded broker (Tansu 0.6) cannot serve one. Its
``--authentication`` mode keeps SCRAM users in its storage, and with the only local storage it
has (``memory://``) a user can be created only through the broker itself, which then already
demands authentication; without ``--authentication`` it answers every SaslHandshake with
UNSUPPORTED_SASL_MECHANISM, naming the very mechanism asked for (measured with librdkafka 2.16).
So these tests stop at the client objects, built by looprl.ingest.transport: librdkafka checks
every property name and value when a client is made (an unknown name, missing SASL credentials
or an unreadable CA file raise there), and kafka-python keeps its configuration in ``.config``.
"""

from __future__ import annotations

import inspect
import json
import shutil
import subprocess
from pathlib import Path

import confluent_kafka
import kafka
import pytest

from looprl.ingest import collector as collector_mod
from looprl.ingest import consumer as consumer_mod
from looprl.ingest import transport
from looprl.ingest.consumer import IngestConsumer
from looprl.ingest.transport import make_consumer, make_producer, security_options, wait_for_broker
from looprl.ops.cli import main
from looprl.ops.core.config import ConfigError, KafkaSecurity, load_config
from looprl.serving import server as server_mod

PASSWORDS = {"sasl_password": "ingest-pw-123", "responses_password": "serving-pw-456",
             "feedback_password": "feedback-pw-789"}


def kafka_cfg(tmp_path: Path | None = None, **kafka):
    """A config on a (non-existent) real Kafka with ``kafka`` settings."""
    extra = {"workspace": tmp_path / "ws"} if tmp_path is not None else {}
    return load_config(environ={}, kafka={"bootstrap_servers": "kafka.internal:9093", **kafka}, **extra)


SASL = {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512", "sasl_username": "looprl-ingest",
        "sasl_password": PASSWORDS["sasl_password"]}
ROLES = {"responses_username": "looprl-serving", "responses_password": PASSWORDS["responses_password"],
         "feedback_username": "looprl-feedback", "feedback_password": PASSWORDS["feedback_password"]}


@pytest.fixture
def cafile(tmp_path) -> Path:
    p = tmp_path / "ca.pem"
    p.write_text("-----BEGIN CERTIFICATE-----\n(a CA bundle)\n-----END CERTIFICATE-----\n")
    return p


# --------------------------------------------------------------------------- the mapping
def test_plaintext_is_the_default_on_both_clients():
    assert load_config(environ={}).kafka.security() == KafkaSecurity()
    for sec in (None, KafkaSecurity(), kafka_cfg().kafka.security()):
        assert security_options(sec, "kafka-python") == {"security_protocol": "PLAINTEXT"}
        assert security_options(sec, "confluent") == {"security.protocol": "PLAINTEXT"}


def test_ssl_mapping(cafile):
    sec = kafka_cfg(security_protocol="SSL", ssl_cafile=str(cafile)).kafka.security()
    assert security_options(sec, "kafka-python") == {"security_protocol": "SSL", "ssl_cafile": str(cafile)}
    assert security_options(sec, "confluent") == {"security.protocol": "SSL", "ssl.ca.location": str(cafile)}
    # without a CA file the client trusts the system's CAs
    sec = kafka_cfg(security_protocol="SSL").kafka.security()
    assert security_options(sec, "kafka-python") == {"security_protocol": "SSL"}
    assert security_options(sec, "confluent") == {"security.protocol": "SSL"}


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_sasl_plaintext_mapping(mechanism):
    sec = kafka_cfg(security_protocol="SASL_PLAINTEXT", sasl_mechanism=mechanism, sasl_username="looprl-ingest",
                    sasl_password="pw").kafka.security()
    assert security_options(sec, "kafka-python") == {
        "security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": mechanism,
        "sasl_plain_username": "looprl-ingest", "sasl_plain_password": "pw"}
    assert security_options(sec, "confluent") == {
        "security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": mechanism,
        "sasl.username": "looprl-ingest", "sasl.password": "pw"}


def test_sasl_ssl_mapping(cafile):
    sec = kafka_cfg(**SASL, ssl_cafile=str(cafile)).kafka.security()
    assert security_options(sec, "kafka-python") == {
        "security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": "looprl-ingest",
        "sasl_plain_password": PASSWORDS["sasl_password"], "ssl_cafile": str(cafile)}
    assert security_options(sec, "confluent") == {
        "security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": "looprl-ingest",
        "sasl.password": PASSWORDS["sasl_password"], "ssl.ca.location": str(cafile)}


def test_unknown_client_is_refused():
    with pytest.raises(ValueError, match="kafka.client"):
        security_options(None, "java")


def test_one_mapping_serves_every_client(kafka_bootstrap, monkeypatch):
    """Each library's option names appear once in transport (the mapping), and every client it
    builds (both producers, both consumers, the admin client) takes its options from it."""
    src = inspect.getsource(transport)
    for name in ("sasl_plain_username", "sasl_plain_password", "ssl_cafile", "sasl.username", "sasl.password",
                 "ssl.ca.location", "sasl.mechanism", "security.protocol"):
        assert src.count(f'"{name}"') == 1, name
    calls = []
    real = transport.security_options

    def spy(security, client):
        calls.append(client)
        return real(security, client)

    monkeypatch.setattr(transport, "security_options", spy)
    sec = KafkaSecurity()  # what the embedded broker speaks: the options must work against it
    wait_for_broker(kafka_bootstrap, timeout=10, security=sec)
    assert calls == ["kafka-python"]  # the admin client
    for client in ("confluent", "kafka-python"):
        calls.clear()
        p = make_producer(kafka_bootstrap, client, security=sec, delivery_timeout_ms=5000)
        if client == "kafka-python":
            p._producer()  # built on first use
        c = make_consumer(kafka_bootstrap, client, security=sec, group_id="test-security-spy")
        p.close(timeout=1)
        c.close()
        assert calls == [client, client]


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize("kafka, key", [
    ({**SASL, "sasl_mechanism": None}, "kafka.sasl_mechanism"),
    ({**SASL, "sasl_username": None}, "kafka.sasl_username"),
    ({**SASL, "sasl_password": None}, "kafka.sasl_password"),
    ({**SASL, "security_protocol": "SASL_PLAINTEXT", "sasl_username": "  "}, "kafka.sasl_username"),
    ({**SASL, "sasl_password": ""}, "kafka.sasl_password"),
    ({**SASL, "sasl_mechanism": "GSSAPI"}, "kafka.sasl_mechanism"),
    ({"security_protocol": "TLS"}, "kafka.security_protocol"),
    # credentials a protocol would ignore
    ({"sasl_username": "u", "sasl_password": "p"}, "kafka.sasl_username"),
    ({"sasl_mechanism": "PLAIN"}, "kafka.sasl_mechanism"),
    ({"security_protocol": "SSL", "sasl_password": "p"}, "kafka.sasl_password"),
    ({"responses_username": "s", "responses_password": "p"}, "kafka.responses_password"),
    ({"feedback_username": "f", "feedback_password": "p"}, "kafka.feedback_password"),
    # a role's principal comes whole
    ({**SASL, "responses_username": "s"}, "kafka.responses_password"),
    ({**SASL, "feedback_password": "p"}, "kafka.feedback_password"),
    # the CA file
    ({"security_protocol": "SSL", "ssl_cafile": "/nonexistent/ca.pem"}, "kafka.ssl_cafile"),
    ({**SASL, "ssl_cafile": "/nonexistent/ca.pem"}, "kafka.ssl_cafile"),
])
def test_bad_security_settings_name_the_key(kafka, key):
    # as the environment gives them (None: the key is left unset)
    env = {"LOOPRL_KAFKA__BOOTSTRAP_SERVERS": "kafka.internal:9093",
           **{f"LOOPRL_KAFKA__{k.upper()}": v for k, v in kafka.items() if v is not None}}
    with pytest.raises(ConfigError) as e:
        load_config(environ=env)
    assert f"'{key}'" in str(e.value), str(e.value)
    for pw in PASSWORDS.values():
        assert pw not in str(e.value)


def test_cafile_with_a_protocol_without_tls_is_an_error(cafile):
    for protocol in ("PLAINTEXT", "SASL_PLAINTEXT"):
        kafka = {**SASL, "security_protocol": protocol} if protocol.startswith("SASL") else {}
        with pytest.raises(ConfigError, match=r"'kafka.ssl_cafile'.*uses no TLS"):
            kafka_cfg(**kafka, ssl_cafile=str(cafile))


def test_security_needs_a_real_kafka(cafile):
    """The embedded broker stays PLAINTEXT on loopback: security settings without
    kafka.bootstrap_servers would be used against it."""
    with pytest.raises(ConfigError, match=r"'kafka.security_protocol'.*kafka.bootstrap_servers"):
        load_config(environ={}, kafka={**SASL})
    with pytest.raises(ConfigError, match=r"'kafka.security_protocol'"):
        load_config(environ={}, kafka={"security_protocol": "SSL", "embedded": True})


def test_valid_settings_from_file_and_environment(tmp_path, cafile):
    f = tmp_path / "looprl.toml"
    f.write_text(f'[kafka]\nbootstrap_servers = "b-1.kafka:9096"\nsecurity_protocol = "SASL_SSL"\n'
                 f'sasl_mechanism = "SCRAM-SHA-512"\nsasl_username = "looprl-ingest"\nssl_cafile = "{cafile}"\n')
    cfg = load_config(f, environ={"LOOPRL_KAFKA__SASL_PASSWORD": "from-env"})
    sec = cfg.kafka.security()
    assert (sec.protocol, sec.mechanism, sec.username, sec.cafile) == ("SASL_SSL", "SCRAM-SHA-512", "looprl-ingest",
                                                                       cafile)
    assert sec.password.get_secret_value() == "from-env"


# --------------------------------------------------------------------------- secrets stay masked
def test_looprl_config_masks_kafka_passwords(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LOOPRL_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LOOPRL_KAFKA__BOOTSTRAP_SERVERS", "kafka.internal:9093")
    for k, v in {**SASL, **ROLES}.items():
        monkeypatch.setenv(f"LOOPRL_KAFKA__{k.upper()}", v)
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    kafka_out = json.loads(out)["kafka"]
    for pw in PASSWORDS.values():
        assert pw not in out
    for key in PASSWORDS:
        assert kafka_out[key] == "**********", key
    assert kafka_out["sasl_username"] == "looprl-ingest" and kafka_out["responses_username"] == "looprl-serving"
    assert kafka_out["security_protocol"] == "SASL_SSL" and kafka_out["sasl_mechanism"] == "SCRAM-SHA-512"


def test_security_objects_never_show_the_password():
    cfg = kafka_cfg(**SASL, **ROLES)
    for role in ("ingest", "responses", "feedback"):
        sec = cfg.kafka.security(role)
        assert PASSWORDS["sasl_password"] not in repr(sec) and PASSWORDS["responses_password"] not in repr(sec)
    # a product backend may pass a plain string: it is wrapped all the same
    sec = KafkaSecurity("SASL_SSL", "PLAIN", "backend", "plain-string-pw")
    assert "plain-string-pw" not in repr(sec)
    assert security_options(sec, "confluent")["sasl.password"] == "plain-string-pw"


# --------------------------------------------------------------------------- principals per role
def test_role_principals():
    k = kafka_cfg(**SASL, **ROLES).kafka
    assert {r: k.security(r).username for r in ("ingest", "responses", "feedback")} == {
        "ingest": "looprl-ingest", "responses": "looprl-serving", "feedback": "looprl-feedback"}
    assert k.security("responses").password.get_secret_value() == PASSWORDS["responses_password"]
    # without an override a role uses the process's principal
    k = kafka_cfg(**SASL).kafka
    assert {k.security(r).username for r in ("ingest", "responses", "feedback")} == {"looprl-ingest"}
    with pytest.raises(ValueError, match="role"):
        k.security("admin")


class Recorder:
    """Stands in for a Kafka client; records what it was built with."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def subscribe(self, *a, **kw):
        pass

    def send(self, *a, **kw):
        pass

    def flush(self, timeout=None):
        return 0

    def close(self, *a, **kw):
        pass


def test_response_logger_alone_uses_the_responses_principal(tmp_path, monkeypatch):
    cfg = kafka_cfg(tmp_path, **SASL, **ROLES)
    built: dict[str, list] = {"logger": [], "consumer": [], "producer": [], "admin": []}

    def record(kind, result=None):
        def f(*args, **kwargs):
            built[kind].append(kwargs["security"])
            return Recorder(*args, **kwargs) if result is None else result
        return f

    # serving: the response logger
    monkeypatch.setattr(server_mod, "ResponseLogger", record("logger"))
    assert server_mod.make_response_logger(cfg) is not None
    # ingest: consumer, DLQ producer, topic admin
    monkeypatch.setattr(consumer_mod, "make_consumer", record("consumer"))
    monkeypatch.setattr(consumer_mod, "make_producer", record("producer"))
    monkeypatch.setattr(consumer_mod, "wait_for_broker", record("admin", []))
    monkeypatch.setattr(consumer_mod, "ensure_topics", record("admin", []))
    IngestConsumer(cfg, cfg.kafka.bootstrap_servers).start().close()
    # the collector: its producer and topic admin
    monkeypatch.setattr(collector_mod, "make_producer", record("producer"))
    monkeypatch.setattr(collector_mod, "wait_for_broker", record("admin", []))
    monkeypatch.setattr(collector_mod, "ensure_topics", record("admin", []))
    monkeypatch.setattr(collector_mod, "run_http", lambda *a, **kw: 0)
    collector_mod.run_collector(cfg, cfg.kafka.bootstrap_servers, port=0)

    users = {kind: [s.username for s in secs] for kind, secs in built.items()}
    assert users == {"logger": ["looprl-serving"], "consumer": ["looprl-ingest"],
                     "producer": ["looprl-ingest", "looprl-feedback"],
                     "admin": ["looprl-ingest", "looprl-ingest", "looprl-feedback", "looprl-feedback"]}
    assert all(s.protocol == "SASL_SSL" and s.mechanism == "SCRAM-SHA-512" for secs in built.values() for s in secs)


def test_simulator_sdk_uses_the_feedback_principal(monkeypatch):
    from looprl.ops.sim import simulator

    monkeypatch.setattr(simulator, "FeedbackClient", Recorder)
    channels = simulator.FeedbackChannels(kafka_cfg(**SASL, **ROLES), "kafka.internal:9093", None)
    try:
        assert channels.sdk.kwargs["security"].username == "looprl-feedback"
    finally:
        channels.http.close()


# --------------------------------------------------------------------------- real client objects
SASL_PLAINTEXT = KafkaSecurity("SASL_PLAINTEXT", "SCRAM-SHA-512", "looprl-ingest", "pw-on-the-wire")
UNREACHABLE = "127.0.0.1:1"  # nothing listens: no client below ever connects


@pytest.fixture
def confluent_configs(monkeypatch) -> list[dict]:
    """Every librdkafka client built in the test, as the real class (librdkafka validates the
    configuration when the client is made), with the configuration it was given."""
    seen: list[dict] = []

    def recording(base):
        class Recording(base):
            def __init__(self, conf):
                seen.append(dict(conf))
                super().__init__(conf)
        return Recording

    monkeypatch.setattr(confluent_kafka, "Producer", recording(confluent_kafka.Producer))
    monkeypatch.setattr(confluent_kafka, "Consumer", recording(confluent_kafka.Consumer))
    return seen


def test_confluent_clients_carry_sasl_settings(confluent_configs):
    p = make_producer(UNREACHABLE, "confluent", security=SASL_PLAINTEXT, delivery_timeout_ms=1000)
    c = make_consumer(UNREACHABLE, "confluent", security=SASL_PLAINTEXT, group_id="test-security")
    try:
        assert isinstance(p._p, confluent_kafka.Producer) and isinstance(c._c, confluent_kafka.Consumer)
        want = {"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "SCRAM-SHA-512",
                "sasl.username": "looprl-ingest", "sasl.password": "pw-on-the-wire"}
        assert len(confluent_configs) == 2
        for conf in confluent_configs:
            assert {k: conf.get(k) for k in want} == want
    finally:
        p.close(timeout=0.5)
        c.close()


def test_librdkafka_refuses_what_it_cannot_use():
    """What the test above relies on: a misnamed property or missing credentials fail at once."""
    with pytest.raises(confluent_kafka.KafkaException, match="sasl.user"):
        confluent_kafka.Producer({"bootstrap.servers": UNREACHABLE, "sasl.user": "x"})
    with pytest.raises(confluent_kafka.KafkaException, match="sasl.username"):
        confluent_kafka.Producer({"bootstrap.servers": UNREACHABLE, "security.protocol": "SASL_PLAINTEXT",
                                  "sasl.mechanism": "SCRAM-SHA-512"})


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make a CA certificate")
def test_confluent_client_loads_the_ca_file(tmp_path, confluent_configs):
    ca = tmp_path / "ca.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(tmp_path / "ca.key"),
                    "-out", str(ca), "-days", "1", "-subj", "/CN=looprl-test-ca"], check=True, capture_output=True)
    cfg = kafka_cfg(**SASL, ssl_cafile=str(ca))
    p = make_producer(UNREACHABLE, "confluent", security=cfg.kafka.security(), delivery_timeout_ms=1000)
    p.close(timeout=0.5)
    assert confluent_configs[0]["ssl.ca.location"] == str(ca)
    # a file that is no certificate is refused when the client is made
    with pytest.raises(confluent_kafka.KafkaException, match="ssl.ca.location"):
        make_producer(UNREACHABLE, "confluent", security=kafka_cfg(**SASL, ssl_cafile=str(tmp_path / "ca.key"))
                      .kafka.security())


def test_kafka_python_clients_carry_sasl_settings(monkeypatch):
    """kafka-python bootstraps in its constructors unless told the broker version: the test gives
    one (nothing else), so the real clients are built without a broker."""
    def no_bootstrap(base):
        class NoBootstrap(base):
            def __init__(self, **configs):
                super().__init__(api_version=(2, 8), **configs)
        return NoBootstrap

    monkeypatch.setattr(transport, "KafkaProducer", no_bootstrap(kafka.KafkaProducer))
    monkeypatch.setattr(transport, "KafkaConsumer", no_bootstrap(kafka.KafkaConsumer))
    p = make_producer(UNREACHABLE, "kafka-python", security=SASL_PLAINTEXT, delivery_timeout_ms=1000)
    c = make_consumer(UNREACHABLE, "kafka-python", security=SASL_PLAINTEXT, group_id="test-security")
    try:
        want = {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "SCRAM-SHA-512",
                "sasl_plain_username": "looprl-ingest", "sasl_plain_password": "pw-on-the-wire"}
        for client in (p._producer(), c._c):
            assert isinstance(client, (kafka.KafkaProducer, kafka.KafkaConsumer))
            assert {k: client.config[k] for k in want} == want
    finally:
        p.close(timeout=0.5)
        c._c.close(autocommit=False)
