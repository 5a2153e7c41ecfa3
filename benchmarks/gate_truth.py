"""Re-gate a demo workspace's policy versions against the base and score the samples with the truth.

The promotion gate compares a candidate with the incumbent by the newest reward model's scores on
two suites: hash-held-out prompts of the training forms, and question forms training never samples.
In a demo the simulated users' hidden preference is known, so the same samples can also be scored
by it: this shows where the reward model's verdict and the users' would differ. The script copies
the workspace (registry, base, state, events) to a temporary directory, clears the ``promoted`` and
``canary`` pointers there (so every version is judged against the base), applies the demo's tuning,
runs the gate's own ``evaluate`` with ``--samples`` slots (half per suite) and a recording scorer,
and prints per version and suite: the hidden preference's mean P(thumbs-up) of the candidate's and
the base's answers, and the reward model's mean gain (each ensemble member's, and their mean).

``--suite-file`` replaces the held-out-forms suite (``gate.heldout_suite_file``), e.g. with the
eval users' prompts, to ask how a version does there.

Usage: ``python benchmarks/gate_truth.py WORKSPACE --preference looprl.ops.sim.preference:on_topic
[--versions v1,v4] [--reward v8] [--samples 96] [--suite-file FILE]``. Human lines first, then one
JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from looprl.ops import demo
from looprl.ops.core.config import load_config
from looprl.ops.sim.preference import load_preference, topic_of
from looprl.policy import gate
from looprl.policy.scoring import registry_scorer
from looprl.reward.model import load_reward_model
from looprl.storage.registry import Registry


class RecordingScorer:
    """The reward model, keeping every member's scores of what it was asked."""

    loads_reward_model = True  # for the gate's memory plan

    def __init__(self, cfg, version: str | None):
        self.version = registry_scorer(cfg, version).version  # the newest when None
        self.model = load_reward_model(cfg, version=self.version)
        self.calls: list[tuple[list, list[str], torch.Tensor]] = []

    def score(self, prompts, completions):
        members = self.model.score_members(prompts, completions)
        self.calls.append((prompts, completions, members))
        return members.mean(dim=0)  # what RewardModel.score returns


def by_form(prompts: list[str], p_cand: list[float], p_base: list[float]) -> dict[str, dict]:
    """The hidden preference's means per question form: the prompt with its topic written {topic}."""
    groups: dict[str, list[tuple[float, float]]] = {}
    for prompt, c, b in zip(prompts, p_cand, p_base):
        topic = topic_of(prompt)
        form = re.sub(rf"\b{re.escape(topic)}\b", "{topic}", prompt) if topic else prompt
        groups.setdefault(form, []).append((c, b))
    return {form: {"samples": len(v), "hidden_candidate": round(sum(c for c, _ in v) / len(v), 3),
                   "hidden_base": round(sum(b for _, b in v) / len(v), 3)} for form, v in groups.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("workspace", type=Path)
    ap.add_argument("--preference", required=True, help="the demo's hidden preference, module:function")
    ap.add_argument("--versions", help="comma-separated policy versions (default: every one)")
    ap.add_argument("--reward", help="reward version to judge with (default: the newest)")
    ap.add_argument("--samples", type=int, default=96)
    ap.add_argument("--suite-file", type=Path)
    args = ap.parse_args()
    preference = load_preference(args.preference)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="gate-truth-") as tmp:
        ws = Path(tmp) / "ws"
        shutil.copytree(args.workspace, ws, ignore=shutil.ignore_patterns("ray", "logs", "reports"))
        base_cfg = load_config(environ={}, workspace=ws)
        env = {**demo.tuning_env(base_cfg), "LOOPRL_GATE__HELDOUT_PROMPTS": str(args.samples)}
        if args.suite_file:
            env["LOOPRL_GATE__HELDOUT_SUITE_FILE"] = str(args.suite_file.resolve())
        cfg = load_config(environ=env, workspace=ws)
        for pointer in ("promoted", "canary"):
            (cfg.registry_dir / "policy" / pointer).unlink(missing_ok=True)
        versions = (args.versions.split(",") if args.versions
                    else [m.version for m in Registry(cfg.registry_dir).list("policy")])
        slices = gate.gate_suites(cfg).slices()
        scorer = RecordingScorer(cfg, args.reward)
        results = []
        for version in versions:
            scorer.calls.clear()
            report = gate.evaluate(cfg, version, scorer=scorer)
            if len(scorer.calls) != 2:
                print(f"{version}: not evaluated ({report.reason})")
                continue
            (prompts, cand, m_cand), (_, base, m_base) = scorer.calls
            row = {"version": version, "decision_against_base": report.decision, "reward_version": scorer.version}
            for suite, sl in slices.items():
                p_cand = [preference(p.last_user(), c) for p, c in zip(prompts[sl], cand[sl])]
                p_base = [preference(p.last_user(), c) for p, c in zip(prompts[sl], base[sl])]
                gains = (m_cand[:, sl] - m_base[:, sl]).mean(dim=1)
                row[suite] = {"samples": len(p_cand), "hidden_candidate": round(sum(p_cand) / len(p_cand), 3),
                              "hidden_base": round(sum(p_base) / len(p_base), 3),
                              "reward_gain_members": [round(g, 3) for g in gains.tolist()],
                              "reward_gain": round(gains.mean().item(), 3)}
                r = row[suite]
                print(f"{version} {suite:14s} hidden P {r['hidden_candidate']:.2f} vs base {r['hidden_base']:.2f} "
                      f"| reward gain {r['reward_gain']:+.2f} (members {r['reward_gain_members']}) n={r['samples']}")
                r["by_form"] = by_form([p.last_user() for p in prompts[sl]], p_cand, p_base)
                for form, f in r["by_form"].items():
                    print(f"    {form!r:32s} hidden P {f['hidden_candidate']:.2f} vs base {f['hidden_base']:.2f} "
                          f"n={f['samples']}")
            results.append(row)
    print(json.dumps({"workspace": str(args.workspace), "preference": args.preference, "samples": args.samples,
                      "suite_file": str(args.suite_file) if args.suite_file else None, "versions": results}))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
