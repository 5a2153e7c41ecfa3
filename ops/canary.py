"""Online canary: a gated policy adapter serves a share of traffic until a sequential test on
thumbs-up feedback promotes it to all traffic or rolls it back.

The test is Bayesian: each arm's thumbs-up rate has a Beta(1 + ups, 1 + downs) posterior, and
after every poll we compute P(candidate rate > control rate) exactly (no sampling). With at least
``canary.min_samples`` votes on each arm,

    P(better) >= canary.promote_probability   -> promote (pointer ``promoted``, all traffic)
    P(worse)  >= canary.rollback_probability  -> roll back (pointer ``canary`` cleared)
    both arms reach canary.max_samples        -> promote: no significant regression in that many votes
                                                 (canary.promote_on_no_regression; else P(better) >=
                                                 canary.max_samples_promote_probability), or roll back

Paired votes (``canary.count_pairs``): while a canary runs, a comparison's two answers come from
the two arms (``serving.compare_across_canary``), and the user's choice between them judges both
versions on the same question: no question or user mix between the arms to average out, so each
such vote tells more than a thumb. The candidate's share of these choices has a Beta(1 + wins,
1 + losses) posterior, and P(share > 1/2) is exact too. The two posteriors are combined as
independent evidence on one question, "do users like the candidate more?", each from an even
prior: their odds multiply. The sample bounds stay on thumbs per arm, so pairs make each look
sharper, not the test shorter (a look still comes every ``LOOK_EVERY_VOTES`` new votes, pairs
included); the promote and rollback thresholds apply to the combined probability.

``max_samples`` counts on the smaller arm, the candidate's at a traffic share under one half: counted
on the larger one, a 10 % canary would stop at about a ninth of the votes it was configured for.

Feedback is attributed by the adapter version that produced the answer (storage view
``feedback_votes.adapter_version``), so the two arms never mix even while the controller is
still flipping routes. A user counts once per answer (their latest thumb), and no user counts for
more than ``canary.max_user_share`` of an arm, so a few accounts cannot decide a canary.
Repeated looks at a posterior inflate the error rate a little; the minimum sample and the high
thresholds keep that small, and the rollback threshold is the one that matters for users (a
regression is caught, not proven twice).

The pointers and statuses move through the release contract (``looprl.storage.releases``),
which checks each transition and records every decision with its numbers in the manifest and
the JSONL decisions log; the serving controller applies the pointers to the endpoints.

A canary has a deadline (``canary.deadline_seconds`` after it started): one the test has not
decided by then, for want of votes or because they stay inconclusive, is taken off traffic as
``canary.on_deadline`` says: ``end`` (decision ``end``: no verdict on the candidate) or
``rollback`` (decision ``rollback``: counted, and alerted on, as a failed canary). Either way the
candidate is rolled back through the release contract, the promoted version serves all traffic
again, and PPO, where it waits while a canary is judged, runs again.

Every release decision, whoever made it (this canary, an operator, the controller), is exported
from the decisions log as ``looprl_canary_last_decision_timestamp_seconds{decision}``: the
dashboard draws a deploy annotation at each promotion and rollback from it.

Counting takes a while, and meanwhile an operator may roll the canary back or promote a version
by hand (which ends the canary). Each decision is therefore committed as a compare-and-set on
what the step read before counting (the version still on canary, the control still promoted): if
anything changed, the release contract refuses it (``StaleDecision``), nothing is written, and the
step reports ``refused``; the person's decision stands.
"""

from __future__ import annotations

import functools
import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Literal

from prometheus_client import Counter, Gauge

from looprl.ops.core.config import CanaryConfig, LooprlConfig
from looprl.ops.core.log import get_logger
from looprl.storage import releases
from looprl.storage.events import EventLog, cap_by_voter
from looprl.storage.registry import Manifest, Registry, RegistryError
from looprl.storage.releases import BASE, KIND, DecisionRecord, Expected, version_number

log = get_logger(__name__)

# The test looks at the data once per this many new votes (both arms together), not on every
# poll: each look is a chance for a false alarm, so looks are tied to evidence, not to time.
LOOK_EVERY_VOTES = 10

DECISIONS = Counter("looprl_canary_decisions_total", "Canary decisions", ["decision"])
SAMPLES = Gauge("looprl_canary_samples", "Thumbs votes counted for the current canary test", ["arm"])
PAIRS = Gauge("looprl_canary_pair_votes", "Paired votes (a choice between the two arms' answers) counted for the "
              "current canary test")
PAIR_WINS = Gauge("looprl_canary_pair_win_ratio", "Share of the current canary test's paired votes won by the candidate")
RATE = Gauge("looprl_canary_thumbs_up_ratio", "Thumbs-up rate of each arm of the current canary test", ["arm"])
PROB_BETTER = Gauge("looprl_canary_prob_better_ratio", "Posterior P(candidate rate > control rate)")
ACTIVE = Gauge("looprl_canary_active_version", "Version number on canary (0: none)")
PROMOTED = Gauge("looprl_canary_promoted_version", "Version number serving all traffic (0: base model)")
STARTED = Gauge("looprl_canary_started_timestamp_seconds", "Unix time the current canary started (0: none)")
DEADLINE = Gauge("looprl_canary_deadline_timestamp_seconds",
                 "Unix time the current canary is ended if still undecided (0: none)")
LAST_DECISION = Gauge("looprl_canary_last_decision_timestamp_seconds",
                      "Unix time of the latest release decision of each kind in the decisions log "
                      "(canary, operators, controller)", ["decision"])
# Decision kinds are short words (start, promote, manual_rollback, ...); anything else in a
# hand-edited log line is not made a label value.
_DECISION_KIND = re.compile(r"[a-z_]{1,32}")


# --------------------------------------------------------------------------- statistics
@dataclass(frozen=True)
class Arm:
    """Thumbs votes of one arm: ``ups`` of ``n``."""

    ups: int
    n: int

    def __post_init__(self) -> None:
        if self.n < 0 or not 0 <= self.ups <= self.n:
            raise ValueError(f"invalid arm counts ups={self.ups} n={self.n}")

    @property
    def rate(self) -> float:
        return self.ups / self.n if self.n else float("nan")


def _log_beta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def prob_better(candidate: Arm, control: Arm, prior: tuple[int, int] = (1, 1)) -> float:
    """P(p_candidate > p_control) for independent Beta(prior + counts) posteriors, exactly.

    Closed form for an integer first parameter (Evan Miller, "Formulas for Bayesian A/B testing"):
        sum_{i < a_c} B(a_k + i, b_k + b_c) / ((b_c + i) B(1 + i, b_c) B(a_k, b_k))
    summed in log space, so thousands of votes are fine.
    """
    a_c, b_c = prior[0] + candidate.ups, prior[1] + candidate.n - candidate.ups
    a_k, b_k = prior[0] + control.ups, prior[1] + control.n - control.ups
    if not all(isinstance(x, int) and x > 0 for x in (a_c, b_c, a_k, b_k)):
        raise ValueError("prior must be positive integers")
    total = 0.0
    const = _log_beta(a_k, b_k)
    for i in range(a_c):
        total += math.exp(_log_beta(a_k + i, b_k + b_c) - math.log(b_c + i) - _log_beta(1 + i, b_c) - const)
    return min(1.0, max(0.0, total))


@dataclass(frozen=True)
class Pairs:
    """Paired votes: users shown both arms' answers to one question chose the candidate's ``wins``
    times of ``n``."""

    wins: int = 0
    n: int = 0

    def __post_init__(self) -> None:
        if self.n < 0 or not 0 <= self.wins <= self.n:
            raise ValueError(f"invalid pair counts wins={self.wins} n={self.n}")


def prob_preferred(pairs: Pairs, prior: tuple[int, int] = (1, 1)) -> float:
    """P(q > 1/2) for the candidate's share of paired choices q ~ Beta(prior + (wins, losses)),
    exactly: for integer a, b, P(Beta(a, b) > x) = P(Binomial(a + b - 1, x) <= a - 1), whose terms
    are summed in log space (thousands of votes are fine)."""
    a, b = prior[0] + pairs.wins, prior[1] + pairs.n - pairs.wins
    if not all(isinstance(x, int) and x > 0 for x in (a, b)):
        raise ValueError("prior must be positive integers")
    return _binomial_half_cdf(a + b - 1, a - 1)


@functools.lru_cache(maxsize=65536)
def _binomial_half_cdf(m: int, j: int) -> float:
    """P(Binomial(m, 1/2) <= j). Terms more than 20 standard deviations below the mean (each under
    e^-800 of the largest) are left out, so a look at thousands of votes costs a few hundred terms."""
    lo = max(0, int(min(j, m / 2) - 10 * math.sqrt(m)))
    log_terms = [math.lgamma(m + 1) - math.lgamma(k + 1) - math.lgamma(m - k + 1) - m * math.log(2)
                 for k in range(lo, j + 1)]
    top = max(log_terms)
    return min(1.0, math.exp(top) * math.fsum(math.exp(t - top) for t in log_terms))


def combine(*probabilities: float) -> float:
    """Posterior probabilities of one hypothesis from independent evidence, each from an even
    prior: the odds multiply (log-odds add). Clipped off 0 and 1 so one source cannot veto."""
    clipped = [min(max(p, 1e-12), 1.0 - 1e-12) for p in probabilities]
    log_odds = sum(math.log(p / (1.0 - p)) for p in clipped)
    return 1.0 / (1.0 + math.exp(-log_odds))


# "end": taken off traffic at its deadline without a verdict. "refused": the step decided, but
# someone else decided first (see the module docstring).
Action = Literal["wait", "promote", "rollback", "end", "refused"]


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    numbers: dict[str, Any] = field(default_factory=dict)


def decide(candidate: Arm, control: Arm, cfg: CanaryConfig, pairs: Pairs = Pairs()) -> Decision:
    """One look of the sequential test (pure: counts and config in, decision out). ``pairs``: the
    paired votes between the arms, evidence beside the thumbs (none: thumbs alone)."""
    p_thumbs, p_pairs = prob_better(candidate, control), prob_preferred(pairs)
    p = combine(p_thumbs, p_pairs) if pairs.n else p_thumbs
    numbers = {
        "candidate_ups": candidate.ups, "candidate_n": candidate.n,
        "control_ups": control.ups, "control_n": control.n,
        "candidate_rate": round(candidate.rate, 4) if candidate.n else None,
        "control_rate": round(control.rate, 4) if control.n else None,
        "prob_better": round(p, 4), "min_samples": cfg.min_samples,
    }
    if pairs.n:
        numbers.update(pair_wins=pairs.wins, pair_n=pairs.n, prob_better_thumbs=round(p_thumbs, 4),
                       prob_better_pairs=round(p_pairs, 4))
    if min(candidate.n, control.n) < cfg.min_samples:
        return Decision("wait", f"need {cfg.min_samples} votes per arm", numbers)
    if p >= cfg.promote_probability:
        return Decision("promote", f"P(better)={p:.3f} >= {cfg.promote_probability}", numbers)
    if 1.0 - p >= cfg.rollback_probability:
        return Decision("rollback", f"P(worse)={1 - p:.3f} >= {cfg.rollback_probability}: significant regression",
                        numbers)
    if min(candidate.n, control.n) >= cfg.max_samples:
        if cfg.promote_on_no_regression or p >= cfg.max_samples_promote_probability:
            return Decision("promote", f"max_samples reached without a significant regression (P(better)={p:.3f})",
                            numbers)
        return Decision("rollback", f"max_samples reached, P(better)={p:.3f} < "
                                    f"canary.max_samples_promote_probability={cfg.max_samples_promote_probability:g}",
                        numbers)
    return Decision("wait", f"P(better)={p:.3f} inconclusive", numbers)


def at_deadline(candidate: Arm, control: Arm, cfg: CanaryConfig, age_seconds: float) -> Decision:
    """The decision on a canary the test has not decided ``age_seconds`` after its start, past
    ``canary.deadline_seconds``: ``end`` or ``rollback`` as ``canary.on_deadline`` says."""
    votes = f"{candidate.n} candidate and {control.n} control votes"
    why = (f"too few votes ({votes}; canary.min_samples={cfg.min_samples} per arm)"
           if min(candidate.n, control.n) < cfg.min_samples else f"still inconclusive ({votes})")
    reached = f"deadline reached after {age_seconds:.0f} s (canary.deadline_seconds={cfg.deadline_seconds:g})"
    numbers = {"deadline_seconds": cfg.deadline_seconds, "on_deadline": cfg.on_deadline}
    if cfg.on_deadline == "end":
        return Decision("end", f"canary ended: {reached}, {why}", numbers)
    return Decision("rollback", f"{reached}, {why}: rolled back (canary.on_deadline)", numbers)


# --------------------------------------------------------------------------- feedback counts
CountsFn = Callable[[list[str], float], dict[str, Arm]]
PairsFn = Callable[[str, str, float], Pairs]  # (candidate, control, since) -> paired votes


def _sql_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def event_log_counts(cfg: LooprlConfig) -> CountsFn:
    """Thumbs votes per adapter version since a time, from the event log's ``feedback_votes`` view
    (a user's latest thumb per answer). In each arm every voter keeps its earliest votes up to
    ``canary.max_user_share`` of the arm (``looprl.storage.events.cap_by_voter``); votes with no
    user on them or on their answer count as one anonymous voter."""

    def counts(versions: list[str], since: float) -> dict[str, Arm]:
        if not cfg.events_dir.exists():
            return {}
        quoted = ", ".join(_sql_literal(v) for v in versions)
        # The window is on ingest time (our clock), not the producer's ts, which may run ahead.
        try:
            table = EventLog(cfg.events_dir).query(
                "SELECT adapter_version, voter, up "
                f"FROM feedback_votes WHERE kind = 'thumbs' AND up IS NOT NULL AND epoch(ingested_at) >= {float(since)} "
                f"AND adapter_version IN ({quoted}) ORDER BY ts, ingested_at, event_id"
            )
        except Exception as e:  # an empty or still-initialising log: nothing to count yet
            log.warning("canary: cannot count feedback yet", error=str(e)[:200])
            return {}
        votes: dict[str, list[tuple[str | None, bool]]] = {}
        for r in table.to_pylist():
            votes.setdefault(r["adapter_version"], []).append((r["voter"], r["up"]))
        out = {}
        for version, arm in votes.items():
            kept = cap_by_voter(arm, lambda vote: vote[0], cfg.canary.max_user_share)
            out[version] = Arm(sum(up for _, up in kept), len(kept))
        return out

    return counts


def event_log_pairs(cfg: LooprlConfig) -> PairsFn:
    """Paired votes since a time from the event log's ``preference_votes`` view: comparisons whose
    two answers were served by the candidate and the control (in either order), a voter's latest
    per pair; each voter keeps its earliest votes up to ``canary.max_user_share``, as for thumbs."""

    def pairs(candidate: str, control: str, since: float) -> Pairs:
        if not cfg.events_dir.exists():
            return Pairs()
        c, k = _sql_literal(candidate), _sql_literal(control)
        try:
            table = EventLog(cfg.events_dir).query(
                "SELECT chosen_adapter_version = " + c + " AS won, voter FROM preference_votes "
                f"WHERE epoch(ingested_at) >= {float(since)} AND ("
                f"(chosen_adapter_version = {c} AND rejected_adapter_version = {k}) OR "
                f"(chosen_adapter_version = {k} AND rejected_adapter_version = {c})) ORDER BY ts, ingested_at, event_id"
            )
        except Exception as e:  # an empty or still-initialising log: nothing to count yet
            log.warning("canary: cannot count paired votes yet", error=str(e)[:200])
            return Pairs()
        kept = cap_by_voter(table.to_pylist(), lambda r: r["voter"], cfg.canary.max_user_share)
        return Pairs(sum(bool(r["won"]) for r in kept), len(kept))

    return pairs


# --------------------------------------------------------------------------- the manager
def _no_canary() -> None:
    for gauge in (ACTIVE, STARTED, DEADLINE):
        gauge.set(0)


class CanaryManager:
    """Starts, judges and ends canaries. ``step()`` is called by the scheduler every poll."""

    def __init__(self, cfg: LooprlConfig, counts: CountsFn | None = None, clock: Callable[[], float] = time.time,
                 pairs: PairsFn | None = None):
        self.cfg = cfg
        self.registry = Registry(cfg.registry_dir)
        self.counts = counts or event_log_counts(cfg)
        # Paired votes count only when configured; a given counter is used as given (tests).
        counted = cfg.canary.count_pairs and counts is None
        self.pairs: PairsFn = pairs or (event_log_pairs(cfg) if counted else lambda *_: Pairs())
        self.clock = clock
        self.log_path = releases.decisions_path(cfg.state_dir)
        self._looked: tuple[str, int] | None = None  # (canary version, votes at the last look)
        self._log_read = 0  # bytes of the decisions log already exported (export_decisions)
        self._last: dict[str, float] = {}  # decision kind -> time of its latest one exported

    # ---- reading
    def promoted(self) -> str | None:
        return releases.promoted_version(self.registry)

    def canary(self) -> str | None:
        return releases.canary_version(self.registry)

    def decisions(self) -> list[dict[str, Any]]:
        return releases.read_decisions(self.cfg.state_dir)

    def export_decisions(self) -> None:
        """Export the decisions appended to the log since the last call (by anyone: this canary,
        operators' commands, the controller) as ``looprl_canary_last_decision_timestamp_seconds``."""
        try:
            with open(self.log_path, "rb") as f:
                if f.seek(0, 2) < self._log_read:  # replaced by a shorter file: read it afresh
                    self._log_read = 0
                f.seek(self._log_read)
                data = f.read()
        except FileNotFoundError:
            return
        whole = data[:data.rfind(b"\n") + 1]  # a line still being written waits for the next call
        self._log_read += len(whole)
        for line in whole.splitlines():
            try:
                rec = json.loads(line)
                kind, at = rec["action"], float(rec["at"])
            except (ValueError, KeyError, TypeError):
                continue  # not a decision line; the log's readers skip it too
            if isinstance(kind, str) and _DECISION_KIND.fullmatch(kind) and at > self._last.get(kind, 0.0):
                self._last[kind] = at
                LAST_DECISION.labels(decision=kind).set(at)

    def _record(self, rec: DecisionRecord) -> None:
        """Count and log a decision the release contract has made and written down."""
        DECISIONS.labels(decision=rec.action).inc()
        if "ended_canary" in rec.numbers:
            DECISIONS.labels(decision="end").inc()
        log.info("canary decision", action=rec.action, version=rec.version, control=rec.control,
                 reason=rec.reason, numbers=rec.numbers, by=rec.by)

    def _canary_started(self, m: Manifest) -> tuple[float, str]:
        """When the current canary started and which version it is compared with."""
        for h in reversed(m.history):
            if h.status == "canary":
                return h.at.timestamp(), str(h.numbers.get("control", BASE))
        return m.created_at.timestamp(), self.promoted() or BASE

    def next_candidate(self) -> Manifest | None:
        """The newest gated version newer than what serves all traffic, and gated against it.

        A candidate the gate judged against another incumbent is stale: with
        ``scheduler.policy_waits_for_canary`` off, runs go on while a canary is judged, and once that
        canary is promoted, the candidates gated meanwhile were judged against (and trained from)
        the version it replaced. Re-gating one (``looprl policy gate``) makes it current again. A
        version gated before the gate recorded its incumbent is taken as current."""
        promoted = self.promoted()
        floor = version_number(promoted)
        for m in reversed(self.registry.list(KIND)):
            if m.number <= floor:
                return None
            if m.status == "gated" and releases.gated_against(m) in (None, promoted or BASE):
                return m
        return None

    # ---- the loop body
    def step(self) -> Decision | None:
        try:
            return self._step()
        finally:
            self.export_decisions()

    def _step(self) -> Decision | None:
        promoted, canary = self.promoted(), self.canary()
        PROMOTED.set(version_number(promoted))
        if canary is None:
            _no_canary()
            cand = self.next_candidate()
            if cand is not None:
                seen = Expected("gated", {releases.CANARY: None, releases.PROMOTED: promoted})
                try:
                    self.start(cand.version, expected=seen)
                except releases.StaleDecision as e:  # promoted or started by hand meanwhile
                    log.warning("canary start refused", version=cand.version, error=str(e))
            return None
        ACTIVE.set(version_number(canary))
        if releases.drop_stale_canary(self.registry):  # someone decided by hand meanwhile
            return None
        m = self.registry.manifest(KIND, canary)
        since, control = self._canary_started(m)
        deadline = since + self.cfg.canary.deadline_seconds
        STARTED.set(since)
        DEADLINE.set(deadline)
        # A decision is valid only for what was read here; the contract compares it at commit.
        seen = Expected("canary", {releases.CANARY: canary, releases.PROMOTED: promoted})
        if (promoted or BASE) != control:
            # The control was replaced without ending this canary (a registry written by hand or by an
            # older looprl): the test would judge against a version that no longer serves.
            reason = f"canary ended: its control {control} no longer serves all traffic ({promoted or BASE} does)"
            return self._commit(Decision("rollback", reason, {"control": control}), canary, control, seen,
                                action="end")
        counts = self.counts([canary, control], since)
        cand_arm, ctrl_arm = counts.get(canary, Arm(0, 0)), counts.get(control, Arm(0, 0))
        pairs = self.pairs(canary, control, since)
        votes = cand_arm.n + ctrl_arm.n + pairs.n
        now = self.clock()
        expired = now >= deadline
        if (not expired and self._looked is not None and self._looked[0] == canary
                and votes < self._looked[1] + LOOK_EVERY_VOTES):
            return Decision("wait", f"{votes} votes; next look at {self._looked[1] + LOOK_EVERY_VOTES}")
        self._looked = (canary, votes)
        d = decide(cand_arm, ctrl_arm, self.cfg.canary, pairs)
        PAIRS.set(pairs.n)
        PAIR_WINS.set(pairs.wins / pairs.n if pairs.n else 0.0)
        SAMPLES.labels(arm="candidate").set(cand_arm.n)
        SAMPLES.labels(arm="control").set(ctrl_arm.n)
        RATE.labels(arm="candidate").set(cand_arm.rate if cand_arm.n else 0.0)
        RATE.labels(arm="control").set(ctrl_arm.rate if ctrl_arm.n else 0.0)
        PROB_BETTER.set(d.numbers["prob_better"])
        numbers = {**d.numbers, "control": control, "canary_seconds": round(now - since, 1)}
        if d.action == "wait" and expired:  # the test had its chance; it ends as configured
            late = at_deadline(cand_arm, ctrl_arm, self.cfg.canary, now - since)
            d, numbers = late, {**numbers, **late.numbers}
        return self._commit(Decision(d.action, d.reason, numbers), canary, control, seen, action=d.action)

    def _commit(self, d: Decision, canary: str, control: str, seen: Expected, action: str) -> Decision:
        """Write the step's decision if the registry still shows ``seen``; else report it refused."""
        try:
            if d.action == "promote":
                self._promote(canary, control, d.reason, d.numbers, by="canary", action=action, expected=seen)
            elif d.action in ("rollback", "end"):
                self._rollback_canary(canary, control, d.reason, d.numbers, by="canary", action=action,
                                      expected=seen)
        except releases.StaleDecision as e:
            log.warning("canary decision refused: decided elsewhere meanwhile", action=d.action, version=canary,
                        error=str(e))
            return Decision("refused", str(e), d.numbers)
        return d

    def start(self, version: str, expected: Expected | None = None) -> None:
        rec = releases.start_canary(self.registry, self.cfg.state_dir, version,
                                    traffic_share=self.cfg.canary.traffic_share, at=self.clock(), expected=expected)
        ACTIVE.set(version_number(version))
        STARTED.set(rec.at)
        DEADLINE.set(rec.at + self.cfg.canary.deadline_seconds)
        self._record(rec)

    def _promote(self, version: str, control: str, reason: str, numbers: dict, by: str, action: str,
                 expected: Expected | None = None) -> DecisionRecord:
        rec = releases.promote(self.registry, self.cfg.state_dir, version, reason, by=by, action=action,
                               control=control, numbers=numbers, at=self.clock(), expected=expected)
        PROMOTED.set(version_number(version))
        _no_canary()
        self._record(rec)
        return rec

    def _rollback_canary(self, version: str, control: str, reason: str, numbers: dict, by: str, action: str,
                         expected: Expected | None = None) -> None:
        rec = releases.roll_back_canary(self.registry, self.cfg.state_dir, version, reason, by=by, action=action,
                                        numbers={**numbers, "control": control}, at=self.clock(), expected=expected)
        _no_canary()
        self._record(rec)

    # ---- people: whoever can write the registry (ops/README.md, "Online canary and rollback")
    def manual_promote(self, version: str, by: str = "operator") -> str:
        """Promote any version that passed the gate (the release lifecycle refuses the others); a
        canary of another version ends. Returns a sentence saying what happened."""
        rec = self._promote(version, self.promoted() or BASE, f"manual promotion by {by}", {}, by, "manual_promote")
        ended = rec.numbers.get("ended_canary")
        return f"{version} serves all traffic" + (f"; canary {ended} ended" if ended else "")

    def manual_rollback(self, by: str = "operator") -> str:
        """Roll back the canary if there is one, else the promoted version to the one before it.
        Each is refused (``StaleDecision``) if the canary or the promoted version changed while
        deciding. Returns a sentence saying what happened."""
        canary, current = self.canary(), self.promoted()
        if canary is not None:
            control = current or BASE
            self._rollback_canary(canary, control, f"manual rollback by {by}", {"control": control}, by,
                                  "manual_rollback", expected=Expected("canary", {releases.CANARY: canary}))
            return f"canary {canary} rolled back; {control} serves all traffic"
        if current is None:
            raise RegistryError("nothing to roll back: no canary and the base model already serves all traffic")
        seen = Expected("promoted", {releases.PROMOTED: current, releases.CANARY: None})
        rec = releases.roll_back_promoted(self.registry, self.cfg.state_dir, f"manual rollback by {by}", by=by,
                                          action="manual_rollback", at=self.clock(), expected=seen)
        PROMOTED.set(version_number(self.promoted()))
        self._record(rec)
        return f"{current} rolled back; {rec.control if rec.control != BASE else 'the base model'} serves all traffic"

    def previous_promoted(self, current: str) -> str | None:
        return releases.previous_promoted(self.registry, current)

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"promoted": self.promoted() or BASE, "canary": self.canary()}
        c = out["canary"]
        if c:
            m = self.registry.manifest(KIND, c)
            since, control = self._canary_started(m)
            counts = self.counts([c, control], since)
            pairs = self.pairs(c, control, since)
            d = decide(counts.get(c, Arm(0, 0)), counts.get(control, Arm(0, 0)), self.cfg.canary, pairs)
            out.update(control=control, since=since, deadline=since + self.cfg.canary.deadline_seconds,
                       on_deadline=self.cfg.canary.on_deadline, test=asdict(d))
        return out


def read_decisions(cfg: LooprlConfig) -> list[dict[str, Any]]:
    return releases.read_decisions(cfg.state_dir)
