"""How well the reward model ranks, with its uncertainty, from every kind of label (no torch).

Pair accuracy and AUC are the same quantity: the probability that the model scores the better of
two answers higher (for a pair, the one the user chose; for thumbs and other points, a liked answer
against a disliked one). So both combine into one *ranking skill* estimate, an inverse-variance
weighted mean, with its standard error and a one-sided lower confidence bound:

- pairs: ``correct`` of ``n`` (ties count one half), Agresti–Coull centre and variance (the
  Wilson interval's centre: a few pairs that are all right do not claim certainty);
- points: AUC with the Hanley–McNeil (1982) standard error from its positive and negative counts,
  its centre shrunk towards 0.5 as the pairs' is (by the number of pairs that would have the
  AUC's variance under chance, 3mn / (m + n + 1)).
  Thumbs are Bernoulli draws of the users' liking, so even a perfect model's thumbs AUC is well
  below 1: the skill is about beating chance (0.5) with confidence, not about reaching 1.

``paired_difference`` compares two models on the *same* events (per-event differences: pair
correctness, and the DeLong placement values of the points), for the publish decision.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any, Iterable, Mapping


def z_one_sided(confidence: float) -> float:
    if not 0.5 < confidence < 1:
        raise ValueError(f"confidence must be in (0.5, 1), got {confidence}")
    return NormalDist().inv_cdf(confidence)


def pair_estimate(n: float, correct: float, z: float) -> tuple[float, float]:
    """(estimate, variance) of a pair accuracy: Agresti–Coull, ``z`` of the confidence level."""
    nt = n + z * z
    p = (correct + z * z / 2) / nt
    return p, p * (1 - p) / nt


def auc_variance(auc: float, n_pos: int, n_neg: int) -> float:
    """Hanley–McNeil variance of an AUC from ``n_pos`` positives and ``n_neg`` negatives."""
    a = auc
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    return max(a * (1 - a) + (n_pos - 1) * (q1 - a * a) + (n_neg - 1) * (q2 - a * a), 0.0) / (n_pos * n_neg)


def auc_estimate(auc: float, n_pos: int, n_neg: int, z: float) -> tuple[float, float]:
    """(estimate, variance) of an AUC: shrunk towards 0.5 like a pair accuracy on the number of
    pairs with the same variance under chance (so a perfect AUC on a handful of points is not
    certain), Hanley–McNeil variance at the shrunk value."""
    n_eff = 3 * n_pos * n_neg / (n_pos + n_neg + 1)
    a = (auc * n_eff + z * z / 2) / (n_eff + z * z)
    return a, auc_variance(a, n_pos, n_neg)


@dataclass
class Evidence:
    """The label counts one evaluation recorded (a history row's ``prequential``, a manifest's
    ``holdout_*``): pairs and the AUC of the points with their classes' counts."""
    source: str
    pairs: int = 0
    pairs_correct: float = 0.0
    auc: float | None = None
    pos: int = 0
    neg: int = 0

    @classmethod
    def from_metrics(cls, source: str, d: Mapping[str, Any], prefix: str = "") -> "Evidence":
        """From ``EvalResult.as_dict(prefix)`` numbers. Older records without ``pairs_correct``
        give it as accuracy x pairs; without class counts their AUC cannot be weighed and is left out."""
        def num(key: str) -> float | None:
            v = d.get(prefix + key)
            return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None

        pairs = int(num("pairs") or 0)
        correct = num("pairs_correct")
        if correct is None:
            acc = num("pair_accuracy")
            correct = acc * pairs if acc is not None else None
        if correct is None:
            pairs, correct = 0, 0.0
        auc, pos, neg = num("point_auc"), int(num("points_pos") or 0), int(num("points_neg") or 0)
        if auc is None or not pos or not neg:
            auc, pos, neg = None, 0, 0
        return cls(source, pairs, correct, auc, pos, neg)


@dataclass
class Skill:
    """The pooled ranking skill: estimate, standard error, lower bound at ``confidence``."""
    estimate: float | None
    se: float | None
    lower: float | None
    confidence: float
    pairs: int = 0
    pairs_correct: float = 0.0
    aucs: list[tuple[str, float, int, int]] = field(default_factory=list)  # (source, auc, pos, neg)

    def describe(self) -> str:
        """The numbers behind the estimate, for reason strings."""
        parts = [f"{self.pairs} pairs ({self.pairs_correct / self.pairs:.3f} right)" if self.pairs else "0 pairs"]
        if self.aucs:
            shown = ", ".join(f"{a:.3f} on {p}+/{n}- ({s})" for s, a, p, n in self.aucs[:4])
            more = f" and {len(self.aucs) - 4} more" if len(self.aucs) > 4 else ""
            parts.append(f"points AUC {shown}{more}")
        else:
            parts.append("no points with both classes")
        head = (f"ranking skill {self.estimate:.3f} ± {self.se:.3f}, {self.confidence:.0%} lower bound {self.lower:.3f}"
                if self.estimate is not None else "ranking skill unmeasured")
        return f"{head} ({'; '.join(parts)})"


def combine(parts: Iterable[tuple[float, float]], z: float) -> tuple[float, float, float] | None:
    """Inverse-variance weighted mean of (estimate, variance) parts: (mean, se, mean - z se)."""
    parts = [(e, max(v, 1e-12)) for e, v in parts]
    if not parts:
        return None
    w = sum(1 / v for _, v in parts)
    mean = sum(e / v for e, v in parts) / w
    se = math.sqrt(1 / w)
    return mean, se, mean - z * se


def ranking_skill(evidence: Iterable[Evidence], confidence: float) -> Skill:
    """One skill estimate from all the evidence: the pairs pooled into one accuracy, each AUC on its own."""
    z = z_one_sided(confidence)
    pairs, correct, aucs = 0, 0.0, []
    for ev in evidence:
        pairs, correct = pairs + ev.pairs, correct + ev.pairs_correct
        if ev.auc is not None:
            aucs.append((ev.source, ev.auc, ev.pos, ev.neg))
    parts = [pair_estimate(pairs, correct, z)] if pairs else []
    parts += [auc_estimate(a, p, n, z) for _, a, p, n in aucs]
    got = combine(parts, z)
    est, se, lower = got if got else (None, None, None)
    return Skill(est, se, lower, confidence, pairs, correct, aucs)


# ---------------------------------------------------------------------------------------------
# Two models on the same events
# ---------------------------------------------------------------------------------------------


def _mean_var(diffs: list[float]) -> tuple[float, float]:
    """Mean of per-event differences and the variance of that mean. The variance counts two extra
    pseudo-differences, +1 and -1, so a few events that all agree do not claim certainty."""
    mean = sum(diffs) / len(diffs)
    padded = diffs + [1.0, -1.0]
    m = sum(padded) / len(padded)
    s2 = sum((d - m) ** 2 for d in padded) / (len(padded) - 1)
    return mean, s2 / len(diffs)


@dataclass
class Difference:
    """Candidate minus current skill on the same events, with its upper bound at ``confidence``."""
    delta: float
    se: float
    upper: float
    confidence: float
    pairs: int
    pos: int
    neg: int

    def describe(self) -> str:
        return (f"held-out skill change {self.delta:+.4f} ± {self.se:.4f} ({self.confidence:.0%} upper bound "
                f"{self.upper:+.4f}) on {self.pairs} pairs and {self.pos}+/{self.neg}- points")


def paired_difference(cand_pairs: Mapping[str, float], cur_pairs: Mapping[str, float],
                      cand_points: Mapping[str, tuple[bool, float]], cur_points: Mapping[str, tuple[bool, float]],
                      confidence: float) -> Difference | None:
    """Skill of the candidate minus the current model's, from per-event results on the same events:
    pair correctness (1, 0.5, 0) and points' placement values (``placements``); the AUC difference
    is the mean placement difference, its variance DeLong's. None when no event is shared."""
    z = z_one_sided(confidence)
    parts: list[tuple[float, float]] = []
    common = [e for e in cand_pairs if e in cur_pairs]
    if common:
        parts.append(_mean_var([cand_pairs[e] - cur_pairs[e] for e in common]))
    pos = [cand_points[e][1] - cur_points[e][1] for e in cand_points if e in cur_points and cand_points[e][0]]
    neg = [cand_points[e][1] - cur_points[e][1] for e in cand_points if e in cur_points and not cand_points[e][0]]
    if pos and neg:
        mp, vp = _mean_var(pos)
        _, vn = _mean_var(neg)
        parts.append((mp, vp + vn))
    got = combine(parts, z)
    if got is None:
        return None
    delta, se, _ = got
    return Difference(delta, se, delta + z * se, confidence, len(common), len(pos) if neg else 0, len(neg) if pos else 0)


def placements(scores: list[float], labels: list[bool]) -> list[float]:
    """DeLong placement values: for a positive, the share of negatives it outranks; for a negative,
    the share of positives that outrank it (ties one half). Their means over either class are the
    AUC. Empty when a class is missing."""
    pos = sorted(s for s, y in zip(scores, labels) if y)
    neg = sorted(s for s, y in zip(scores, labels) if not y)
    if not pos or not neg:
        return []
    out = []
    for s, y in zip(scores, labels):
        other = neg if y else pos
        lo, hi = bisect.bisect_left(other, s), bisect.bisect_right(other, s)
        below, ties = lo, hi - lo
        out.append((below + ties / 2) / len(neg) if y else (len(pos) - hi + ties / 2) / len(pos))
    return out
