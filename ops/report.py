"""The demo report: did the served model get better from feedback?

Reads what the loop left in the workspace (simulator interactions, registry manifests, canary
decisions, scheduler runs) and writes ``<reports>/<run>/``:

    report.md                 summary: base vs served thumbs-up rate on held-out prompts, versions, decisions
    thumbs_up.png             eval thumbs-up rate per adapter version over time
    reward_accuracy.png       reward model prequential accuracy per version
    kl.png                    KL(policy || base) per PPO step, per policy version
    summary.json              the numbers (what tests and the demo's exit code use), with the feedback
                              profile, the labels sent per kind and the lift per 1,000 labels

"Thumbs-up rate" is measured on eval traffic only (held-out prompts, eval users, no feedback
sent), as the sampled rate and as the mean of the hidden preference's probabilities (the same
quantity without the coin-flip noise).
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from looprl.ops.canary import read_decisions
from looprl.ops.core.config import LooprlConfig
from looprl.ops.core.log import get_logger
from looprl.ops.core.version import version_sort_key
from looprl.ops.scheduler import History, history_path
from looprl.ops.sim.profiles import describe
from looprl.ops.sim.records import read_interactions, read_status
from looprl.reward.history import read_history, reward_history_path
from looprl.storage.registry import Registry
from looprl.storage.releases import BASE, KIND, promoted_version

log = get_logger(__name__)


def _rate_stats(rows: list[dict], words: bool = False) -> dict[str, Any]:
    """Thumbs-up rate of ``rows``; with ``words``, the answers' mean length in words too (the
    simulator records the text of eval answers only)."""
    n = len(rows)
    ups = sum(1 for r in rows if r["up"])
    p_mean = sum(r["p"] for r in rows) / n if n else None
    rate = ups / n if n else None
    # 95% normal-approximation half-width of the sampled rate (reported, not used for decisions).
    half = 1.96 * math.sqrt(rate * (1 - rate) / n) if n else None
    out = {"n": n, "ups": ups, "rate": rate, "p_mean": p_mean, "ci95": half}
    if words:
        out["answer_words"] = sum(len(str(r.get("completion") or "").split()) for r in rows) / n if n else None
    return out


def summarize(interactions: list[dict], promoted: str | None, min_eval: int = 100,
              promotions: list[str] | None = None) -> dict[str, Any]:
    """Per-version eval stats and the improvement of the served model over the base.

    The served model is ``promoted`` if it has ``min_eval`` eval answers, else the newest of
    ``promotions`` (the versions promoted, in order) that has: the one users were served before it.
    Without ``promotions``, the newest version with enough answers."""
    evals = [r for r in interactions if r.get("kind") == "eval"]
    trains = [r for r in interactions if r.get("kind") == "train"]
    by_version: dict[str, list[dict]] = defaultdict(list)
    for r in evals:
        by_version[r["version"]].append(r)
    eval_stats = {v: _rate_stats(rows, words=True)
                  for v, rows in sorted(by_version.items(), key=lambda kv: version_sort_key(kv[0]))}
    train_by_version: dict[str, list[dict]] = defaultdict(list)
    for r in trains:
        train_by_version[r["version"]].append(r)
    train_stats = {v: _rate_stats(rows) for v, rows in sorted(train_by_version.items(), key=lambda kv: version_sort_key(kv[0]))}

    def measured(v: str) -> bool:
        return v != BASE and eval_stats.get(v, {}).get("n", 0) >= min_eval

    base = eval_stats.get(BASE)
    served = promoted if promoted and measured(promoted) else None
    if served is None:
        earlier = [v for v in promotions if v != promoted] if promotions is not None else list(eval_stats)
        served = next((v for v in reversed(earlier) if measured(v)), None)
    out: dict[str, Any] = {
        "eval": eval_stats, "train": train_stats, "base": base, "served_version": served,
        "promoted": promoted, "eval_requests": len(evals), "train_requests": len(trains),
        "improvement_rate": None, "improvement_p": None, "min_eval": min_eval,
    }
    if base and served:
        s = eval_stats[served]
        out["served"] = s
        out["improvement_rate"] = s["rate"] - base["rate"]
        out["improvement_p"] = s["p_mean"] - base["p_mean"]
    return out


LABEL_KINDS = ("thumbs", "preference", "correction")


def label_counts(interactions: list[dict], status: dict[str, Any] | None = None) -> dict[str, int]:
    """Labels the simulated users sent, per kind and in total: summed over the train interactions
    (each records its own, so restarts and resumed runs all count); from the simulator's status
    (its ``feedback_sent``, this run only) for a log written before interactions recorded them."""
    counts = dict.fromkeys(LABEL_KINDS, 0)
    rows = [r for r in interactions if r.get("kind") == "train" and isinstance(r.get("labels"), dict)]
    if rows:
        for r in rows:
            for kind, n in r["labels"].items():
                counts[kind] = counts.get(kind, 0) + int(n)
    else:
        for kind, n in ((status or {}).get("feedback_sent") or {}).items():
            counts[kind] = counts.get(kind, 0) + int(n)
    counts["total"] = sum(counts.values())
    return counts


def per_1000_labels(lift: float | None, labels: int) -> float | None:
    """What 1,000 labels bought: the lift divided by the labels spent on it."""
    return None if lift is None or labels <= 0 else lift / labels * 1000.0


# The gate's numbers the report shows per version, in this order, where the decisions carry them:
# the win rate on training prompts' forms and on held-out forms training never samples, the
# reward gain on each, the share of degenerate answers (empty, repetitive), and the mean answer
# length of the candidate and the incumbent on training forms (a shift there shows a policy following
# a reward model's taste for short or long answers, ops/README.md).
GATE_COLUMNS = ("win_rate", "train_forms_win_rate", "heldout_forms_win_rate", "train_forms_reward_gain",
                "heldout_forms_reward_gain", "train_forms_degenerate_share", "heldout_forms_degenerate_share",
                "train_forms_answer_tokens", "train_forms_incumbent_answer_tokens", "kl_to_base")


def _votes(numbers: dict[str, Any]) -> str:
    """A canary decision's votes: thumbs up of n per arm (candidate, control), and the paired votes
    the candidate won; "-" for decisions without counts (start, manual)."""
    if "candidate_n" not in numbers:
        return "-"
    out = (f"thumbs {numbers['candidate_ups']}/{numbers['candidate_n']} vs "
           f"{numbers['control_ups']}/{numbers['control_n']}")
    return out + (f"; pairs won {numbers['pair_wins']}/{numbers['pair_n']}" if numbers.get("pair_n") else "")


def gate_decisions(cfg: LooprlConfig) -> list[dict[str, Any]]:
    """The promotion gate's decisions (``<state>/gate/decisions.jsonl``): version, decision, reason
    and the numbers of ``GATE_COLUMNS`` it carries (plus any other ``*_degenerate_share``)."""
    path = cfg.state_dir / "gate" / "decisions.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a torn last line after a crash
            continue
        if not isinstance(row, dict):
            continue
        numbers = row.get("numbers") if isinstance(row.get("numbers"), dict) else {}
        shown = {k: v for k, v in numbers.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                 and (k in GATE_COLUMNS or k.endswith("_degenerate_share"))}
        out.append({"version": row.get("version"), "decision": row.get("decision"), "at": row.get("at"),
                    "reason": row.get("reason"), "numbers": shown})
    return out


def _gate_lines(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    present = {k for r in rows for k in r["numbers"]}
    cols = [k for k in GATE_COLUMNS if k in present]
    cols += sorted(k for k in present if k not in GATE_COLUMNS)
    lines = ["## Promotion gate", "",
             "The newest reward model judges each candidate against the serving version on prompts in the "
             "training forms and in held-out forms training never samples.", "",
             "| version | decision | " + " | ".join(c.replace("_", " ") for c in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for r in rows:
        lines.append(f"| {r['version'] or '-'} | {r['decision'] or '-'} | "
                     + " | ".join(_fmt(r["numbers"].get(c)) for c in cols) + " |")
    return lines + [""]


def _binned(rows: list[dict], t0: float, bin_s: float) -> tuple[list[float], list[float], list[float]]:
    bins: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        bins[int((r["ts"] - t0) // bin_s)].append(r)
    xs, rates, ps = [], [], []
    for b in sorted(bins):
        rs = bins[b]
        xs.append((b + 0.5) * bin_s / 60.0)
        rates.append(sum(r["up"] for r in rs) / len(rs))
        ps.append(sum(r["p"] for r in rs) / len(rs))
    return xs, rates, ps


@contextmanager
def _axes(out: Path, height: float = 4.0, legend_loc: str = "best") -> Iterator[Any]:
    """Axes of a figure that is written to `out` (PNG, headless) when the block ends, with a grid
    and, when anything drawn has a label, a legend."""
    import matplotlib  # lazy: only a report draws, and the headless backend must be chosen before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, height))
    try:
        yield ax
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc=legend_loc)
        fig.tight_layout()
        fig.savefig(out, dpi=100)
    finally:
        plt.close(fig)


def plot_thumbs(interactions: list[dict], out: Path, bin_s: float = 60.0) -> Path:
    evals = [r for r in interactions if r.get("kind") == "eval"]
    with _axes(out, height=4.5, legend_loc="upper left") as ax:
        if evals:
            t0 = min(r["ts"] for r in interactions)
            by_version: dict[str, list[dict]] = defaultdict(list)
            for r in evals:
                by_version[r["version"]].append(r)
            for v in sorted(by_version, key=version_sort_key):
                xs, rates, ps = _binned(by_version[v], t0, bin_s)
                line, = ax.plot(xs, ps, marker="o", ms=3, label=f"{v} (expected)")
                ax.scatter(xs, rates, s=10, alpha=0.4, color=line.get_color())
        ax.set_xlabel("minutes since the first request")
        ax.set_ylabel("thumbs-up rate on held-out prompts")
        ax.set_ylim(0, 1)
        ax.set_title("Eval thumbs-up rate per adapter version (dots: sampled, lines: expected)")
    return out


def reward_accuracy_points(cfg: LooprlConfig) -> list[dict[str, Any]]:
    """One point per reward update: prequential pair accuracy / thumbs AUC (judged on the new
    feedback *before* training on it), the candidate's held-out score and the published version's
    score on the same held-out set (what the publish decision compared), from
    ``state/reward_history.jsonl`` (falls back to the published manifests)."""
    pts: list[dict[str, Any]] = []
    if reward_history_path(cfg).is_file():
        for row in read_history(cfg):
            preq, cand, cur = row.get("prequential") or {}, row.get("candidate") or {}, row.get("current") or {}
            pts.append({"update": row.get("update"), "version": row.get("version"), "decision": row.get("decision"),
                        "new_events": row.get("new_events"), "pair_accuracy": preq.get("pair_accuracy"),
                        "thumbs_auc": preq.get("thumbs_auc"), "holdout_score": cand.get("score"),
                        "current_score": cur.get("score"), "current_version": row.get("current_version")})
        return pts
    for m in Registry(cfg.registry_dir).list("reward"):
        pts.append({"update": m.extra.get("update"), "version": m.version, "decision": "published",
                    "new_events": None, "pair_accuracy": m.metrics.get("prequential_pair_accuracy"),
                    "thumbs_auc": m.metrics.get("prequential_thumbs_auc"), "holdout_score": m.metrics.get("holdout_score"),
                    "current_score": m.metrics.get("current_holdout_score"), "current_version": m.parent})
    return pts


def plot_reward_accuracy(points: list[dict], out: Path) -> Path:
    with _axes(out) as ax:
        for key, label in (("pair_accuracy", "prequential pair accuracy"), ("thumbs_auc", "prequential thumbs AUC"),
                           ("holdout_score", "held-out score")):
            pts = [(i + 1, p[key]) for i, p in enumerate(points) if isinstance(p.get(key), (int, float))]
            if pts:
                ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o", ms=3, label=label)
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("reward model update")
        ax.set_ylabel("accuracy / AUC")
        ax.set_ylim(0, 1)
        ax.set_title("Reward model on feedback it had not trained on (test-then-train)")
    return out


def policy_curves(cfg: LooprlConfig) -> list[dict[str, Any]]:
    out = []
    for m in Registry(cfg.registry_dir).list(KIND):
        curve = m.metrics.get("curve") or []
        out.append({"version": m.version, "status": m.status, "at": m.created_at.timestamp(),
                    "kl": [row.get("kl") for row in curve if isinstance(row, dict)],
                    "reward": [row.get("reward_mean") for row in curve if isinstance(row, dict)],
                    "kl_last": m.metrics.get("kl_last"), "kl_stop": m.metrics.get("kl_stop"),
                    "reward_version": m.extra.get("reward_version"),
                    "history": [{"status": h.status, "reason": h.reason, "at": h.at.timestamp(), "numbers": h.numbers}
                                for h in m.history]})
    return out


def plot_kl(curves: list[dict], out: Path) -> Path:
    with _axes(out) as ax:
        offset = 0  # runs follow each other on one step axis
        for c in curves:
            kl = [k for k in c["kl"] if isinstance(k, (int, float))]
            if kl:
                ax.plot(range(offset, offset + len(kl)), kl, marker=".", label=f"{c['version']} ({c['status']})")
                offset += len(kl)
        ax.set_xlabel("PPO step (all runs, in order)")
        ax.set_ylabel("KL(policy || base), nats per completion")
        ax.set_title("KL to the base model during PPO")
    return out


def _fmt(x: Any, pct: bool = False) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.1%}" if pct else f"{x:.3f}"
    return str(x)


def _failure_lines(summary: dict[str, Any]) -> list[str]:
    """The failure that stopped the demo, and every stage's failures and restarts (from the
    demo's failure watch, ops/health.py); nothing when the demo did not pass them."""
    lines = []
    f = summary.get("failure")
    if f:
        lines += ["## The demo stopped on a failure", "", f"**{f['reason']}**", "",
                  f"First error: `{f.get('first_error') or '-'}`", "", f"Log: `{f.get('log') or '-'}`", ""]
    stages = summary.get("stages")
    if stages:
        lines += ["## Stages", "", "| stage | restarts | handled | failed | error rate (last minute) |",
                  "|---|---|---|---|---|"]
        for name, row in stages.items():
            counted = "requests" in row and row.get("unit")
            fails = counted and row.get("counts_failures")
            handled = f"{row['requests']} {row['unit']}" if counted else "-"
            failed = row["failed"] if fails else "-"
            rate = _fmt(row.get("error_rate"), True) if fails else "-"
            lines.append(f"| {name} | {row.get('restarts', 0)} | {handled} | {failed} | {rate} |")
        lines.append("")
    return lines


def _served_lines(summary: dict[str, Any]) -> list[str]:
    """Why the measured version is not the one promoted last, when it is not."""
    promoted, served = summary.get("promoted"), summary.get("served_version")
    if not promoted or promoted == served:
        return []
    n = (summary["eval"].get(promoted) or {}).get("n", 0)
    instead = f"measured: {served}, promoted before it" if served else "no promoted version has that many"
    return [f"{promoted} was promoted last, with {n} eval answers, fewer than the {summary['min_eval']} a served "
            f"version's rate needs here; {instead}.", ""]


def _label_lines(summary: dict[str, Any]) -> list[str]:
    """The feedback profile, the labels it cost, and the lift per 1,000 labels."""
    fb, labels = summary.get("feedback") or {}, summary["labels"]
    shares = ", ".join(f"{_fmt(fb.get(k), True)} {name}" for k, name in (
        ("thumbs_fraction", "thumbs"), ("preference_fraction", "comparisons"), ("correction_fraction", "corrections"))
        if fb.get(k) is not None)
    if fb.get("request_comparisons"):
        shares += f", comparisons when serving asks (up to {_fmt(fb.get('comparisons_per_hour'))} per hour)"
    seed = summary.get("simulator_seed")
    users = [] if seed is None else [f"Simulated users' seed: {seed} (`demo.seed={seed}` replays their draws).", ""]
    return [f"Feedback profile: **{fb.get('profile', '-')}** ({shares}).", "", *users,
            "| labels | thumbs | comparisons | corrections | lift | lift per 1,000 labels |",
            "|---|---|---|---|---|---|",
            f"| {labels['total']} | {labels.get('thumbs', 0)} | {labels.get('preference', 0)} "
            f"| {labels.get('correction', 0)} | {_fmt(summary['improvement_rate'])} "
            f"| {_fmt(summary['lift_per_1000_labels'])} |", ""]


def write_report(cfg: LooprlConfig, out_dir: Path | None = None, extra: dict[str, Any] | None = None,
                 min_eval: int | None = None) -> tuple[Path, dict[str, Any]]:
    """Write the report folder; returns (folder, summary). ``min_eval``: ``demo.report_min_eval``."""
    out = Path(out_dir or cfg.reports_dir / time.strftime("demo-%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    interactions = read_interactions(cfg)
    promoted = promoted_version(Registry(cfg.registry_dir))
    decisions = read_decisions(cfg)
    promotions = [d["version"] for d in sorted(decisions, key=lambda d: d["at"])
                  if d["action"] in ("promote", "manual_promote")]
    summary = summarize(interactions, promoted, min_eval=min_eval or cfg.demo.report_min_eval, promotions=promotions)
    summary["target_improvement"] = cfg.demo.target_improvement
    imp = summary["improvement_rate"]
    summary["target_met"] = bool(imp is not None and imp >= cfg.demo.target_improvement)
    reward_pts = reward_accuracy_points(cfg)
    curves = policy_curves(cfg)
    runs = History(history_path(cfg)).runs(limit=200) if history_path(cfg).is_file() else []
    gates = gate_decisions(cfg)
    status = read_status(cfg)
    labels = label_counts(interactions, status)
    summary.update(feedback=status.get("feedback") or describe(cfg.demo), simulator_seed=status.get("seed"),
                   labels=labels,
                   lift_per_1000_labels=per_1000_labels(imp, labels["total"]),
                   expected_lift_per_1000_labels=per_1000_labels(summary["improvement_p"], labels["total"]),
                   gate=gates)
    summary.update(reward_updates=len(reward_pts), policy_versions=len(curves), decisions=len(decisions),
                   runs=len(runs), **(extra or {}))

    plot_thumbs(interactions, out / "thumbs_up.png")
    plot_reward_accuracy(reward_pts, out / "reward_accuracy.png")
    plot_kl(curves, out / "kl.png")
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))

    base, served = summary.get("base") or {}, summary.get("served") or {}
    lines = [
        "# looprl demo report", "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} from workspace `{cfg.workspace}`.", "",
        *_failure_lines(summary),
        "## Did the served model get better from feedback?", "",
        "Measured by the simulator on held-out prompts from eval users (no feedback sent from them).", "",
        "| model | eval requests | thumbs-up rate | expected rate (hidden preference) |",
        "|---|---|---|---|",
        f"| base | {base.get('n', 0)} | {_fmt(base.get('rate'), True)} | {_fmt(base.get('p_mean'), True)} |",
        f"| served ({summary['served_version'] or '-'}) | {served.get('n', 0)} | {_fmt(served.get('rate'), True)} "
        f"| {_fmt(served.get('p_mean'), True)} |", "",
        f"**Improvement: {_fmt(summary['improvement_rate'])}** (expected: {_fmt(summary['improvement_p'])}); "
        f"target {cfg.demo.target_improvement:.2f}: **{'met' if summary['target_met'] else 'not met'}**.", "",
        *_served_lines(summary),
        *_label_lines(summary),
        "![thumbs-up rate](thumbs_up.png)", "",
        "### Per adapter version (eval traffic)", "",
        "| version | n | rate | expected | answer words |", "|---|---|---|---|---|",
    ]
    for v, s in summary["eval"].items():
        lines.append(f"| {v} | {s['n']} | {_fmt(s['rate'], True)} | {_fmt(s['p_mean'], True)} "
                     f"| {'-' if s.get('answer_words') is None else format(s['answer_words'], '.1f')} |")
    lines += ["", "## Reward model", "",
              "| update | new events | prequential pair acc. | prequential thumbs AUC | held-out "
              "| published on same held-out | decision | version |",
              "|---|---|---|---|---|---|---|---|"]
    for p in reward_pts:
        cur = "-" if p.get("current_score") is None else f"{_fmt(p['current_score'])} ({p.get('current_version') or '?'})"
        lines.append(f"| {p['update']} | {_fmt(p['new_events'])} | {_fmt(p['pair_accuracy'])} | {_fmt(p['thumbs_auc'])} "
                     f"| {_fmt(p['holdout_score'])} | {cur} | {p['decision']} | {p['version'] or '-'} |")
    lines += ["", "A candidate is published unless it is confidently worse than the published version on the same "
              f"held-out events (a paired test at {cfg.reward.publish_confidence:.0%} confidence, margin "
              f"{cfg.reward.publish_margin}); the held-out set grows with every update, so the published version is "
              "re-scored each time.",
              "", "![reward accuracy](reward_accuracy.png)", "", "## Policy versions", "",
              "| version | status | reward model | steps | KL stop | final KL |", "|---|---|---|---|---|---|"]
    for c in curves:
        stop = c.get("kl_stop")
        stop_cell = f"after step {stop['step']}, published step {stop['published_step']}" if stop else "-"
        lines.append(f"| {c['version']} | {c['status']} | {c['reward_version'] or '-'} | {len(c['kl'])} "
                     f"| {stop_cell} | {_fmt(c['kl_last'])} |")
    lines += ["", "A run whose 5-step mean KL reached policy.stop_kl published its last checkpoint under it: the "
              "final KL is that checkpoint's.", "", "![KL](kl.png)", "", *_gate_lines(gates),
              "## Canary and promotion decisions", "",
              "| time | action | version | control | votes | reason |", "|---|---|---|---|---|---|"]
    for d in decisions:
        lines.append(f"| {time.strftime('%H:%M:%S', time.localtime(d['at']))} | {d['action']} | {d['version']} "
                     f"| {d['control']} | {_votes(d.get('numbers') or {})} | {d['reason']} |")
    lines += ["", "## Scheduler runs", "", "| id | job | trigger | attempt | status | seconds |", "|---|---|---|---|---|---|"]
    for r in reversed(runs[:50]):
        secs = (r["finished_at"] - r["started_at"]) if r.get("finished_at") else None
        lines.append(f"| {r['id']} | {r['job']} | {r['trigger'][:60]} | {r['attempt']} | {r['status']} | {_fmt(secs)} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    log.info("report written", path=str(out), improvement=summary["improvement_rate"], target_met=summary["target_met"])
    return out, summary
