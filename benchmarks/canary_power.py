"""How often the online canary promotes a candidate, by how much better or worse it truly is.

The canary (``looprl.ops.canary``) decides on thumbs from product traffic. How many votes it gets
per arm bounds what it can tell apart, whatever its thresholds: this script measures that. It
simulates canaries whose candidate's true thumbs-up rate differs from the control's by each of
``--diffs`` (absolute points), votes split between the arms as ``canary.traffic_share`` splits
traffic, the test looking once per ``LOOK_EVERY_VOTES`` new votes as the canary manager does, and
each look decided by the canary's own ``decide``. It reports, per configuration and difference,
the share of canaries that ended in a promotion and the mean number of votes to a decision. Votes
are independent coin flips: real ones come from fewer users, each capped at
``canary.max_user_share`` of an arm, and vary with the prompt, so a real canary sees less than
this.

Configurations: the schema's defaults (``production``), the demo's generous tuning (``demo``) and
the sparse profiles' (``demo-sparse``), both as ``looprl.ops.demo`` tunes them. A promotion rate
at a negative difference is the chance that a worse version replaces a better one.

The configurations that decide by P(better) at ``max_samples`` (``canary.promote_on_no_regression``
False) run again with each ``--at-max`` value as ``canary.max_samples_promote_probability``
(``demo@0.5``: the rule before the demo asked for a lean), a baseline in the same run.

Each configuration runs twice: on thumbs alone (the baseline), and with paired votes
(``+pairs``: users choosing between the two arms' answers to one question, ``canary.count_pairs``).
Pairs come at a rate per thumbs vote: the demo profiles' comparisons per thumb
(``demo.preference_fraction / demo.thumbs_fraction``), ``--pairs-per-vote`` for production. A
paired vote picks the candidate with probability ``1/2 + --pair-gain * difference``: an
assumption (the demo's users, who pick the answer they like more, gain more than 1 when answers
vary less than the rates differ), and ties, which send no vote, are not modelled.

Usage: ``python benchmarks/canary_power.py [--control 0.65] [--diffs=-0.1,-0.05,0,0.05,0.1]
[--trials 400] [--seed 0] [--pairs-per-vote 1] [--pair-gain 1] [--at-max 0.5]``. Human lines first, then one
JSON line with every figure.
"""

from __future__ import annotations

import argparse
import json
import random
from typing import Any

from looprl.ops.canary import LOOK_EVERY_VOTES, Arm, Pairs, decide
from looprl.ops.core.config import CanaryConfig, load_config
from looprl.ops.demo import tuning_env
from looprl.ops.sim.profiles import resolve_demo


def canary_configs(production_pairs: float) -> dict[str, tuple[CanaryConfig, float]]:
    """The canary settings a plain deployment and each demo profile run with, through the demo's own
    tuning (``looprl.ops.demo.tuning_env``), so the figures follow the code; with each, the paired
    votes that come per thumbs vote."""
    def demo_canary(feedback: str) -> tuple[CanaryConfig, float]:
        profile = {"LOOPRL_DEMO__FEEDBACK": feedback}
        cfg = load_config(environ={**profile, **tuning_env(load_config(environ=profile))})
        demo = resolve_demo(cfg.demo)
        return cfg.canary, demo.preference_fraction / demo.thumbs_fraction

    return {"production": (load_config(environ={}).canary, production_pairs), "demo": demo_canary("generous"),
            "demo-sparse": demo_canary("sparse")}


def with_at_max(configs: dict[str, tuple[CanaryConfig, float]], at_max: list[float]
                ) -> dict[str, tuple[CanaryConfig, float]]:
    """Each configuration that decides by P(better) at max_samples, also with each of ``at_max`` as
    its ``max_samples_promote_probability`` (named ``config@p``): a baseline in the same run."""
    out = dict(configs)
    for name, (cfg, per_vote) in configs.items():
        if cfg.promote_on_no_regression:
            continue
        for p in at_max:
            if p != cfg.max_samples_promote_probability:
                out[f"{name}@{p:g}"] = (cfg.model_copy(update={"max_samples_promote_probability": p}), per_vote)
    return out


def simulate(cfg: CanaryConfig, candidate_rate: float, control_rate: float, rng: random.Random,
             pairs_per_vote: float = 0.0, pair_gain: float = 1.0) -> tuple[str, int]:
    """One canary to its decision: (action, thumbs votes counted on both arms)."""
    ups, n = [0, 0], [0, 0]  # candidate, control
    wins = paired = 0
    q = min(1.0, max(0.0, 0.5 + pair_gain * (candidate_rate - control_rate)))
    carry = 0.0
    while True:
        for _ in range(LOOK_EVERY_VOTES):
            arm = 0 if rng.random() < cfg.traffic_share else 1
            n[arm] += 1
            ups[arm] += rng.random() < (candidate_rate, control_rate)[arm]
        carry += pairs_per_vote * LOOK_EVERY_VOTES
        while carry >= 1.0:
            carry -= 1.0
            paired += 1
            wins += rng.random() < q
        d = decide(Arm(ups[0], n[0]), Arm(ups[1], n[1]), cfg, Pairs(wins, paired))
        if d.action != "wait":
            return d.action, n[0] + n[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--control", type=float, default=0.65, help="the control's true thumbs-up rate")
    ap.add_argument("--diffs", default="-0.1,-0.05,-0.02,0,0.02,0.05,0.1",
                    help="candidate minus control, true rates, comma-separated")
    ap.add_argument("--trials", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pairs-per-vote", type=float, default=1.0,
                    help="production: paired votes per thumbs vote (the demo profiles' follow their fractions)")
    ap.add_argument("--pair-gain", type=float, default=1.0,
                    help="a paired vote picks the candidate with probability 1/2 + gain * difference")
    ap.add_argument("--at-max", default="0.5",
                    help="also run the configs that decide by P(better) at max_samples with each of these "
                         "max_samples_promote_probability values, comma-separated (empty: none)")
    args = ap.parse_args()
    at_max = [float(x) for x in args.at_max.split(",") if x]
    diffs = [float(x) for x in args.diffs.split(",")]
    if not all(0 <= args.control + d <= 1 for d in diffs):
        raise SystemExit(f"--control {args.control} plus every --diffs value must be a rate in [0, 1]")
    rng = random.Random(args.seed)
    results: dict[str, Any] = {"control_rate": args.control, "trials": args.trials, "pair_gain": args.pair_gain,
                               "configs": {}}
    print(f"control thumbs-up rate {args.control:.2f}; {args.trials} simulated canaries per cell")
    print(f"{'config':22s} {'votes/arm':>9s}  " + "  ".join(f"{d:+.2f}" for d in diffs)
          + "   (promote share by true difference)")
    for base_name, (cfg, pairs_per_vote) in with_at_max(canary_configs(args.pairs_per_vote), at_max).items():
        for name, per_vote in ((base_name, 0.0), (f"{base_name}+pairs", pairs_per_vote)):
            rows = []
            for d in diffs:
                runs = [simulate(cfg, args.control + d, args.control, rng, per_vote, args.pair_gain)
                        for _ in range(args.trials)]
                rows.append({"diff": d, "promote_share": sum(a == "promote" for a, _ in runs) / len(runs),
                             "mean_votes": sum(v for _, v in runs) / len(runs)})
            results["configs"][name] = {"min_samples": cfg.min_samples, "max_samples": cfg.max_samples,
                                        "promote_probability": cfg.promote_probability,
                                        "rollback_probability": cfg.rollback_probability,
                                        "promote_on_no_regression": cfg.promote_on_no_regression,
                                        "max_samples_promote_probability": cfg.max_samples_promote_probability,
                                        "traffic_share": cfg.traffic_share, "pairs_per_vote": per_vote,
                                        "by_diff": rows}
            print(f"{name:22s} {cfg.min_samples:>4d}-{cfg.max_samples:<4d}  "
                  + "  ".join(f"{r['promote_share']:5.2f}" for r in rows)
                  + "   mean votes " + "/".join(f"{r['mean_votes']:.0f}" for r in rows))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
