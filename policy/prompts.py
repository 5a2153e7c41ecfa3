"""Prompts for rollouts and for the gate.

The pool is recent real traffic (the ``responses`` view of the event log: each answer's
conversation, ``messages`` when it was a chat, else ``prompt``) plus a configured prompt file
(``cfg.policy.prompts_file``: one user prompt per line, or JSON lines with ``prompt`` or
``messages``) or the prompt set shipped with the base. Pool entries are ``Chat`` values.
A run snapshots its pool once (saved in the run directory), so resuming never depends on what
arrived in the log meanwhile.

Each prompt is assigned to train or held-out by a hash of its ``Chat.key`` (a single user turn's
text), so the gate's held-out
prompts are never trained on, whichever run or process looks at them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import duckdb
import torch

from looprl.ops.core.chat import Chat, ChatError
from looprl.ops.core.config import LooprlConfig
from looprl.ops.core.log import get_logger
from looprl.policy.model import shipped_prompts
from looprl.storage.events import EventLog

log = get_logger(__name__)

HELDOUT_BUCKETS = 8  # 1 in 8 prompts is held out for the gate


def is_heldout(prompt: Chat | str) -> bool:
    h = int.from_bytes(hashlib.sha256(Chat.parse(prompt).key().encode()).digest()[:4], "big")
    return h % HELDOUT_BUCKETS == 0


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from (seed, step, purpose, ...): deterministic, no wall clock, no global RNG."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "big") >> 1


def generator(*parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


def read_prompt_file(path: Path, field: str = "policy.prompts_file") -> list[Chat]:
    """The prompts of a file (one user prompt per line, or JSONL); errors name ``field`` and the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{field} {path} does not exist")
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{field} {path} cannot be read as text ({e})") from None
    if path.suffix == ".jsonl":
        out = []
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                chat = Chat.parse(str(obj["prompt"]) if obj.get("prompt") is not None else None, obj.get("messages"))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"{field} {path}:{i}: expected a JSON object with a 'prompt' "
                                 f"or 'messages' field ({e})") from None
            if chat.key().strip():
                out.append(chat)
    else:
        out = [Chat.user(line.strip()) for line in lines if line.strip()]
    if not out:
        raise ValueError(f"{field} {path} has no prompts")
    return out


@contextlib.contextmanager
def event_log(cfg: LooprlConfig, needed: bool = True) -> Iterator[duckdb.DuckDBPyConnection | None]:
    """One connection to the event log for a run's start, which reads it twice (the prompt pool,
    the served answers): opening one lists and reads the footers of every part file. None when not
    ``needed``, or when the log does not exist or cannot be opened (logged): each reader then falls
    back to its own."""
    con = None
    if needed and cfg.events_dir.exists():
        try:
            con = EventLog(cfg.events_dir).connect()
        except Exception as e:  # an unreadable log must not stop training
            log.warning("could not open the event log", error=str(e))
    try:
        yield con
    finally:
        if con is not None:
            con.close()


def traffic_prompts(cfg: LooprlConfig, limit: int,
                    con: duckdb.DuckDBPyConnection | None = None) -> tuple[list[Chat], dict]:
    """Distinct prompts of the most recently ingested responses, newest first, and the watermark
    they reach. Recency is ``ingested_at`` (set by ingest, increasing), never the producer's ``ts``:
    a far-future ``ts`` would pin its prompt first forever, and one past year 9999 overflows.
    ``con``: an `EventLog` connection to read through (default: a new one)."""
    if limit <= 0 or not cfg.events_dir.exists():
        return [], {}
    sql = ("SELECT prompt, messages, max(ingested_at) AS last_ingested_at FROM responses "
           "WHERE (prompt IS NOT NULL AND length(prompt) > 0) OR messages IS NOT NULL "
           f"GROUP BY prompt, messages ORDER BY last_ingested_at DESC, prompt LIMIT {int(limit)}")
    try:
        table = EventLog(cfg.events_dir).query(sql) if con is None else con.sql(sql).to_arrow_table()
    except Exception as e:  # an empty or still-initialising log must not stop training
        log.warning("could not read recent prompts from the event log", error=str(e))
        return [], {}
    prompts = []
    for p, msgs in zip(table.column("prompt").to_pylist(), table.column("messages").to_pylist()):
        try:
            prompts.append(Chat.parse(p, msgs))
        except ChatError as e:  # one unreadable row must not stop training
            log.warning("skipping a logged prompt that is not a conversation", error=str(e)[:200])
    last = table.column("last_ingested_at").to_pylist()
    watermark = {"responses_max_ingested_at": str(max(last))} if last else {}
    return prompts, watermark


def configured_prompts(cfg: LooprlConfig) -> list[Chat]:
    if cfg.policy.prompts_file is not None:
        return read_prompt_file(cfg.policy.prompts_file)
    return [Chat.user(p) for p in shipped_prompts()]


def build_pool(cfg: LooprlConfig, traffic_limit: int | None = None,
               con: duckdb.DuckDBPyConnection | None = None) -> tuple[list[Chat], dict]:
    """Deduplicated prompt pool (traffic first) and the event-log watermark it was read at.
    ``con``: as in `traffic_prompts`."""
    limit = cfg.policy.recent_prompts if traffic_limit is None else traffic_limit
    traffic, watermark = traffic_prompts(cfg, limit, con)
    seen, pool = set(), []
    for p in traffic + configured_prompts(cfg):
        if p not in seen:
            seen.add(p)
            pool.append(p)
    log.info("prompt pool", traffic=len(traffic), total=len(pool))
    return pool, watermark


class PromptSampler:
    """Draws each step's batch from the training part of a pool, as a function of (seed, step) only."""

    def __init__(self, pool: list[Chat | str], seed: int):
        self.train = [Chat.parse(p) for p in pool if not is_heldout(p)]
        if not self.train:
            raise ValueError("prompt pool has no training prompts (all are held out or the pool is empty)")
        self.seed = seed

    def batch(self, step: int, size: int) -> list[Chat]:
        g = generator(self.seed, step, "prompts")
        idx = torch.randint(len(self.train), (size,), generator=g).tolist()
        return [self.train[i] for i in idx]


def heldout_prompts(pool: list[Chat | str], n: int) -> list[Chat]:
    held = [Chat.parse(p) for p in pool if is_heldout(p)]
    return held[:n]
