"""The bounded fault-injection run (benchmarks/ingest_faults.py), shorter: the consumer SIGKILLed
twice, Kafka stopped and started again, 3 MiB and far-future records mixed in, a burst of forged
records. Every record Kafka acknowledged is stored or dead-lettered, none twice."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "ingest_faults.py"


def test_faults_lose_and_duplicate_nothing(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "--seconds", "24", "--kills", "2", "--outage-s", "5",
                        "--rate", "80", "--oversized", "3", "--far-future", "8", "--forged", "60",
                        "--keep", str(tmp_path)], capture_output=True, text=True, timeout=420)
    logs = "\n".join(p.read_text()[-3000:] for p in sorted((tmp_path / "logs").glob("*.log")))
    assert r.stdout.strip(), f"{r.stderr[-3000:]}\n{logs}"
    f = json.loads(r.stdout.strip().splitlines()[-1])
    assert r.returncode == 0 and f["ok"], f"{json.dumps(f, indent=1)}\n{r.stderr[-2000:]}\n{logs}"
    assert f["lost"] == 0 and f["duplicates"] == 0 and f["stored"] + f["dead_lettered"] == f["sent"]
    assert f["faults"]["consumer_kills"] == 2 and f["sent"] > 1000
    cats = f["by_category"]
    assert cats["oversized"] == {"sent": 3, "dead_lettered": 3}
    assert cats["ts_out_of_range"] == {"sent": 8, "dead_lettered": 8}
    assert cats["ts_out_of_range_by_http"].get("refused_by_collector", 0) > 0
    assert cats["forged_vote"]["sent"] + cats["forged_response_on_feedback_topic"]["sent"] == 60
