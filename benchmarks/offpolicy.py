"""What learning from labelled served answers (off-policy PPO, ``policy.offpolicy``) adds.

    python benchmarks/offpolicy.py [--steps 40] [--seeds 6] [--served 256] [--noise 2.0] [--quick]

1. Builds the tiny base of ``looprl init`` in a temporary workspace (``--quick``: the tests' smaller
   pre-training budget).
2. Serves answers from the base: ``--served`` completions of training prompts sampled at
   temperature 1 (``policy.rollout.sample``), with their real token ids and raw log-probs (one
   forward pass of the base), each labelled with a thumb drawn from the hidden preference
   (``ops.sim.preference.default_preference``: cheerful words), and writes them as ResponseEvents
   and ThumbsEvents into the workspace's Parquet event log, as ingest would.
3. Runs PPO for ``--steps`` steps with the same seeds, ``policy.offpolicy`` on and off, against a
   weak scorer: the cheerful-word count (``ops.sim.scoring.CheerfulScorer``) plus Gaussian noise
   of std ``--noise``, so the users' labels have something to add. A control arm ("blind") adds
   the same served answers with ``policy.offpolicy_label_reward`` 0, i.e. without their labels:
   what the bigger batch alone does.
4. Judges each trained policy (and the base) by the hidden preference's mean P(thumbs-up) on
   held-out prompts (the held-out templates, never trained on), ``--eval`` samples each.

Human lines first, then one JSON object line: the figures per seed and their means, the lift of
each arm over the base and the ratio of the lifts (on / off).
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
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class NoisyCheerful:
    """The cheerful-word count plus Gaussian noise: a reward model that has learnt the users only
    roughly. Its noise comes from its own generator, seeded, so a run is repeatable."""

    def __init__(self, noise: float, seed: int):
        import torch

        from looprl.ops.sim.scoring import CheerfulScorer

        self.exact, self.noise = CheerfulScorer(), noise
        self.gen = torch.Generator().manual_seed(seed)
        self.version = f"programmatic:cheerful+noise{noise}"

    def score(self, prompts, completions):
        import torch

        s = self.exact.score(prompts, completions)
        return s + self.noise * torch.randn(s.shape, generator=self.gen)


def build_base(work: Path, quick: bool) -> Path:
    from looprl.ops.core.config import load_config
    from looprl.ops.sim.base import create_base

    model = {"pretrain_steps": 250} if quick else {}
    cfg = load_config(environ={}, workspace=work / "ws-base", model=model)
    return Path(create_base(cfg, out_dir=work / "base", progress=False, **({"n_docs": 2500} if quick else {})))


def serve_from_base(cfg, n: int, seed: int) -> dict:
    """Sample ``n`` answers from the base at temperature 1, label them with the hidden
    preference, and log them (responses with token ids and raw log-probs, and thumbs)."""
    import random

    import torch

    from looprl.ingest.schema import ResponseEvent, Sampling, ThumbsEvent
    from looprl.ops.sim.feedback import SimulatedLog
    from looprl.ops.sim.preference import default_preference
    from looprl.policy.forward import policy_forward
    from looprl.policy.model import load_base, shipped_prompts, stop_token_ids
    from looprl.policy.prompts import generator, is_heldout
    from looprl.policy.rollout import sample

    model, tok = load_base(cfg.base_path)
    stops = stop_token_ids(tok, model)
    prompts = [p for p in shipped_prompts() if not is_heldout(p)]
    rng = random.Random(seed)
    events, ups = [], 0
    t = datetime(2026, 1, 1, tzinfo=timezone.utc)
    for start in range(0, n, 32):
        batch = [rng.choice(prompts) for _ in range(min(32, n - start))]
        ro = sample(model, tok, batch, cfg.policy.max_new_tokens, 1.0, generator(seed, start, "serve"),
                    cfg.policy.max_prompt_tokens, stops)
        with torch.no_grad():  # the raw log-probs (temperature 1) of the sampled tokens, as vLLM reports them
            lp = policy_forward(model, ro.input_ids, ro.attention_mask, cfg.kernels, 1.0).logprobs
        lp = lp[:, ro.response_labels_slice()]
        for i, (prompt, completion) in enumerate(zip(batch, ro.completions)):
            m = int(ro.response_mask[i].sum())
            ids = ro.input_ids[i, ro.prompt_len:ro.prompt_len + m].tolist()
            t += timedelta(seconds=1)
            rid, user = f"bench-{uuid.UUID(int=rng.getrandbits(128))}", f"user-{rng.randrange(16)}"
            events.append(ResponseEvent(
                ts=t, user_id=user, response_id=rid, prompt=prompt, completion=completion, model="base",
                adapter_version="base", sampling=Sampling(temperature=1.0, max_tokens=cfg.policy.max_new_tokens),
                completion_token_ids=ids, completion_logprobs=[min(0.0, float(x)) for x in lp[i, :m]]))
            up = rng.random() < default_preference(prompt, completion)
            ups += up
            events.append(ThumbsEvent(ts=t + timedelta(seconds=2), user_id=user, response_id=rid, up=up))
    SimulatedLog(cfg.events_dir).append(events)
    return {"served": n, "thumbs_up_rate": ups / max(n, 1)}


def thumbs_up_rate(model, tok, cfg, prompts: list[str], seed: int, preference=None) -> float:
    """Mean hidden-preference P(thumbs-up) of the policy's answers to ``prompts`` (temperature 1);
    the default user's (cheerful words) unless ``preference`` is given."""
    from looprl.ops.sim.preference import default_preference
    from looprl.policy.model import stop_token_ids
    from looprl.policy.prompts import generator
    from looprl.policy.rollout import sample

    stops = stop_token_ids(tok, model)
    total = 0.0
    for start in range(0, len(prompts), 32):
        batch = prompts[start:start + 32]
        ro = sample(model, tok, batch, cfg.policy.max_new_tokens, 1.0, generator(seed, start, "eval"),
                    cfg.policy.max_prompt_tokens, stops)
        total += sum((preference or default_preference)(p, c) for p, c in zip(batch, ro.completions))
    return total / len(prompts)


ARMS = {"off": dict(offpolicy=False), "on": dict(offpolicy=True), "blind": dict(offpolicy=True, offpolicy_label_reward=0.0)}


def run_arm(base: Path, work: Path, events_dir: Path, arm: str, seed: int, args, eval_prompts) -> dict:
    """One PPO run of an arm (``ARMS``) against the noisy scorer; returns the held-out figures."""
    from looprl.ops.core.config import load_config
    from looprl.policy.trainer import train

    ws = work / f"ws-{arm}-s{seed}"
    ws.mkdir(parents=True)
    (ws / "events").symlink_to(events_dir, target_is_directory=True)  # the same served log for both arms
    cfg = load_config(environ={}, workspace=ws, model={"base_path": str(base)}, policy=dict(
        steps=args.steps, checkpoint_every=max(args.steps, 1), recent_prompts=0, seed=seed,
        offpolicy_pool=args.served, offpolicy_samples=args.samples, torch_threads=1, **ARMS[arm]))
    out: dict = {}
    t0 = time.perf_counter()

    def on_step(step, stats, backend):
        if step == cfg.policy.steps - 1:
            lm = backend.learner
            out["thumbs_up"] = thumbs_up_rate(lm.model, lm.tok, cfg, eval_prompts, seed=1000 + seed)
            out["kl_last"] = stats["kl"]
        out.setdefault("served_used", 0)
        out["served_used"] += stats.get("offpolicy_samples", 0)
        if "offpolicy_is_weight_mean" in stats:
            out.setdefault("is_w", []).append(stats["offpolicy_is_weight_mean"])
            out.setdefault("trunc", []).append(stats["offpolicy_truncated_fraction"])

    train(cfg, scorer=NoisyCheerful(args.noise, seed), use_ray=False, resume=False, publish=False, on_step=on_step)
    res = {"thumbs_up": out["thumbs_up"], "kl_last": out["kl_last"], "served_used": out["served_used"],
           "seconds": time.perf_counter() - t0}
    if out.get("is_w"):
        res["is_weight_mean"] = statistics.fmean(out["is_w"])
        res["truncated_fraction"] = statistics.fmean(out["trunc"])
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seeds", type=int, default=6, help="PPO seeds (each runs on and off)")
    ap.add_argument("--served", type=int, default=256, help="labelled served answers in the log")
    ap.add_argument("--samples", type=int, default=8, help="policy.offpolicy_samples per step")
    ap.add_argument("--noise", type=float, default=2.0, help="std of the scorer's noise (cheerful words)")
    ap.add_argument("--eval", type=int, default=128, help="held-out answers judged per policy")
    ap.add_argument("--quick", action="store_true", help="smaller base, 20 steps, 1 seed, 64 judged answers")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON figures here")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.seeds, args.eval = min(args.steps, 20), 1, min(args.eval, 64)

    import torch

    from looprl.ops.core.config import load_config
    from looprl.ops.core.log import setup_logging
    from looprl.ops.sim.corpus import prompt_set
    from looprl.policy.model import load_base

    setup_logging("WARNING")
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="looprl-bench-offpolicy-"))
    t_all = time.perf_counter()
    try:
        base = build_base(work, args.quick)
        serve_cfg = load_config(environ={}, workspace=work / "ws-serve", model={"base_path": str(base)})
        served = serve_from_base(serve_cfg, args.served, seed=7)
        heldout = prompt_set("heldout")
        eval_prompts = [heldout[i % len(heldout)] for i in range(args.eval)]
        model, tok = load_base(base)
        base_rate = statistics.fmean(thumbs_up_rate(model, tok, serve_cfg, eval_prompts, seed=1000 + s)
                                     for s in range(args.seeds))
        del model
        print(f"base: {base.name} ({'quick' if args.quick else 'looprl init'}); served answers: {served['served']} "
              f"(thumbs-up {served['thumbs_up_rate']:.2f}); scorer: cheerful words + N(0, {args.noise}^2); "
              f"steps={args.steps} seeds={args.seeds} offpolicy_samples={args.samples}")
        print(f"base held-out P(thumbs-up): {base_rate:.3f} (n={args.eval} per seed)")
        runs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
        for seed in range(args.seeds):
            for arm in ARMS:
                r = run_arm(base, work, serve_cfg.events_dir, arm, seed, args, eval_prompts)
                runs[arm].append(r)
                extra = (f", IS weight {r['is_weight_mean']:.3f}, truncated {r['truncated_fraction']:.3f}"
                         if "is_weight_mean" in r else "")
                print(f"seed {seed} {arm:5s}: held-out P(thumbs-up) {r['thumbs_up']:.3f}, "
                      f"KL {r['kl_last']:.2f}, served used {r['served_used']}{extra} ({r['seconds']:.0f} s)")
        mean = {arm: statistics.fmean(r["thumbs_up"] for r in rs) for arm, rs in runs.items()}
        lift = {arm: mean[arm] - base_rate for arm in mean}
        ratio = mean["on"] / mean["off"] if mean["off"] > 0 else None
        lift_ratio = lift["on"] / lift["off"] if lift["off"] > 1e-9 else None
        # PPO runs differ a lot from seed to seed: how often the same seed did better with served answers
        wins = sum(a["thumbs_up"] > b["thumbs_up"] for a, b in zip(runs["on"], runs["off"]))
        print(f"mean held-out P(thumbs-up): base {base_rate:.3f}, off {mean['off']:.3f} ({lift['off']:+.3f}), "
              f"on {mean['on']:.3f} ({lift['on']:+.3f}); on/off {ratio:.3f}"
              + (f", lift on/off {lift_ratio:.2f}" if lift_ratio is not None else "") + f"; on better in {wins}/{args.seeds} seeds")
        print(f"control: served answers without their labels (blind) {mean['blind']:.3f} ({lift['blind']:+.3f})")
        result = {
            "benchmark": "offpolicy", "quick": args.quick, "steps": args.steps, "seeds": args.seeds,
            "served": served, "offpolicy_samples": args.samples, "scorer_noise": args.noise,
            "eval_answers": args.eval, "base_thumbs_up": base_rate,
            "off_thumbs_up": mean["off"], "on_thumbs_up": mean["on"], "blind_thumbs_up": mean["blind"],
            "off_lift": lift["off"], "on_lift": lift["on"], "blind_lift": lift["blind"], "ratio_on_off": ratio, "lift_ratio_on_off": lift_ratio,
            "seeds_on_better": wins,
            "runs": runs, "seconds": time.perf_counter() - t_all,
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
        }
        line = json.dumps(result)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(line)
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
