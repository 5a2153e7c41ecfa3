"""Benchmark of the incremental reward updater on CPU.

Streams simulated feedback (hidden preference: ``looprl.ops.sim.preference.default_preference``)
through ``RewardUpdater`` in slices, then trains an *offline* reward model on all the same data at
once (same number of epochs, same optimiser settings) and compares:

- throughput: examples trained per second (new + replay) incremental vs offline;
- quality: pair accuracy on fresh held-out pairs (prompt templates never seen in training) of the
  final incremental model vs the offline model, and the incremental stream's prequential pair
  accuracy (test-then-train, second half of the stream) vs the offline model's held-out accuracy.

Usage: ``python benchmarks/reward.py [--updates 8] [--events 100] [--base DIR] [--preference
module:function] [--off-topic-rate R] [--features last|last_match|echo] [--learning-rate LR]
[--replay-ratio R] [--epochs N] [--mix JSON] [--cheerful-rate R] [--eval-every N]``. Without
--base a base is built first (default model config). ``--preference
looprl.ops.sim.preference:on_topic --off-topic-rate 0.3`` measures a preference that depends on
the question (answers drift off the asked topic as the sampled base's do). Human lines first,
then one JSON line of figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--updates", type=int, default=8)
    ap.add_argument("--events", type=int, default=100, help="feedback events per update")
    ap.add_argument("--heldout-pairs", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--base", type=Path, default=None, help="existing base dir (default: build one)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preference", default="looprl.ops.sim.preference:default_preference",
                    help="hidden preference, module:function")
    ap.add_argument("--off-topic-rate", type=float, default=0.0,
                    help="share of simulated answers that drift to another topic (ops/sim/corpus.drifting_answer)")
    ap.add_argument("--features", default=None, help="reward.features (default: the config's)")
    ap.add_argument("--learning-rate", type=float, default=None, help="reward.learning_rate (default: the config's)")
    ap.add_argument("--replay-ratio", type=float, default=None, help="reward.replay_ratio (default: the config's)")
    ap.add_argument("--epochs", type=int, default=None, help="reward.epochs_per_update (default: the config's)")
    ap.add_argument("--mix", default=None,
                    help='label kinds as JSON, e.g. \'{"thumbs": 0.65, "preference": 0.28, "correction": 0.07}\' '
                         "(default: ops/sim/feedback.DEFAULT_MIX)")
    ap.add_argument("--cheerful-rate", type=float, default=0.25,
                    help="share of cheerful sentences in simulated answers (lower: fewer informative labels)")
    ap.add_argument("--eval-every", type=int, default=0,
                    help="also score the held-out pairs after every N-th update (0: only at the end)")
    args = ap.parse_args(argv)
    if args.mix is not None:
        try:
            mix = json.loads(args.mix)
        except json.JSONDecodeError as e:
            ap.error(f"--mix: not JSON ({e})")
        from looprl.ops.sim.feedback import DEFAULT_MIX  # the label kinds the simulator draws

        if (not isinstance(mix, dict) or not mix or set(mix) - set(DEFAULT_MIX)
                or not all(isinstance(w, (int, float)) and w >= 0 for w in mix.values()) or not sum(mix.values())):
            ap.error(f"--mix: expected an object of non-negative weights over {sorted(DEFAULT_MIX)}, got {args.mix}")
        args.mix = mix  # parsed once, here

    tmp = Path(tempfile.mkdtemp(prefix="looprl-bench-reward-"))
    try:
        return _run(args, tmp)
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def _run(args: argparse.Namespace, tmp: Path) -> int:
    import torch

    from looprl.ops.core.config import load_config
    from looprl.ops.sim.base import create_base
    from looprl.ops.sim.feedback import SimulatedLog, heldout_pairs, simulate_feedback
    from looprl.ops.sim.preference import load_preference
    from looprl.reward.data import Example, FeedbackSource, is_holdout
    from looprl.reward.model import RewardModel
    from looprl.reward.train import evaluate, train
    from looprl.reward.updater import RewardUpdater

    torch.set_num_threads(args.threads)
    base = args.base
    if base is None:
        t = time.perf_counter()
        base = create_base(load_config(environ={}, workspace=tmp / "ws0"), out_dir=tmp / "base", progress=False)
        print(f"built base in {time.perf_counter() - t:.1f}s")
    cfg = load_config(environ={}, workspace=tmp / "ws", model={"base_path": str(base)},
                      # 8 simulated users: uncapped, so both runs train on every event
                      reward={"min_new_events": 1, "seed": args.seed, "max_user_share": 1.0,
                              **{key: value for key, value in (("features", args.features),
                                                                ("learning_rate", args.learning_rate),
                                                                ("replay_ratio", args.replay_ratio),
                                                                ("epochs_per_update", args.epochs))
                                 if value is not None}})
    rc = cfg.reward
    views = SimulatedLog(tmp / "events")
    pref = load_preference(args.preference)
    sim = dict(preference=pref, off_topic_rate=args.off_topic_rate, cheerful_rate=args.cheerful_rate)
    mix = args.mix  # None or the table main() checked
    pairs = heldout_pairs(args.heldout_pairs, seed=10_000 + args.seed, **sim)
    test = [Example(f"h{i}", "preference", p, None, chosen=c, rejected=r) for i, (p, c, r) in enumerate(pairs)]

    # ---- incremental ----
    results, curve = [], {}
    with RewardUpdater(cfg, connect=views.connect) as up:
        for i in range(args.updates):
            views.append(simulate_feedback(args.events, seed=args.seed * 1000 + i, mix=mix, **sim))
            r = up.update()
            results.append(r)
            print(f"update {r.update}: {r.new_events} new + {r.replay} replay, prequential pair acc "
                  f"{r.prequential['pair_accuracy']}, thumbs AUC {r.prequential['thumbs_auc']}, "
                  f"holdout {r.candidate['score']} -> {r.decision} {r.version or ''} ({r.seconds:.1f}s)")
            if args.eval_every and (i + 1) % args.eval_every == 0 and i + 1 < args.updates:
                curve[i + 1] = round(evaluate(up.model, test).pair_accuracy, 4)
        incr_model = up.model
        incr_acc = evaluate(incr_model, test).pair_accuracy
        curve[args.updates] = round(incr_acc, 4)
    inc_examples = sum((r.trained_new + r.replay) * rc.epochs_per_update for r in results)
    inc_seconds = sum(r.seconds for r in results)
    # an update whose slice held no pair has no pair accuracy (sparse mixes)
    half = [r for r in results[len(results) // 2:] if r.prequential["pairs"]]
    preq_late = sum(r.prequential["pair_accuracy"] * r.prequential["pairs"] for r in half) / max(
        1, sum(r.prequential["pairs"] for r in half))
    events_total = sum(r.new_events for r in results)

    # ---- offline: all (non-held-out) data at once ----
    all_ex = [e for e in FeedbackSource(views.connect()).new_examples(set())
              if not is_holdout(e.event_id, rc.holdout_fraction)]
    off = RewardModel.fresh(cfg)
    t = time.perf_counter()
    train(off, all_ex, lr=rc.learning_rate, batch_size=rc.batch_size, epochs=rc.epochs_per_update, seed=rc.seed)
    off_seconds = time.perf_counter() - t
    off_examples = len(all_ex) * rc.epochs_per_update
    off_acc = evaluate(off, test).pair_accuracy

    inc_rate, off_rate = inc_examples / inc_seconds, off_examples / off_seconds
    print(f"incremental: {events_total} events in {args.updates} updates, {inc_examples} example-epochs in "
          f"{inc_seconds:.1f}s = {inc_rate:.1f} examples/s (update wall time, incl. reads, eval, commit, publish)")
    print(f"offline:     {len(all_ex)} examples x {rc.epochs_per_update} epochs in {off_seconds:.1f}s = {off_rate:.1f} examples/s")
    print(f"held-out pair accuracy: incremental {incr_acc:.3f}, offline {off_acc:.3f}; "
          f"incremental prequential (2nd half) {preq_late:.3f}")
    print(json.dumps({
        "benchmark": "reward_updater", "threads": args.threads, "updates": args.updates, "events": events_total,
        "preference": args.preference, "off_topic_rate": args.off_topic_rate, "features": rc.features,
        "learning_rate": rc.learning_rate, "replay_ratio": rc.replay_ratio, "epochs_per_update": rc.epochs_per_update,
        "mix": mix, "cheerful_rate": args.cheerful_rate, "heldout_acc_after_updates": curve,
        "seconds_per_update": round(inc_seconds / args.updates, 2),
        "incremental_examples_per_s": round(inc_rate, 2), "offline_examples_per_s": round(off_rate, 2),
        "throughput_ratio_incremental_vs_offline": round(inc_rate / off_rate, 3),
        "incremental_events_per_s": round(events_total / inc_seconds, 2),
        "heldout_acc_incremental": round(incr_acc, 4), "heldout_acc_offline": round(off_acc, 4),
        "heldout_acc_ratio_incremental_vs_offline": round(incr_acc / off_acc, 3),
        "prequential_acc_late": round(preq_late, 4),
        "prequential_vs_offline_heldout_ratio": round(preq_late / off_acc, 3),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
