"""Replay a demo workspace's feedback through a fresh reward model and measure its true skill.

The demo's reward model is judged live on the labels themselves (prequential pair accuracy, thumbs
AUC), which are noisy coin flips of the users' hidden preference; with a few hundred labels that
estimate cannot tell a weak model from a good one. The simulator, though, records the hidden
preference's P(thumbs-up) of every answer it asked for (``state/simulator/interactions.jsonl``).
This script streams the workspace's event log, oldest first, through a fresh reward model in
slices as the updater does (test, then train on the slice plus ``--replay`` times as many replayed
earlier examples, ``--epochs`` epochs; no per-user cap, no publish decision), and after every
``--every`` slices scores the eval users' answers from the base model: the *true skill* is the
share of answer pairs with different P that the model orders as P does (0.5: chance), also split
into the pairs whose better answer is the longer one and those where it is the shorter (a model
that scores how dense something is rather than how much of it there is ranks the first worse).
The same checkpoints run a probe of that (``count_probe``): answers written from the toy corpus,
one cheerful sentence against the same followed by a cheerful one (the default user likes it more)
or by a neutral one (the user likes both alike).

``--published v2,v9,...`` instead scores those reward versions as the demo published them (from
the workspace's registry), so the live models' true skill can be set beside the replay's.

Ablations: ``--drop correction`` (or ``preference``, ``thumbs``) leaves a label kind out;
``--adapters 1`` trains one LoRA adapter instead of the sparse profile's independent ones;
``--features echo_sum`` reads other features than the config's (``reward.features``).

Usage: ``python benchmarks/reward_replay.py WORKSPACE [--drop kinds] [--slice 16] [--replay 4]
[--epochs 16] [--adapters 4] [--features echo] [--every 2] [--seed 0] [--answers 400] [--threads 1]
[--published v2,v9]``. The defaults are the sparse profile's reward tuning. Human lines first,
then one JSON line: the true skill (all pairs, better answer longer, better answer shorter) and the
probe's two shares after each ``--every`` slices, and the seconds spent training
(``train_s``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def true_skill(scores: list[float], p: list[float], lengths: list[int] | None = None,
               better_is: str | None = None) -> float | None:
    """Share of pairs with different hidden P that ``scores`` orders the same way (ties: half).
    With ``lengths`` and ``better_is`` "longer" (or "shorter"): over the pairs whose answer with the
    higher P is the longer (shorter) one only, so a model that reads how dense something is in an
    answer rather than how much of it there is shows as a gap between the two."""
    agree = n = 0.0
    for i in range(len(p)):
        for j in range(i + 1, len(p)):
            dp = p[i] - p[j]
            if dp == 0:
                continue
            if better_is is not None and lengths is not None:
                dl = (lengths[i] - lengths[j]) * (1 if dp > 0 else -1)  # > 0: the better answer is longer
                if dl == 0 or (dl > 0) != (better_is == "longer"):
                    continue
            ds = scores[i] - scores[j]
            n += 1
            agree += 1.0 if ds * dp > 0 else (0.5 if ds == 0 else 0.0)
    return agree / n if n else None


def eval_answers(workspace: Path, limit: int) -> list[tuple[str, str, float]]:
    """(prompt, completion, hidden P) of the eval users' answers from the base model."""
    path = workspace / "state" / "simulator" / "interactions.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path} not found: pass the workspace of a `looprl demo` run")
    out = []
    with path.open() as f:
        for line in f:
            r = json.loads(line)
            if r.get("kind") == "eval" and r.get("version") == "base" and r.get("p") is not None:
                out.append((r["prompt"], r["completion"], float(r["p"])))
    random.Random(0).shuffle(out)
    return out[:limit]


def model_skill(model, answers: list[tuple[str, str, float]]) -> tuple[float | None, float | None, float | None]:
    """The true skill of a reward model on (prompt, completion, hidden P) answers: over all pairs,
    over those whose better answer is the longer (in words), and over those where it is the shorter."""
    scores = model.score([a[0] for a in answers], [a[1] for a in answers]).tolist()
    p, lengths = [a[2] for a in answers], [len(a[1].split()) for a in answers]
    return (true_skill(scores, p), true_skill(scores, p, lengths, "longer"), true_skill(scores, p, lengths, "shorter"))


def count_probe(model, prompts: list[str], seed: int = 0) -> dict[str, float]:
    """How the model reads a second sentence, on answers written from the toy corpus for each
    prompt's topic: ``adds`` = the share of answers one cheerful sentence long that score below the
    same sentence followed by a second cheerful one (the default user likes the second answer more:
    1.0 is right); ``dilutes`` = the share that score above the same sentence followed by a neutral
    one (the user likes both alike; a model that reads how dense cheer is rather than how much there
    is says 1.0, one that counts about 0.5)."""
    from looprl.ops.sim.corpus import answer
    from looprl.ops.sim.preference import topic_of

    rng = random.Random(seed)

    def sentence(topic: str, cheerful: bool) -> str:
        return re.split(r"(?<=\.) ", answer(rng, topic, 1.0 if cheerful else 0.0))[0]

    firsts, cheers, neutrals = [], [], []
    for q in prompts:
        topic = topic_of(q)
        first = " " + sentence(topic, True)
        firsts.append(first)
        cheers.append(first + " " + sentence(topic, True))
        neutrals.append(first + " " + sentence(topic, False))
    n = len(prompts)
    s = model.score(prompts * 3, firsts + cheers + neutrals).tolist()
    one, two, diluted = s[:n], s[n:2 * n], s[2 * n:]
    return {"adds": round(sum(b > a for a, b in zip(one, two)) / n, 3),
            "dilutes": round(sum(d < a for a, d in zip(one, diluted)) / n, 3)}


def _fmt_probe(c: dict[str, float]) -> str:
    return f"a cheerful second sentence adds {c['adds']:.2f}, a neutral one dilutes {c['dilutes']:.2f}"


def _fmt_skill(s: tuple[float | None, ...]) -> str:
    return (f"true skill {s[0]:.3f} ({'-' if s[1] is None else format(s[1], '.3f')} where the better answer is "
            f"longer, {'-' if s[2] is None else format(s[2], '.3f')} where it is shorter)")


def published_skill(cfg, answers: list[tuple[str, str, float]], versions: list[str]) -> int:
    """The true skill of reward versions as the demo published them, with the events each had read."""
    from looprl.reward.model import KIND, load_reward_model
    from looprl.storage.registry import Registry

    reg, rows = Registry(cfg.registry_dir), []
    for v in versions:
        events = reg.manifest(KIND, v).watermark.get("consumed_events")
        model = load_reward_model(cfg, v)
        s, c = model_skill(model, answers), count_probe(model, [a[0] for a in answers])
        rows.append({"version": v, "events": events, "true_skill": round(s[0], 3),
                     "true_skill_longer_better": s[1] and round(s[1], 3),
                     "true_skill_shorter_better": s[2] and round(s[2], 3),
                     "second_sentence_adds": c["adds"], "second_sentence_dilutes": c["dilutes"]})
        print(f"{v} ({events} events read): {_fmt_skill(s)}; {_fmt_probe(c)}")
    print(json.dumps({"workspace": str(cfg.workspace), "published": rows}))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workspace", type=Path)
    ap.add_argument("--drop", default="", help="label kinds to leave out, comma-separated")
    ap.add_argument("--slice", type=int, default=16, help="new examples per update")
    ap.add_argument("--replay", type=float, default=4.0, help="replayed examples per new one")
    ap.add_argument("--epochs", type=int, default=16)
    ap.add_argument("--thumbs-weight", type=float, default=None, help="reward.thumbs_weight (default: the config's)")
    ap.add_argument("--adapters", type=int, default=4, help="reward.ensemble_adapters")
    ap.add_argument("--features", default=None, help="reward.features (default: the config's)")
    ap.add_argument("--every", type=int, default=2, help="measure the true skill every N updates")
    ap.add_argument("--max-updates", type=int, default=30)
    ap.add_argument("--answers", type=int, default=400, help="eval answers scored for the true skill")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--published", default="", help="score these published reward versions instead, comma-separated")
    args = ap.parse_args(argv)

    import torch

    from looprl.ops.core.config import load_config
    from looprl.reward.data import FeedbackSource, connect_event_log, is_holdout
    from looprl.reward.model import RewardModel
    from looprl.reward.train import evaluate, train

    torch.set_num_threads(args.threads)
    cfg = load_config(environ={}, workspace=args.workspace)
    rc = cfg.reward
    answers = eval_answers(args.workspace, args.answers)
    if len({a[2] for a in answers}) < 2:
        raise SystemExit("the eval answers' hidden P does not vary: nothing to rank")
    if args.published:
        return published_skill(cfg, answers, [v for v in args.published.split(",") if v])
    con = connect_event_log(cfg.events_dir)
    try:
        examples = FeedbackSource(con).new_examples([])
    finally:
        con.close()
    drop = {k for k in args.drop.split(",") if k}
    examples = [e for e in examples if e.kind not in drop]
    stream = [e for e in examples if not is_holdout(e.event_id, rc.holdout_fraction)]
    kinds: dict[str, int] = {}
    for e in stream:
        kinds[e.kind] = kinds.get(e.kind, 0) + 1
    print(f"{len(stream)} training examples {kinds}, {len(answers)} eval answers")

    model = RewardModel.fresh(cfg, seed=args.seed, adapters=args.adapters, features=args.features)
    thumbs_weight = rc.thumbs_weight if args.thumbs_weight is None else args.thumbs_weight

    curve, history, train_s = [], [], 0.0
    print(f"update 0: {_fmt_skill(model_skill(model, answers))}")
    for n in range(min(args.max_updates, -(-len(stream) // args.slice))):
        new = stream[n * args.slice:(n + 1) * args.slice]
        preq = evaluate(model, new)
        k = min(len(history), round(args.replay * len(new)))
        replay = random.Random(f"{args.seed}:replay:{n}").sample(history, k) if k else []
        t0 = time.perf_counter()
        train(model, new + replay, lr=rc.learning_rate, batch_size=rc.batch_size, epochs=args.epochs,
              seed=rc.seed + n + 1, correction_weight=rc.correction_weight, thumbs_weight=thumbs_weight,
              bootstrap_seed=rc.seed)
        train_s += time.perf_counter() - t0
        history += new
        if (n + 1) % args.every == 0:
            s, c = model_skill(model, answers), count_probe(model, [a[0] for a in answers])
            curve.append({"update": n + 1, "labels": len(history), "true_skill": round(s[0], 3),
                          "true_skill_longer_better": s[1] and round(s[1], 3),
                          "true_skill_shorter_better": s[2] and round(s[2], 3),
                          "second_sentence_adds": c["adds"], "second_sentence_dilutes": c["dilutes"],
                          "prequential_pair_accuracy": preq.pair_accuracy, "prequential_thumbs_auc": preq.thumbs_auc})
            print(f"update {n + 1} ({len(history)} labels): {_fmt_skill(s)}; {_fmt_probe(c)}; prequential pairs "
                  f"{'-' if preq.pair_accuracy is None else round(preq.pair_accuracy, 3)} thumbs AUC "
                  f"{'-' if preq.thumbs_auc is None else round(preq.thumbs_auc, 3)} on this slice")
    print(f"training took {train_s:.1f} s over {len(history)} labels")
    print(json.dumps({"workspace": str(args.workspace), "drop": sorted(drop), "seed": args.seed,
                      "adapters": args.adapters, "features": model.feature_kind, "epochs": args.epochs,
                      "thumbs_weight": thumbs_weight,
                      "train_s": round(train_s, 1),
                      "true_skill": [c["true_skill"] for c in curve], "curve": curve}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
