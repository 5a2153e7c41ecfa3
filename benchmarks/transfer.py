"""How much of PPO's gain on the training question forms carries over to forms it never trains on,
with a perfect reward model: what the policy side can do when the reward is right.

    python benchmarks/transfer.py [--base DIR] [--preference MODULE:FUNCTION] [--steps 120]
        [--seeds 3] [--eval 240] [--set policy.KEY=VALUE ...] [--out FILE]

1. The base: ``--base`` (e.g. a demo workspace's ``ws/base``), else the ``looprl init`` base, built
   in a temporary directory.
2. PPO from the base with the demo's policy settings (``ops.demo.DEMO_TUNING``, then each ``--set``;
   a value is read as JSON where it parses, so ``--set policy.target_modules='["q_proj"]'``), ``--steps`` steps
   on the shipped training prompts, the reward being the hidden preference's log-odds
   (``ops.sim.scoring.PreferenceScorer``; default ``on_topic``, a preference that depends on the
   question), for each of ``--seeds`` seeds.
3. After a third, two thirds and all of the steps, judges the policy by the hidden preference's
   mean P(thumbs-up) (``--eval`` answers per suite, temperature 1) on two suites: the training
   forms' prompts held out by hash (PPO never samples them) and the 120 prompts of the held-out
   forms (``corpus.prompt_set("heldout")``, the forms the gate's held-out suite and the demo's eval
   users ask). The base is judged the same way.

Prints each suite's lift over the base and the transfer ratio (held-out-forms lift / training-forms
lift), and how often the rollout KL (trailing 5-step mean) sat at or over the demo's gate cap
``gate.max_kl``: a candidate saved there would be rejected. Last line one JSON object. A demo's
own versions, judged by ``benchmarks/gate_truth.py`` with ``--suite-file`` holding the held-out
forms, show how much of this its learned reward model let through.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from offpolicy import build_base, thumbs_up_rate  # noqa: E402  (benchmarks/ is the script's directory)


def policy_overrides(items: list[str]) -> dict:
    """``policy.KEY=VALUE`` items as a dict of policy settings; VALUE is JSON where it parses."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.startswith("policy.") or key == "policy.":
            raise SystemExit(f"--set {item!r}: expected policy.KEY=VALUE")
        try:
            out[key.removeprefix("policy.")] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.removeprefix("policy.")] = raw
    return out


KL_WINDOW = 5  # steps: a window's mean is what a candidate saved there would show the gate, give or take


def kl_over(kl: list[float], cap: float) -> float:
    """The share of steps whose trailing KL_WINDOW-step mean rollout KL is at or over ``cap``: how
    often a candidate saved at that step would fail the gate's KL check, with the adaptive
    controller's overshoot in it."""
    means = [statistics.fmean(kl[max(0, i - KL_WINDOW + 1):i + 1]) for i in range(len(kl))]
    return sum(m >= cap for m in means) / len(means) if means else 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, help="a base model directory (default: build the looprl init base)")
    ap.add_argument("--preference", default="looprl.ops.sim.preference:on_topic")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--eval", type=int, default=240, help="answers judged per suite and policy")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="policy.KEY=VALUE",
                    help="a policy setting on top of the demo's (repeatable)")
    ap.add_argument("--out", type=Path, help="also write the JSON figures here")
    args = ap.parse_args()

    import torch

    from looprl.ops.core.config import load_config
    from looprl.ops.core.log import setup_logging
    from looprl.ops.demo import DEMO_TUNING
    from looprl.ops.sim.corpus import prompt_set
    from looprl.ops.sim.preference import load_preference
    from looprl.ops.sim.scoring import PreferenceScorer
    from looprl.policy.model import load_base
    from looprl.policy.prompts import is_heldout
    from looprl.policy.trainer import train

    setup_logging("WARNING")
    torch.set_num_threads(args.threads)
    preference = load_preference(args.preference)
    train_forms = [p for p in prompt_set("train") if is_heldout(p)]
    heldout_forms = prompt_set("heldout")
    suites = {"train_forms": [train_forms[i % len(train_forms)] for i in range(args.eval)],
              "heldout_forms": [heldout_forms[i % len(heldout_forms)] for i in range(args.eval)]}
    demo_policy = {k.split(".", 1)[1]: v for k, v in DEMO_TUNING.items() if k.startswith("policy.")}
    demo_policy.update(policy_overrides(args.overrides))
    if demo_policy.get("stop_kl") is not None:  # it measures the KL controller's overshoot
        raise SystemExit("--set policy.stop_kl: a stopped run would not reach the marks")
    marks = sorted({max(args.steps * k // 3, 1) for k in (1, 2, 3)})
    max_kl = DEMO_TUNING["gate.max_kl"]

    work = Path(tempfile.mkdtemp(prefix="looprl-bench-transfer-"))
    t_all = time.perf_counter()
    try:
        base = args.base or build_base(work, quick=False)
        cfg0 = load_config(environ={}, workspace=work / "ws-judge", model={"base_path": str(base)},
                           policy=demo_policy)

        def judge(model, tok, seed: int) -> dict[str, float]:
            with torch.no_grad():
                return {name: thumbs_up_rate(model, tok, cfg0, prompts, seed=seed, preference=preference)
                        for name, prompts in suites.items()}

        model, tok = load_base(base)
        base_p = judge(model, tok, seed=1000)
        del model
        print(f"base {base}: P(thumbs-up) training forms {base_p['train_forms']:.3f} (hash-held-out, "
              f"{len(train_forms)} prompts), held-out forms {base_p['heldout_forms']:.3f} ({len(heldout_forms)} "
              f"prompts); {args.eval} answers each; preference {args.preference}")
        runs = []
        for seed in range(args.seeds):
            cfg = load_config(environ={}, workspace=work / f"ws-{seed}", model={"base_path": str(base)}, policy={
                **demo_policy, "steps": args.steps, "checkpoint_every": args.steps, "recent_prompts": 0,
                "seed": seed, "torch_threads": args.threads})
            run: dict = {"seed": seed, "marks": {}, "kl": []}
            t0 = time.perf_counter()

            def on_step(step: int, stats: dict, backend, run=run, t0=t0) -> None:
                run["kl"].append(round(float(stats["kl"]), 3))
                if step + 1 not in marks:
                    return
                p = judge(backend.learner.model, backend.learner.tok, seed=2000 + step)
                lift = {k: p[k] - base_p[k] for k in p}
                m = {**{f"p_{k}": v for k, v in p.items()}, **{f"lift_{k}": v for k, v in lift.items()},
                     "transfer": lift["heldout_forms"] / lift["train_forms"] if lift["train_forms"] > 0.02 else None,
                     "kl": stats["kl"]}
                run["marks"][step + 1] = m
                ratio = f"{m['transfer']:.2f}" if m["transfer"] is not None else "-"
                print(f"seed {seed} step {step + 1:4d}: training forms {p['train_forms']:.3f} "
                      f"({lift['train_forms']:+.3f}), held-out forms {p['heldout_forms']:.3f} "
                      f"({lift['heldout_forms']:+.3f}), transfer {ratio}, KL {stats['kl']:.2f} "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)

            train(cfg, scorer=PreferenceScorer(preference, args.preference), use_ray=False, resume=False,
                  publish=False, on_step=on_step)
            run["kl_over_gate_share"] = kl_over(run["kl"], max_kl)
            runs.append(run)
        final = [r["marks"][marks[-1]] for r in runs]
        mean = {k: statistics.fmean(m[k] for m in final) for k in ("lift_train_forms", "lift_heldout_forms")}
        transfer = mean["lift_heldout_forms"] / mean["lift_train_forms"] if mean["lift_train_forms"] > 0.02 else None
        over = statistics.fmean(r["kl_over_gate_share"] for r in runs)
        print(f"share of steps whose {KL_WINDOW}-step mean rollout KL is at or over gate.max_kl={max_kl}: {over:.3f}")
        print(f"after {args.steps} steps, mean of {args.seeds} seeds: lift on training forms "
              f"{mean['lift_train_forms']:+.3f}, on held-out forms {mean['lift_heldout_forms']:+.3f}, transfer "
              + (f"{transfer:.2f}" if transfer is not None else "-"))
        result = {
            "benchmark": "transfer", "preference": args.preference, "base": str(args.base or "looprl init"),
            "steps": args.steps, "seeds": args.seeds, "eval_answers": args.eval, "policy": demo_policy,
            "base_p": base_p, "mean_final": mean, "transfer": transfer,
            "max_kl": max_kl, "kl_window": KL_WINDOW, "kl_over_gate_share": over, "runs": runs,
            "seconds": time.perf_counter() - t_all,
            "machine": {"cpus": os.cpu_count(), "threads": args.threads, "python": platform.python_version(),
                        "torch": torch.__version__},
        }
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result))
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
