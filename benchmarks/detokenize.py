"""Detokenization benchmark: the per-token cost of streaming an answer's text, incremental vs full re-decode.

The engine turns each sampled token into the text it adds. It used to re-decode the whole answer
on every token (cost per token grows with the answer: quadratic overall); it now decodes a short
window (``looprl.serving.detokenizer.IncrementalDetokenizer``, vLLM's prefix/read offsets). Both
run here on the tiny base's tokenizer (a byte-level BPE), over answers of 32, 256 and 1024 tokens
of the corpus the base writes and of multi-byte text (characters split over byte tokens), and
both must stream exactly ``tokenizer.decode(ids, skip_special_tokens=True)``.

Prints human lines, then one JSON line of figures (ratios are to baselines measured in this run:
the full re-decode at the same length, and each path's own cost at the shortest length).

    python benchmarks/detokenize.py [--base DIR] [--lengths 32 256 1024] [--timed 32] [--repeats 20]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

from transformers import AutoTokenizer

from looprl.ops.core.config import load_config
from looprl.ops.sim.base import train_tokenizer
from looprl.ops.sim.corpus import corpus
from looprl.serving.detokenizer import IncrementalDetokenizer

UNICODE = "héllo wörld, naïve café — “quotes”, 日本語のテキスト, 中文 ok 🙂🙃 ünïcödé. "
N_DOCS = 2500  # as tests/fixtures_model.py builds the tiny base


def tiny_tokenizer(base: Path | None) -> Any:
    """The tokenizer of ``base``, or the one the tiny base is built with (the base's own training
    corpus and vocabulary size; pre-training does not change it)."""
    if base is not None:
        return AutoTokenizer.from_pretrained(base)
    mc = load_config(environ={}).model
    return train_tokenizer(corpus(N_DOCS, seed=mc.seed), mc.vocab_size)


class FullRedecode:
    """The engine's text path before: every token decodes the whole answer again."""

    def __init__(self) -> None:
        self.emitted = 0

    def step(self, tok: Any, ids: list[int]) -> str:
        text = tok.decode(ids, skip_special_tokens=True)
        safe = len(text) - text.endswith("\ufffd")  # an incomplete UTF-8 sequence waits for the next token
        new = text[self.emitted:safe]
        self.emitted = max(self.emitted, safe)
        return new


def per_token_us(make: Callable[[], Any], tok: Any, ids: list[int], timed: int, repeats: int) -> float:
    """Microseconds per token of the text of the last ``timed`` tokens of the answer ``ids`` (best of
    ``repeats``: short timed runs, equally exposed to a busy machine at every length). Checks the text."""
    cut = len(ids) - timed
    path, generated, deltas = make(), [], []
    for token in ids[:cut]:
        generated.append(token)
        deltas.append(path.step(tok, generated))
    best = float("inf")
    for _ in range(repeats):
        state, run, tail = copy.copy(path), list(generated), []
        t0 = time.perf_counter()
        for token in ids[cut:]:
            run.append(token)
            tail.append(state.step(tok, run))
        best = min(best, time.perf_counter() - t0)
    streamed, full = "".join(deltas + tail), tok.decode(ids, skip_special_tokens=True)
    # Both hold back only a trailing incomplete character, which the finish's full decode sends.
    assert full.startswith(streamed) and len(full) - len(streamed) <= 1, (make.__name__, len(ids))
    return 1e6 * best / timed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", type=Path, default=None, help="base checkpoint dir (default: train the tiny base's tokenizer)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[32, 256, 1024], help="answer lengths in tokens")
    ap.add_argument("--timed", type=int, default=32, help="tokens timed at the end of each answer")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()

    tok = tiny_tokenizer(args.base)
    print(f"tokenizer: {type(tok).__name__}, {len(tok)} tokens, from {args.base or 'the tiny base corpus'}")
    longest = max(args.lengths)
    texts = {"corpus": " ".join(corpus(400, seed=1)), "unicode": UNICODE * 200}
    streams = {name: tok(text, add_special_tokens=False)["input_ids"] for name, text in texts.items()}
    for name, ids in streams.items():
        if len(ids) < longest:
            raise SystemExit(f"{name} text has only {len(ids)} tokens < {longest}")

    rows = []
    for name, stream in streams.items():
        for n in sorted(args.lengths):
            ids = stream[:n]
            new = per_token_us(IncrementalDetokenizer, tok, ids, min(args.timed, n), args.repeats)
            old = per_token_us(FullRedecode, tok, ids, min(args.timed, n), args.repeats)
            rows.append({"text": name, "tokens": n, "incremental_us_per_token": round(new, 2),
                         "full_redecode_us_per_token": round(old, 2), "speedup": round(old / new, 2)})
            print(f"{name:8s} {n:5d} tokens: incremental {new:7.2f} us/token, full re-decode {old:8.2f} us/token "
                  f"-> {old / new:6.2f}x")

    figures: dict[str, Any] = {"benchmark": "detokenize", "vocab": len(tok), "timed_tokens": args.timed,
                               "repeats": args.repeats, "rows": rows}
    short = min(args.lengths)
    for name in streams:
        at = {r["tokens"]: r for r in rows if r["text"] == name}
        growth = {path: round(at[longest][f"{path}_us_per_token"] / at[short][f"{path}_us_per_token"], 2)
                  for path in ("incremental", "full_redecode")}
        for path, g in growth.items():
            figures[f"{name}_{path}_growth_{short}_to_{longest}"] = g
        print(f"{name:8s} per-token cost from {short} to {longest} tokens: incremental x{growth['incremental']}, "
              f"full re-decode x{growth['full_redecode']}")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
