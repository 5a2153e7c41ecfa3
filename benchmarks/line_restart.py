"""From a demo workspace's state, does a policy line continue better than a fresh start from the base?

A demo's policy line continues from the newest gated version, so what the first PPO runs learnt
against an early, weak reward model stays in every later version. This script asks, offline and
with the users' hidden preference as the judge, what a later reward model makes of two starts: for
each ``--arms`` entry ``NAME:START`` (START a policy version of the workspace, or ``base``) and each
seed, it copies the workspace, trains ``--depth`` chained PPO runs against reward version
``--reward`` (each continuing from the one before, with the demo's tuning and its feedback profile
``--feedback``), then samples each new version's answers on the gate's two suites (training forms,
held-out forms; ``--samples`` slots) and scores them with ``--preference``.

``--penalty K`` trains against the reward ensemble's mean minus K times its members' spread (an
uncertainty-penalised reward) instead of the mean. ``--reward v6:2,v16:3`` trains in phases, as a
demo does: 2 runs against v6, then 3 against v16; an arm ``NAME:START:policy.target_kl=5+...``
applies its settings to the first phase's runs only (how much an early, weak reward model may move
the line).

Usage: ``python benchmarks/line_restart.py WORKSPACE --reward v16 --arms line:v11,fresh:base
[--depth 3] [--seeds 1,2,3,4] [--penalty 0] [--feedback sparse] [--preference MODULE:FUNCTION]
[--samples 96] [--jobs 2] [--set policy.target_kl=14 ...]``. Human lines first, then one JSON line:
per arm and seed, each run's
hidden P on both suites, its reward at the first and last step and its KL; per arm the mean hidden
P of the last run, and its ratio to the first arm's (measured in the same invocation).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


class PenalisedScorer:
    """The reward ensemble's mean minus ``penalty`` times its members' spread."""

    loads_reward_model = True

    def __init__(self, cfg, version: str, penalty: float):
        from looprl.reward.model import load_reward_model

        self.version, self.penalty = version, penalty
        self.model = load_reward_model(cfg, version=version)

    def score(self, prompts, completions):
        import torch

        with torch.no_grad():
            mean, std = self.model.score_with_uncertainty(prompts, completions)
        return (mean - self.penalty * std).float()


def run_arm(workspace: str, phases: list[tuple[str, int]], start: str, seed: int, penalty: float, feedback: str,
            preference: str, samples: int, overrides: dict[str, str], first: dict[str, str]) -> list[dict]:
    """Train the arm's chained runs, phase by phase (``first`` adds to ``overrides`` in the first
    phase only), and judge every new version with the hidden preference."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gate_truth import RecordingScorer

    from looprl.ops import demo
    from looprl.ops.core.config import load_config
    from looprl.ops.sim.preference import load_preference
    from looprl.policy import gate
    from looprl.policy.trainer import train
    from looprl.storage.registry import Registry

    torch.set_num_threads(1)
    pref = load_preference(preference)
    with tempfile.TemporaryDirectory(prefix="line-restart-") as tmp:
        ws = Path(tmp) / "ws"
        shutil.copytree(workspace, ws, ignore=shutil.ignore_patterns("ray", "logs", "reports"))
        plain = load_config(environ={}, workspace=ws, demo={"feedback": feedback})
        env = {**demo.tuning_env(plain), "LOOPRL_POLICY__SEED": str(seed), "LOOPRL_POLICY__CONTINUE_FROM": "promoted",
               "LOOPRL_GATE__HELDOUT_PROMPTS": str(samples), **overrides}
        cfg = load_config(environ=env, workspace=ws)
        reg, pointers = Registry(cfg.registry_dir), cfg.registry_dir / "policy"
        (pointers / "canary").unlink(missing_ok=True)
        current, made = (None if start == "base" else start), []
        for i, (reward, runs) in enumerate(phases):
            run_cfg = load_config(environ={**env, **first}, workspace=ws) if i == 0 and first else cfg
            trained_on = PenalisedScorer(cfg, reward, penalty)  # loaded once per phase, not per run
            for _ in range(runs):  # each run continues from the one before: point `promoted` at it
                if current is None:
                    (pointers / "promoted").unlink(missing_ok=True)
                else:
                    reg.set_pointer("policy", "promoted", current)
                m = train(run_cfg, resume=False, scorer=trained_on, use_ray=False).manifest
                current = m.version
                made.append(m)
        (pointers / "promoted").unlink(missing_ok=True)  # sample each version as the gate does, vs the base
        slices, scorer, rows = gate.gate_suites(cfg).slices(), RecordingScorer(cfg, phases[-1][0]), []
        for m in made:
            scorer.calls.clear()
            gate.evaluate(cfg, m.version, scorer=scorer)
            (prompts, answers, _), _ = scorer.calls
            row = {"reward_first": round(m.metrics["reward_first"], 3), "reward_last": round(m.metrics["reward_last"], 3),
                   "kl_last": round(m.metrics["kl_last"], 2)}
            for suite, sl in slices.items():
                ps = [pref(p.last_user(), a) for p, a in zip(prompts[sl], answers[sl])]
                row[suite] = round(sum(ps) / len(ps), 3)
                row[f"{suite}_answer_words"] = round(statistics.mean(len(a.split()) for a in answers[sl]), 1)
            rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("workspace", type=Path)
    ap.add_argument("--reward", required=True,
                    help="reward version every run trains against, or phases VERSION:RUNS,... (e.g. v6:2,v16:3)")
    ap.add_argument("--arms", required=True,
                    help="NAME:START[:SECTION.KEY=VALUE+...],... (START: a policy version or 'base'; the settings "
                         "apply to the first phase's runs of that arm only)")
    ap.add_argument("--depth", type=int, default=3, help="chained PPO runs per arm, with a single --reward version")
    ap.add_argument("--seeds", default="1,2,3,4")
    ap.add_argument("--penalty", type=float, default=0.0, help="train on mean - K * spread of the reward ensemble")
    ap.add_argument("--feedback", default="sparse", help="the demo's feedback profile (its tuning applies)")
    ap.add_argument("--preference", default="looprl.ops.sim.preference:default_preference")
    ap.add_argument("--samples", type=int, default=96, help="gate slots per version, half per suite")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="a setting for every arm's runs over the demo tuning, e.g. policy.target_kl=14")
    args = ap.parse_args()

    from looprl.ops.demo import _env_name  # the demo's own SECTION.KEY -> LOOPRL_SECTION__KEY

    def settings(items: list[str], what: str) -> dict[str, str]:
        out = {}
        for item in items:
            key, sep, value = item.partition("=")
            if not sep or key.count(".") != 1:
                ap.error(f"{what} {item!r}: expected SECTION.KEY=VALUE")
            out[_env_name(key)] = value
        return out

    overrides = settings(args.set, "--set")
    phases = []
    for part in args.reward.split(","):
        version, sep, runs = part.partition(":")
        if sep and not runs.isdigit():
            ap.error(f"--reward {part!r}: expected VERSION or VERSION:RUNS")
        phases.append((version, int(runs) if sep else args.depth))
    arms = []
    for a in (a for a in args.arms.split(",") if a):
        name, sep, rest = a.partition(":")
        start, _, first = rest.partition(":")
        if not sep or not start:
            ap.error("--arms: expected NAME:START[:SETTINGS],...")
        arms.append((name, start, settings([f for f in first.split("+") if f], "--arms")))
    seeds = [int(s) for s in args.seeds.split(",") if s]
    jobs = {}
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for name, start, first_phase in arms:
            for seed in seeds:
                jobs[name, seed] = pool.submit(run_arm, str(args.workspace), phases, start, seed, args.penalty,
                                               args.feedback, args.preference, args.samples, overrides, first_phase)
        results = {key: f.result() for key, f in jobs.items()}
    out: dict = {"workspace": str(args.workspace), "phases": phases, "penalty": args.penalty,
                 "set": args.set, "seeds": seeds, "arms": {}}
    baseline = None
    for name, start, first_phase in arms:
        runs = {seed: results[name, seed] for seed in seeds}
        for seed, rows in runs.items():
            print(f"{name} ({start}) seed {seed}: " + " -> ".join(
                f"{r['train_forms']:.2f}/{r['heldout_forms']:.2f} ({r['train_forms_answer_words']}/"
                f"{r['heldout_forms_answer_words']} words, KL {r['kl_last']})" for r in rows))
        last = {s: statistics.mean(rows[-1][s] for rows in runs.values()) for s in ("train_forms", "heldout_forms")}
        baseline = baseline or last
        ratio = {s: round(last[s] / baseline[s], 3) for s in last}
        print(f"{name}: last run's hidden P {last['train_forms']:.3f} training forms, {last['heldout_forms']:.3f} "
              f"held-out forms; x{ratio['train_forms']} / x{ratio['heldout_forms']} of {arms[0][0]}")
        out["arms"][name] = {"start": start, "first_phase": first_phase, "runs": {str(s): r for s, r in runs.items()},
                             "last_hidden_p": {s: round(v, 3) for s, v in last.items()}, f"ratio_to_{arms[0][0]}": ratio}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
