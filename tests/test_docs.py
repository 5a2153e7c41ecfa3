"""The docs pages (docs/*.md) run as written.

A fenced block whose info string is ``python runnable`` or ``bash runnable`` is executed, the
blocks of a page in order (python ones share one namespace, like a notebook), against what the
page talks about, started here: the tiny base and a family checkpoint for "Use your own model",
an embedded server, the session's Kafka broker and a collector for "Integrate your backend".
The addresses and paths a page uses (``http://127.0.0.1:8000``, ``/models/...``) are replaced
by the real ones; each replaced text must be on the page, so a page edited away from them fails
here instead of silently running against nothing. Every ``toml`` block of the docs and the
README is a whole looprl.toml that loads."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from listen_testing import LogTail, listening

from looprl.ops.core.config import load_config

REPO = Path(__file__).resolve().parent.parent
PAGES = sorted((REPO / "docs").glob("*.md"))
FENCE = re.compile(r"^```([\w-]*)([^\n]*)\n(.*?)^```[ \t]*$", re.M | re.S)


def blocks(path: Path) -> list[tuple[str, bool, str, int]]:
    """(language, runnable, code, line) of every fenced block of a markdown file."""
    text = path.read_text()
    return [(m.group(1), "runnable" in m.group(2).split(), m.group(3), text.count("\n", 0, m.start()) + 1)
            for m in FENCE.finditer(text)]


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPRL_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `looprl`, this venv's python3
    return env


def run_page(path: Path, subs: dict[str, str], cwd: Path, namespace: dict | None = None) -> tuple[dict, str]:
    """Run the page's runnable blocks in order with ``subs`` applied; (python namespace, stdout)."""
    text = path.read_text()
    for placeholder in subs:
        assert placeholder in text, f"{path.name} no longer mentions {placeholder!r}: update the test's replacements"
    ns: dict = {"__name__": f"docs.{path.stem}"} if namespace is None else namespace
    out = io.StringIO()
    ran = 0
    for lang, runnable, code, line in blocks(path):
        if not runnable:
            continue
        for old, new in subs.items():
            code = code.replace(old, new)
        where = f"{path.relative_to(REPO)}:{line}"
        if lang == "python":
            with contextlib.redirect_stdout(out):
                exec(compile(code, where, "exec"), ns)  # noqa: S102 - the docs' own snippets
        elif lang == "bash":
            r = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=cwd, env=_clean_env(), capture_output=True,
                               text=True, timeout=300)
            assert r.returncode == 0, f"{where} exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
            out.write(r.stdout)
        else:
            pytest.fail(f"{where}: runnable {lang!r} block: only python and bash run")
        ran += 1
    assert ran, f"{path.name} has no runnable block"
    return ns, out.getvalue()


def test_the_readme_links_every_page_and_every_page_runs_something():
    readme = (REPO / "README.md").read_text()
    assert {"use-your-own-model.md", "integrate-your-backend.md", "production-checklist.md"} <= {p.name for p in PAGES}
    for page in PAGES:
        assert f"(docs/{page.name})" in readme, f"README.md does not link docs/{page.name}"
        assert any(runnable for _, runnable, _, _ in blocks(page)), f"{page.name} has no runnable block"
    assert readme.startswith("# looprl\n\nSet up and run the main job")  # its first lines stay the two commands


def test_ci_runs_the_readmes_test_command():
    """.ci/run is what CI runs on a clean clone; the README's second command is what a newcomer
    runs. Both must run the same pytest phases, with the same options."""
    second = [code for lang, _, code, _ in blocks(REPO / "README.md") if lang == "bash"][1]
    ci = (REPO / ".ci" / "run").read_text().replace("\\\n", " ")

    def phases(cmd: str) -> list[str]:
        return [" ".join(p.split()) for p in re.findall(r"-m pytest([^&\n]*)", cmd)]

    assert phases(second) == phases(ci) and len(phases(ci)) == 2, (phases(second), phases(ci))
    assert "-c requirements.lock" in second and "-c requirements.lock" in ci


@pytest.mark.parametrize("path", [*PAGES, REPO / "README.md"], ids=lambda p: p.name)
def test_every_toml_block_is_a_config_that_loads(path, tmp_path):
    tomls = [(code, line) for lang, _, code, line in blocks(path) if lang == "toml"]
    for code, line in tomls:
        f = tmp_path / f"looprl-{line}.toml"
        f.write_text(code)
        load_config(f, environ={})  # raises ConfigError naming the key


def test_use_your_own_model(family_checkpoint, tmp_path):
    ckpt = family_checkpoint("qwen3_moe")
    ws = tmp_path / "ws"
    _, out = run_page(REPO / "docs" / "use-your-own-model.md",
                      {"/models/Qwen3-30B-A3B": str(ckpt), "/data/looprl": str(ws)}, tmp_path)
    assert re.match(r"qwen3_moe \d+\.\dB parameters, 4 experts, top-2, 2 layers", out), out
    assert (ws / "base").is_symlink() and (ws / "base").resolve() == ckpt.resolve()


COLLECTOR_TOKEN = "my-collector-token"


@pytest.fixture
def collector(tmp_path, kafka_bootstrap):
    env = {**_clean_env(), "LOOPRL_WORKSPACE": str(tmp_path / "collector-ws"),
           "LOOPRL_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap, "LOOPRL_INGEST__COLLECTOR_TOKEN": COLLECTOR_TOKEN,
           "LOOPRL_INGEST__COLLECTOR_PORT": "0", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "looprl.ops.cli", "ingest", "collect"], env=env, cwd=tmp_path,
                            text=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    tail = LogTail(proc)
    try:
        url, _ = listening(tail, "collector")
        yield url.removesuffix("/v1/feedback")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _thumbs_about(bootstrap: str, topic: str, response_id: str, n: int, timeout: float = 30.0) -> list:
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    from looprl.ingest.schema import parse_event
    from looprl.ingest.transport import topic_partitions

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "test-docs-reader", "enable.auto.commit": False})
    try:
        parts = topic_partitions(bootstrap, [topic]).get(topic, 0)
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(parts)])
        found, deadline = [], time.monotonic() + timeout
        while len(found) < n and time.monotonic() < deadline:
            for m in c.consume(100, 0.2):
                if m.error() is None:
                    ev = parse_event(m.value())
                    if getattr(ev, "response_id", None) == response_id:
                        found.append(ev)
        return found
    finally:
        c.close()


def test_integrate_your_backend(serving_server, kafka_bootstrap, collector, tmp_path):
    topic = load_config(environ={}).kafka.topic_feedback
    ns, out = run_page(REPO / "docs" / "integrate-your-backend.md",
                       {"http://127.0.0.1:8000": serving_server.url, "127.0.0.1:9092": kafka_bootstrap,
                        "http://127.0.0.1:8090": collector}, tmp_path)
    answer, version = ns["answer"], ns["version"]
    assert version == answer.model_extra["looprl_adapter_version"]
    assert out.startswith(f"{version} {answer.choices[0].message.content}")
    served = [e for e in serving_server.logger.events if e.response_id == answer.id]
    assert len(served) == 1 and served[0].user_id == "user-42", served
    assert (served[0].adapter_version or "base") == version, served
    thumbs = _thumbs_about(kafka_bootstrap, topic, answer.id, 2)
    assert [(t.kind, t.up, t.user_id) for t in thumbs] == [("thumbs", True, "user-42")] * 2  # SDK, then HTTP


def test_production_checklist(tmp_path, monkeypatch):
    page = REPO / "docs" / "production-checklist.md"
    config = next(code for lang, _, code, _ in blocks(page) if lang == "toml")
    (tmp_path / "looprl.toml").write_text(config)
    monkeypatch.chdir(tmp_path)
    for k in [k for k in os.environ if k.startswith("LOOPRL_")]:
        monkeypatch.delenv(k)
    # the preflight refuses a deployment without its secrets, naming them
    with pytest.raises(AssertionError, match=r"gateway.client_tokens .*ingest.collector_token"):
        run_page(page, {}, tmp_path)
    effective = json.loads((tmp_path / "effective-config.json").read_text())  # the bash block ran first
    assert effective["kafka"]["bootstrap_servers"] == "kafka-1:9092,kafka-2:9092,kafka-3:9092"
    # the tokens the block exported reached the config, masked
    assert effective["gateway"]["client_tokens"] == ["**********"] and effective["ingest"]["collector_token"] == "*" * 10
    monkeypatch.setenv("LOOPRL_GATEWAY__CLIENT_TOKENS", "t" * 48)
    monkeypatch.setenv("LOOPRL_INGEST__COLLECTOR_TOKEN", "c" * 48)
    _, out = run_page(page, {}, tmp_path)
    assert out.startswith("looprl ")  # `looprl --version`
