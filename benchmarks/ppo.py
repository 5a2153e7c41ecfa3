"""PPO iteration throughput on CPU: tokens/s of a full step and where the time goes.

    python benchmarks/ppo.py [--steps 6] [--batch 16] [--new-tokens 16] [--threads 1] [--ray]

For each cfg.kernels setting (moe_lora peft|torch x logprob naive|chunked) it runs warm-up +
`--steps` PPO iterations in-process (LocalBackend: rollout, scoring, learning back to back, as
one Ray worker + learner would, minus Ray's transport) and reports completion tokens/s and the
share of time in rollout (sampling), scoring (reward) and learning (old/ref/value passes + PPO
epochs). The base is `looprl.ops.sim.base.create_base` at the cfg.model defaults (the pre-trained
tiny MoE of `looprl init`). The reward is an untrained reward model of the configured shape
(scoring costs the same as with a trained one).

The last line is a JSON object; speed figures are ratios to the peft+naive baseline of this run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_base(cfg, out: Path) -> tuple[Path, str]:
    from looprl.ops.sim.base import create_base

    return Path(create_base(cfg, out_dir=out, progress=False)), "looprl.ops.sim.base.create_base"


class _FreshRewardModel:
    """An untrained reward model of the configured shape: scoring costs what a trained one costs."""

    version = "bench:fresh"

    def __init__(self, cfg):
        from looprl.reward.model import RewardModel

        self.rm = RewardModel.fresh(cfg)

    def score(self, prompts, completions):
        return self.rm.score(prompts, completions)


def make_scorer(cfg):
    return _FreshRewardModel(cfg), "reward model (base + LoRA + head, untrained)"


def bench(cfgs: dict, scorer, steps: int) -> dict:
    """Round-robin over the settings (one step each per round) so machine-load drift hits all alike."""
    from looprl.policy.prompts import PromptSampler, configured_prompts
    from looprl.policy.trainer import LocalBackend, _one_step

    runs = {}
    for name, cfg in cfgs.items():
        backend = LocalBackend(cfg, scorer)
        sampler = PromptSampler(configured_prompts(cfg), cfg.policy.seed)
        _one_step(backend, sampler, cfg, 0)  # warm-up: first-call allocations, lazy imports
        runs[name] = (backend, sampler, cfg, [])
    for s in range(1, steps + 1):
        for name, (backend, sampler, cfg, rows) in runs.items():
            rows.append(_one_step(backend, sampler, cfg, s))
    out = {}
    for name, (_, _, _, rows) in runs.items():
        total = sum(r["step_s"] for r in rows)
        gen, score, learn = (sum(r[k] for r in rows) for k in ("rollout_s", "score_s", "learn_wall_s"))
        out[name] = {
            # median of per-step rates: robust to a step that shared its cores with someone else
            "tokens_per_s": statistics.median(r["tokens"] / r["step_s"] for r in rows),
            "step_s": statistics.median(r["step_s"] for r in rows),
            "share": {"rollout": gen / total, "score": score / total, "learn": learn / total},
            "tokens_per_step": sum(r["tokens"] for r in rows) / len(rows),
        }
    return out


def bench_ray(cfg, scorer, steps: int) -> dict:
    """The same steps through Ray actors (1 rollout worker + learner): the cost of the transport."""
    from looprl.policy.prompts import PromptSampler, configured_prompts
    from looprl.policy.ray_backend import RayBackend
    from looprl.policy.trainer import _one_step

    from looprl.policy.ray_backend import ray_temp_dir

    t0 = time.perf_counter()
    temp = ray_temp_dir(cfg)
    backend = RayBackend(cfg, scorer)
    start_s = time.perf_counter() - t0
    try:
        sampler = PromptSampler(configured_prompts(cfg), cfg.policy.seed)
        _one_step(backend, sampler, cfg, 0)
        rows = [_one_step(backend, sampler, cfg, s) for s in range(1, steps + 1)]
    finally:
        backend.close()
        if backend.started:
            shutil.rmtree(temp, ignore_errors=True)  # the short /tmp fallback outlives the workspace
    return {"tokens_per_s": statistics.median(r["tokens"] / r["step_s"] for r in rows),
            "step_s": statistics.median(r["step_s"] for r in rows), "start_s": start_s}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=None, help="rollout batch (default policy.rollout_batch_size)")
    ap.add_argument("--new-tokens", type=int, default=None, help="default policy.max_new_tokens")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ray", action="store_true", help="also time peft+naive through local Ray actors")
    args = ap.parse_args()

    import torch

    from looprl.ops.core.config import load_config
    from looprl.ops.core.log import setup_logging

    setup_logging("WARNING")
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="looprl-bench-ppo-"))
    try:
        cfg0 = load_config(environ={}, workspace=work)
        base, how = build_base(cfg0, work / "base")
        policy = {"recent_prompts": 0, "torch_threads": args.threads}
        if args.batch:
            policy["rollout_batch_size"] = args.batch
        if args.new_tokens:
            policy["max_new_tokens"] = args.new_tokens
        p = cfg0.policy.model_copy(update=policy)
        print(f"base: {how}; hidden={cfg0.model.hidden_size} layers={cfg0.model.num_layers} "
              f"experts={cfg0.model.num_experts}; batch={p.rollout_batch_size} new_tokens={p.max_new_tokens} "
              f"ppo_epochs={p.ppo_epochs} minibatch={p.minibatch_size}; threads={args.threads}; steps={args.steps}")
        cfgs = {}
        for moe in ("peft", "torch"):
            for lp in ("naive", "chunked"):
                cfgs[f"{moe}+{lp}"] = load_config(
                    environ={}, workspace=work / f"ws-{moe}-{lp}", model={"base_path": str(base)}, policy=policy,
                    kernels={"moe_lora": moe, "logprob": lp, "logprob_chunk_size": 128})
        scorer, scorer_desc = make_scorer(cfgs["peft+naive"])
        print(f"scorer: {scorer_desc}")
        t0 = time.perf_counter()
        results = bench(cfgs, scorer, args.steps)
        for name, r in results.items():
            s = r["share"]
            moe, lp = name.split("+")
            print(f"moe_lora={moe:5s} logprob={lp:7s}: {r['tokens_per_s']:8.1f} tokens/s, "
                  f"step {r['step_s']:.3f}s (rollout {s['rollout']:.0%}, score {s['score']:.0%}, "
                  f"learn {s['learn']:.0%})")
        print(f"[{time.perf_counter() - t0:.1f}s]")
        ray_figures = {}
        if args.ray:
            r = bench_ray(cfgs["peft+naive"], scorer, args.steps)
            print(f"ray (1 rollout worker + learner actors), peft+naive: {r['tokens_per_s']:8.1f} tokens/s, "
                  f"step {r['step_s']:.3f}s; ray start + actors {r['start_s']:.1f}s")
            ray_figures = {"ray_vs_in_process": round(r["tokens_per_s"] / results["peft+naive"]["tokens_per_s"], 3),
                           "ray_start_s": round(r["start_s"], 1)}
        baseline = results["peft+naive"]["tokens_per_s"]
        out = {
            "benchmark": "ppo_iteration_cpu",
            "baseline": "peft+naive",
            "baseline_tokens_per_s": round(baseline, 1),
            "speedup_vs_baseline": {k: round(v["tokens_per_s"] / baseline, 3) for k, v in results.items()},
            "time_share_baseline": {k: round(v, 3) for k, v in results["peft+naive"]["share"].items()},
            "tokens_per_step": results["peft+naive"]["tokens_per_step"],
            "scorer": scorer.version,
            **ray_figures,
        }
        print(json.dumps(out))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
