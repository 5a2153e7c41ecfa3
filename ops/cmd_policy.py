"""`looprl policy ...`: the policy stage.

    looprl policy train [--steps N] [--run-id ID | --new] [--scorer registry|cheerful] [--no-ray] [--gate]
    looprl policy gate VERSION [--scorer registry|cheerful] [--reward-version vN]
"""

from __future__ import annotations

import argparse
import json
import sys

from looprl.ops.commands import pushes_metrics
from looprl.ops.core.config import LooprlConfig
from looprl.ops.core.metrics import serve_metrics


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("policy", help="LoRA-PPO on Ray and the offline promotion gate")
    acts = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    t = acts.add_parser("train", help="LoRA-PPO on the MoE policy against the newest reward model, publish a candidate")
    t.add_argument("--steps", type=int, metavar="N", help="PPO steps for a new run (default policy.steps)")
    t.add_argument("--run-id", help="resume this run (or start it under this id)")
    t.add_argument("--new", action="store_true", help="start a new run even if an unfinished one exists")
    t.add_argument("--scorer", choices=["registry", "cheerful"], default="registry",
                   help="reward: newest registry reward model (default) or the programmatic cheerful-word count")
    t.add_argument("--reward-version", metavar="VERSION", help="train against this reward version instead of the newest")
    t.add_argument("--no-ray", action="store_true", help="run in this process instead of on Ray (debugging)")
    t.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="serve /metrics here (default policy.metrics_port; 0 = a free port, logged at start)")
    t.add_argument("--gate", action="store_true", help="run the offline gate on the candidate when done")
    t.set_defaults(func=_train)

    g = acts.add_parser("gate", help="offline promotion gate for a candidate policy adapter")
    g.add_argument("version", help="policy version, e.g. v3")
    g.add_argument("--scorer", choices=["registry", "cheerful"], default="registry",
                   help="judge: newest registry reward model (default) or the programmatic cheerful-word count")
    g.add_argument("--reward-version", metavar="VERSION", help="judge with this reward version instead of the newest")
    g.set_defaults(func=_gate)


def _scorer(args: argparse.Namespace, cfg: LooprlConfig):
    """--scorer registry: the newest (or --reward-version) reward model; cheerful: the programmatic one."""
    from looprl.ops.sim.scoring import CheerfulScorer
    from looprl.policy.scoring import registry_scorer

    if args.scorer == "cheerful":
        return CheerfulScorer()
    return registry_scorer(cfg, args.reward_version)


@pushes_metrics("looprl-policy-train")
def _train(args: argparse.Namespace, cfg: LooprlConfig) -> int:
    import torch

    from looprl.policy.checkpoint import CheckpointError
    from looprl.policy.gate import run_gate
    from looprl.policy.ray_backend import PolicyJobError
    from looprl.policy.trainer import train
    from looprl.storage.registry import RegistryError

    torch.set_num_threads(cfg.policy.torch_threads)

    port = cfg.policy.metrics_port if args.metrics_port is None else args.metrics_port
    # The scheduler starts a policy job as soon as the one before ends, whose server held this port.
    serve_metrics(port, host=cfg.metrics_host, key="policy.metrics_port (or --metrics-port)", wait_s=10.0)
    try:
        # None: a new run pins the newest reward model, a resumed run re-loads the version it started with
        scorer = None if args.scorer == "registry" and not args.reward_version else _scorer(args, cfg)
        result = train(cfg, run_id=args.run_id, resume=not args.new, steps=args.steps, scorer=scorer,
                       use_ray=not args.no_ray, progress=True)
    except (RegistryError, CheckpointError, PolicyJobError, FileNotFoundError, ValueError) as e:
        print(f"looprl policy train: {e}", file=sys.stderr)
        return 2 if not isinstance(e, PolicyJobError) else 1
    m = result.manifest
    out = {"run_id": result.run_id, "version": m.version if m else None,
           "reward_first": m.metrics.get("reward_first") if m else None,
           "reward_last": m.metrics.get("reward_last") if m else None,
           "kl_last": m.metrics.get("kl_last") if m else None}
    if args.gate and m is not None:
        report = run_gate(cfg, m.version, scorer if args.scorer != "registry" else None)
        out.update(decision=report.decision, reason=report.reason)
    print(json.dumps(out))
    return 0


@pushes_metrics("looprl-policy-gate")
def _gate(args: argparse.Namespace, cfg: LooprlConfig) -> int:
    import torch

    from looprl.policy.gate import GateError, run_gate
    from looprl.storage.registry import RegistryError

    torch.set_num_threads(cfg.policy.torch_threads)

    try:
        report = run_gate(cfg, args.version, _scorer(args, cfg))
    except (GateError, RegistryError) as e:
        print(f"looprl policy gate: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"version": report.version, "decision": report.decision, "reason": report.reason,
                      "numbers": report.numbers}, default=str))
    return 0 if report.passed else 1
