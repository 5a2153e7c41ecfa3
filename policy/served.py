"""Labelled served answers as off-policy PPO samples.

Every answer the serving tier gave that a user labelled and that was logged with its token ids and
their sampling log-probs (``responses.completion_token_ids`` /
``completion_logprobs``) is a sample of the policy version that served it, with a reward attached.
A PPO run reads the newest of them once, when it starts (``load_pool``), keeps them in its run
directory (``served.json``: a resumed run trains on the same samples), and adds
``policy.offpolicy_samples`` of them to each step's batch (``ServedPool.batch``). The learner
corrects for the policy that sampled them with truncated importance weights (``looprl.policy.ppo``).

Kept are answers whose log-probs describe the distribution their tokens were drawn from: vLLM's
and the embedded server's log-probs are the model's raw ones at temperature 1, so the request's
sampling must be plain (temperature 1 or the server's default, no top_p < 1, no top_k, no
penalties; None counts as the server's default, which must then be plain sampling), and the run
itself samples at ``policy.temperature`` 1. Dropped, each counted by reason and logged:

- ``eval_user``: feedback on or by the demo's evaluation users (``demo.eval_user_prefix``): they
  measure the loop and are never trained on;
- ``no_logprobs`` / ``bad_logprobs``: no token ids or log-probs, or lists that do not match;
- ``sampling``: sampled with temperature, top_p, top_k or penalties the log-probs do not describe;
- ``bad_prompt`` / ``heldout_prompt``: a prompt that is no conversation, or one the gate holds out;
- ``unknown_version`` / ``stale``: served by an adapter whose version is unreadable, or more than
  ``policy.offpolicy_max_staleness`` versions behind the version the run starts from: generations
  back along the start's line (its parent is 1 behind, whatever was published in between), else
  by version number (no adapter, the base, is version 0);
- ``bad_tokens``: a token id outside the base's vocabulary (another model's answer);
- ``too_long`` / ``prompt_too_long``: more completion tokens than ``policy.max_new_tokens``, or a
  rendered prompt over ``policy.max_prompt_tokens`` (rollouts would cut it: other log-probs);
- ``over_pool``: older than the ``policy.offpolicy_pool`` newest usable ones (not looked at).

Labels, per kind (``policy.offpolicy_kinds`` names the kinds a run reads):

- ``thumbs``: up 1, down 0; ``rating``: r stars -> (r - 1) / 4, as the reward data reads them;
- ``preference``: a comparison of two served answers (by response ids) labels both: the chosen one
  1, the rejected one 0. Both were sampled for the same prompt by the serving version, so in one
  batch the pair pushes the policy towards the chosen tokens and away from the rejected ones, the
  same contrast a DPO pair makes, corrected for the sampling policy like any served answer;
- ``correction``: the user rewrote the answer, so the served answer gets 0. The rewritten text is
  not a sample of any policy (no behaviour log-probs), so it is the reward model's to learn from.

A response labelled several times (a thumbs and a rating, a comparison, several voters) counts
once, with the mean of its labels.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import duckdb
import torch

from looprl.ops.core.chat import Chat, ChatError
from looprl.ops.core.config import LooprlConfig
from looprl.ops.core.log import get_logger
from looprl.ops.core.version import Version
from looprl.policy.model import ensure_chat_template, ensure_pad_token, render_prompt_ids
from looprl.policy.prompts import generator, is_heldout
from looprl.policy.rollout import Rollout
from looprl.storage.events import EventLog
from looprl.storage.registry import atomic_write_text

log = get_logger(__name__)

SERVED_FILE = "served.json"

# One row per labelled response, newest served first. feedback_votes and preference_votes hold one
# vote per voter; a comparison names both its answers, so it is read once for each.
_SERVED_SQL = """
WITH votes AS (
    SELECT response_id, kind, user_id, voter,
           CASE WHEN kind = 'thumbs' THEN (CASE WHEN up THEN 1.0 ELSE 0.0 END)
                WHEN kind = 'rating' THEN (CAST(rating AS DOUBLE) - 1.0) / 4.0
                ELSE 0.0 END AS label
    FROM feedback_votes
    WHERE response_id IS NOT NULL
      AND ((kind = 'thumbs' AND up IS NOT NULL) OR (kind = 'rating' AND rating BETWEEN 1 AND 5)
           OR (kind = 'correction' AND corrected IS NOT NULL))
    UNION ALL
    SELECT chosen_response_id, 'preference', user_id, voter, 1.0 FROM preference_votes
    WHERE chosen_response_id IS NOT NULL AND rejected_response_id IS NOT NULL
    UNION ALL
    SELECT rejected_response_id, 'preference', user_id, voter, 0.0 FROM preference_votes
    WHERE chosen_response_id IS NOT NULL AND rejected_response_id IS NOT NULL
), labels AS (
    SELECT response_id, avg(label) AS label,
           bool_or(CASE WHEN $prefix = '' THEN false
                        ELSE coalesce(starts_with(user_id, $prefix), false)
                             OR coalesce(starts_with(voter, $prefix), false) END) AS eval_user
    FROM votes
    WHERE list_contains($kinds, kind)
    GROUP BY response_id
)
SELECT l.response_id, l.label, l.eval_user, r.prompt, r.messages, r.completion, r.adapter_version,
       r.sampling, r.completion_token_ids, r.completion_logprobs
FROM labels l JOIN responses_by_id r ON r.response_id = l.response_id
ORDER BY r.ingested_at DESC, l.response_id
"""


@dataclass(frozen=True)
class ServedSample:
    """One labelled served answer, ready to train on."""

    response_id: str
    prompt: Chat
    completion: str
    prompt_ids: list[int]  # the rendered prompt, as served (render_prompt_ids)
    token_ids: list[int]  # the served completion's tokens
    logprobs: list[float]  # their log-probs under the serving policy, at temperature 1
    label: float  # in [0, 1]
    version: int  # the version that served it (0: the base)

    def to_json(self) -> dict:
        d = asdict(self)
        d["prompt"] = self.prompt.to_json()
        return d

    @classmethod
    def from_json(cls, d: dict) -> "ServedSample":
        return cls(**{**d, "prompt": Chat.parse(d["prompt"])})


def plain_sampling(sampling: str | dict | None) -> bool:
    """Whether a logged ``Sampling`` (its JSON) draws from the distribution the raw log-probs
    describe: temperature 1 (or unset), no nucleus, no top-k, no penalties. max_tokens, stop and
    seed cut or fix a draw but do not change it."""
    if sampling is None:
        return True
    s = json.loads(sampling) if isinstance(sampling, str) else dict(sampling)
    return (s.get("temperature") in (None, 1, 1.0)
            and s.get("top_p") in (None, 1, 1.0)
            and (s.get("top_k") is None or s["top_k"] <= 0)  # vLLM: -1 (and 0) mean no top-k
            and not s.get("presence_penalty") and not s.get("frequency_penalty"))


def served_version(text: str | None) -> int | None:
    """The version number of a response's ``adapter_version`` (None or "base": 0; "v3" or a
    served adapter name "policy-v3": 3); None when unreadable."""
    if text is None:
        return 0
    v = Version.parse_or_none(text) or Version.from_lora_name(text)
    return v.number if v is not None else None


def offpolicy_disabled(cfg: LooprlConfig) -> str | None:
    """Why this run adds no served answers, or None when it does."""
    p = cfg.policy
    if not p.offpolicy:
        return "policy.offpolicy is false"
    if p.offpolicy_samples == 0 or p.offpolicy_pool == 0:
        return "policy.offpolicy_samples or policy.offpolicy_pool is 0"
    if not p.offpolicy_kinds:
        return "policy.offpolicy_kinds is empty"
    if p.temperature != 1.0:
        return (f"policy.temperature is {p.temperature}: served log-probs are at temperature 1, so the "
                "importance weights would compare different distributions")
    return None


def load_tokenizer(base_path: Path):
    """The base's tokenizer, set up as ``load_base`` sets it up (pad token, chat template)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_path, local_files_only=True)
    ensure_pad_token(tok, base_path)
    ensure_chat_template(tok, base_path)
    return tok


def read_served(cfg: LooprlConfig, start_version: int, tok=None, generations: dict[int, int] | None = None,
                con: duckdb.DuckDBPyConnection | None = None) -> tuple[list[ServedSample], Counter]:
    """The newest ``policy.offpolicy_pool`` usable served answers (see the module docstring) and the
    drops by reason; ``start_version``: the version the run starts from (0: the base).

    An answer is stale when its version lies more than ``policy.offpolicy_max_staleness`` versions
    behind the start: counted in ``generations`` (version number -> generations back on the start's
    line: the start 0, its parent 1, ...) when it holds the version, else by version number.

    ``con``: an `EventLog` connection to read through (default: a new one, closed at the end). Its
    ``responses_by_id`` is left pinned to the labelled answers (`EventLog.pin_labelled_responses`)."""
    p = cfg.policy
    drops: Counter = Counter()
    if not cfg.events_dir.exists():
        return [], drops
    own = con is None
    if own:
        con = EventLog(cfg.events_dir).connect()
    try:
        EventLog.pin_labelled_responses(con)  # the query joins them four times
        reader = con.sql(_SERVED_SQL, params={"prefix": cfg.demo.eval_user_prefix or "",
                                              "kinds": list(p.offpolicy_kinds)}).to_arrow_reader(256)
        out: list[ServedSample] = []
        for batch in reader:
            for row in batch.to_pylist():
                if len(out) >= p.offpolicy_pool:
                    drops["over_pool"] += 1
                    continue
                if tok is None:
                    tok = load_tokenizer(cfg.base_path)
                sample, reason = _check(row, cfg, start_version, tok, generations or {})
                if sample is None:
                    drops[reason] += 1
                else:
                    out.append(sample)
    finally:
        if own:
            con.close()
    return out, drops


def _check(row: dict, cfg: LooprlConfig, start_version: int, tok,
           generations: dict[int, int]) -> tuple[ServedSample | None, str]:
    p = cfg.policy
    if row["eval_user"]:
        return None, "eval_user"
    ids, lps = row["completion_token_ids"], row["completion_logprobs"]
    if not ids or lps is None:
        return None, "no_logprobs"
    if len(ids) != len(lps) or any(x is None or not x <= 0.0 for x in lps):
        return None, "bad_logprobs"
    try:
        if not plain_sampling(row["sampling"]):
            return None, "sampling"
    except (ValueError, TypeError, AttributeError):
        return None, "sampling"
    try:
        chat = Chat.parse(row["prompt"], row["messages"])
    except ChatError:
        return None, "bad_prompt"
    if is_heldout(chat):
        return None, "heldout_prompt"
    version = served_version(row["adapter_version"])
    if version is None:
        return None, "unknown_version"
    if generations.get(version, start_version - version) > p.offpolicy_max_staleness:
        return None, "stale"
    if any(i is None or i >= len(tok) for i in ids):
        return None, "bad_tokens"
    if len(ids) > p.max_new_tokens:
        return None, "too_long"
    prompt_ids = render_prompt_ids(tok, chat)
    if not prompt_ids or len(prompt_ids) > p.max_prompt_tokens:
        return None, "prompt_too_long"
    label = min(1.0, max(0.0, float(row["label"])))
    return ServedSample(str(row["response_id"]), chat, row["completion"] or "", prompt_ids, [int(i) for i in ids],
                        [float(x) for x in lps], label, version), ""


def load_pool(cfg: LooprlConfig, start_version: int, generations: dict[int, int] | None = None,
              con: duckdb.DuckDBPyConnection | None = None) -> list[ServedSample]:
    """The served answers a new run trains on (empty when off-policy learning is off, with the
    reason logged); drops per reason are logged. ``generations``, ``con``: as in ``read_served``."""
    why = offpolicy_disabled(cfg)
    if why is not None:
        if cfg.policy.offpolicy:  # switched on but unusable: say so; off by choice: nothing to say
            log.warning("off-policy learning is off for this run", reason=why)
        return []
    try:
        samples, drops = read_served(cfg, start_version, generations=generations, con=con)
    except Exception as e:  # an unreadable log must not stop on-policy training
        log.warning("could not read served answers from the event log; training on-policy only", error=str(e))
        return []
    log.info("served answers for off-policy learning", kept=len(samples), start_version=start_version,
             max_staleness=cfg.policy.offpolicy_max_staleness, dropped=dict(sorted(drops.items())))
    return samples


def save_pool(run_dir: Path, samples: list[ServedSample]) -> None:
    atomic_write_text(Path(run_dir) / SERVED_FILE, json.dumps([s.to_json() for s in samples]))


def read_pool(run_dir: Path) -> list[ServedSample]:
    """A run's served answers (none for a run started without them)."""
    path = Path(run_dir) / SERVED_FILE
    if not path.is_file():
        return []
    try:
        return [ServedSample.from_json(d) for d in json.loads(path.read_text())]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"run {run_dir}: unreadable {SERVED_FILE} ({e})") from None


def to_rollout(samples: list[ServedSample]) -> Rollout:
    """The samples as one rollout batch in ``sample``'s layout (prompts left-padded, completions
    right-padded), with their labels and behaviour log-probs; scores are NaN (labels replace them)."""
    plen = max(len(s.prompt_ids) for s in samples)
    n = max(len(s.token_ids) for s in samples)
    b = len(samples)
    input_ids = torch.zeros((b, plen + n), dtype=torch.long)  # padding is masked: any id will do
    attention_mask = torch.zeros((b, plen + n), dtype=torch.long)
    response_mask = torch.zeros((b, n), dtype=torch.float32)
    behaviour = torch.zeros((b, n), dtype=torch.float32)
    for i, s in enumerate(samples):
        k, m = len(s.prompt_ids), len(s.token_ids)
        input_ids[i, plen - k:plen] = torch.tensor(s.prompt_ids, dtype=torch.long)
        input_ids[i, plen:plen + m] = torch.tensor(s.token_ids, dtype=torch.long)
        attention_mask[i, plen - k:plen + m] = 1
        response_mask[i, :m] = 1.0
        behaviour[i, :m] = torch.tensor(s.logprobs, dtype=torch.float32)
    return Rollout(
        prompts=[s.prompt for s in samples], completions=[s.completion for s in samples],
        input_ids=input_ids, attention_mask=attention_mask, response_mask=response_mask, prompt_len=plen,
        scores=torch.full((b,), float("nan")), labels=torch.tensor([s.label for s in samples], dtype=torch.float32),
        behaviour_logprobs=behaviour,
    )


class ServedPool:
    """Draws each step's served answers from a run's pool, as a function of (seed, step) only."""

    def __init__(self, samples: list[ServedSample], seed: int):
        self.samples, self.seed = list(samples), seed

    def __len__(self) -> int:
        return len(self.samples)

    def batch(self, step: int, size: int) -> Rollout | None:
        if not self.samples or size <= 0:
            return None
        idx = torch.randperm(len(self.samples), generator=generator(self.seed, step, "served"))[:size].tolist()
        return to_rollout([self.samples[i] for i in idx])
