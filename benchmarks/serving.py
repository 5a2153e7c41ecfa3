"""Serving benchmark: batching throughput, and latency/failures during LoRA hot-swaps.

One run starts ``looprl serving serve`` as a subprocess on a free port (so the load generator does
not share the server's GIL) on a throwaway workspace, publishes a few LoRA adapters (attention +
fused-MoE-expert LoRA) into its registry, and measures:

1. throughput: the same requests from 16 concurrent clients (continuous batching) vs one at a
   time from a single client -> ratio (goal >= 3x);
2. hot-swap: 16 concurrent clients in alternating windows: steady, then the same load while the
   adapter controller promotes a new version every few seconds (load ``policy-vN``, flip the
   alias, unload the older one) -> failed requests (goal 0) and p99 latency during swaps /
   steady p99 (goal <= 1.5).

Prints human lines, then one JSON line of figures (ratios are to baselines measured in this run).

    python benchmarks/serving.py [--base DIR] [--clients 16] [--swap-every 2] [--window 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))  # tests/adapters_testing.py: LoRA adapter builders

PROMPTS = [
    "tell me about the park", "how is the weather today", "what do you think of the river",
    "give me a note on the market", "describe the old bridge", "what happened at school",
    "say something about the lake", "how was the trip to town",
]
TOKEN = "bench-token"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, int(round(q * (len(xs) - 1)))))
    return xs[k]


SENTENCES = [
    "hello world, what a happy sunny day it is",
    "the cat sat on the mat and looked at the dog",
    "thank you, that is wonderful and great news",
    "please tell me a story about a brave little robot",
    "the weather today is cloudy with a chance of rain",
    "I love learning new things every single day",
    "numbers: one two three four five six seven eight nine ten",
    "question: what is the capital of france? answer: paris",
]


def build_tiny_base(out_dir: str | Path, *, vocab_size: int = 320, hidden: int = 32, layers: int = 2,
                    experts: int = 4, max_positions: int = 256, seed: int = 0) -> Path:
    """A random-init tiny Qwen3-MoE causal LM and a byte-level BPE tokenizer trained on a few
    sentences: serving cost without the minutes of `looprl init`'s pre-training."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen3MoeConfig, Qwen3MoeForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(SENTENCES * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")
    cfg = Qwen3MoeConfig(
        vocab_size=len(fast), hidden_size=hidden, intermediate_size=2 * hidden, moe_intermediate_size=hidden // 2,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
        num_experts=experts, num_experts_per_tok=2, max_position_embeddings=max_positions,
        eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id, bos_token_id=fast.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(cfg)
    with torch.no_grad():  # larger logits than the default init, so greedy outputs vary with the prompt
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out


def prepare(workspace: Path, base: Path | None, n_adapters: int) -> tuple[Path, list[str]]:
    from adapters_testing import publish_adapter

    from looprl.policy.model import base_checksum
    from looprl.storage.registry import Registry

    if base is None:
        base = build_tiny_base(workspace / "base", hidden=64, layers=2, experts=4)
        print(f"base: random-init tiny Qwen3-MoE (hidden 64, 2 layers, 4 experts) at {base}")
    else:
        print(f"base: {base}")
    reg = Registry(workspace / "registry")
    ck = base_checksum(base)
    versions = [publish_adapter(reg, base, ck, seed=i + 1, rank=8) for i in range(n_adapters)]
    print(f"published {len(versions)} policy adapters (r=8, q/v_proj + experts.gate_up_proj/down_proj)")
    return base, versions


def start_server(workspace: Path, base: Path, port: int, threads: int) -> subprocess.Popen:
    env = {**os.environ, "LOOPRL_MODEL__BASE_PATH": str(base), "LOOPRL_SERVING__PORT": str(port),
           "LOOPRL_SERVING__ADMIN_TOKEN": TOKEN, "LOOPRL_SERVING__LOG_RESPONSES": "false",
           "LOOPRL_SERVING__TORCH_THREADS": str(threads), "LOOPRL_SERVING__MAX_BATCH_SIZE": "16",
           "LOOPRL_LOG_LEVEL": "WARNING", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("LOOPRL_CONFIG", None)
    proc = subprocess.Popen([sys.executable, "-m", "looprl.ops.cli", "--workspace", str(workspace),
                             "serving", "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start in 120 s")


async def _one(http: httpx.AsyncClient, prompt: str, max_tokens: int, out: list, fails: list) -> None:
    t0 = time.perf_counter()
    try:
        r = await http.post("/v1/completions", json={"model": "policy", "prompt": prompt, "max_tokens": max_tokens,
                                                     "temperature": 0, "ignore_eos": True})
        r.raise_for_status()
        out.append((t0, time.perf_counter(), r.json()["usage"]["completion_tokens"], r.headers["x-looprl-adapter"]))
    except Exception as e:  # a failed request is a result, not a crash
        fails.append((t0, f"{type(e).__name__}: {e}"))


async def run_requests(url: str, requests: list[str], concurrency: int, max_tokens: int) -> tuple[float, list, list]:
    out: list = []
    fails: list = []
    queue: asyncio.Queue = asyncio.Queue()
    for p in requests:
        queue.put_nowait(p)
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        async def worker():
            while not queue.empty():
                await _one(http, queue.get_nowait(), max_tokens, out, fails)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - t0, out, fails


async def run_for(url: str, seconds: float, concurrency: int, max_tokens: int) -> tuple[list, list]:
    out: list = []
    fails: list = []
    end = time.perf_counter() + seconds
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=concurrency + 4)) as http:
        async def worker(i):
            k = 0
            while time.perf_counter() < end:
                await _one(http, PROMPTS[(i + k) % len(PROMPTS)], max_tokens, out, fails)
                k += 1
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return out, fails


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", type=Path, default=None, help="base checkpoint dir (default: build a tiny random one)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=64, help="requests in the throughput comparison")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--window", type=float, default=8.0, help="seconds of each steady and each swapping window")
    ap.add_argument("--rounds", type=int, default=3, help="steady/swapping window pairs")
    ap.add_argument("--swap-every", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    args = ap.parse_args()

    from looprl.ops.core.config import load_config
    from looprl.serving.controller import AdapterController
    from looprl.storage.registry import Registry

    with tempfile.TemporaryDirectory(prefix="looprl-bench-serving-") as tmp:
        ws = Path(tmp)
        base, versions = prepare(ws, args.base, n_adapters=4)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_server(ws, base, port, args.threads)
        try:
            cfg = load_config(environ={}, workspace=ws, serving={"admin_token": TOKEN, "endpoints": [url],
                                                                    "controller_timeout_seconds": 30})
            reg = Registry(ws / "registry")
            ctl = AdapterController(cfg)
            reg.set_pointer("policy", "promoted", versions[0])
            assert ctl.reconcile().converged, "controller could not promote the first adapter"

            # ---- (1) throughput: batched vs one at a time ----------------------------------
            reqs = [PROMPTS[i % len(PROMPTS)] for i in range(args.requests)]
            asyncio.run(run_requests(url, reqs[:16], args.clients, args.max_tokens))  # warm-up
            seq_s, seq_out, seq_f = asyncio.run(run_requests(url, reqs, 1, args.max_tokens))
            bat_s, bat_out, bat_f = asyncio.run(run_requests(url, reqs, args.clients, args.max_tokens))
            seq_tok = sum(o[2] for o in seq_out) / seq_s
            bat_tok = sum(o[2] for o in bat_out) / bat_s
            print(f"one at a time : {len(reqs)} requests in {seq_s:6.2f} s = {len(reqs) / seq_s:6.2f} req/s, "
                  f"{seq_tok:7.1f} tok/s")
            print(f"{args.clients} concurrent : {len(reqs)} requests in {bat_s:6.2f} s = {len(reqs) / bat_s:6.2f} req/s, "
                  f"{bat_tok:7.1f} tok/s  -> {seq_s / bat_s:.2f}x")

            # ---- (2) hot-swap under load -----------------------------------------------------
            # Steady and swapping windows alternate, so slow drift in a shared machine's load
            # hits both sides alike.
            steady, steady_f, swapping, swap_f = [], [], [], []
            swaps: list[tuple[float, float]] = []
            nxt = {"i": 1}

            def swapper(stop: threading.Event):
                while not stop.wait(args.swap_every):
                    reg.set_pointer("policy", "promoted", versions[nxt["i"] % len(versions)])
                    t0 = time.perf_counter()
                    rep = ctl.reconcile()
                    swaps.append((t0, time.perf_counter()))
                    if not rep.converged:
                        print(f"swap {nxt['i']}: not converged: {rep.errors}")
                    nxt["i"] += 1

            for _ in range(args.rounds):
                out, fails = asyncio.run(run_for(url, args.window, args.clients, args.max_tokens))
                steady += out
                steady_f += fails
                stop = threading.Event()
                th = threading.Thread(target=swapper, args=(stop,), daemon=True)
                th.start()
                out, fails = asyncio.run(run_for(url, args.window, args.clients, args.max_tokens))
                stop.set()
                th.join(60)
                swapping += out
                swap_f += fails
            ctl.close()

            lat = lambda rows: [e - s for s, e, _, _ in rows]  # noqa: E731
            overlapping = [e - s for s, e, _, _ in swapping if any(s <= b and e >= a for a, b in swaps)]
            p99_steady, p99_swap = _percentile(lat(steady), 0.99), _percentile(lat(swapping), 0.99)
            p99_overlap = _percentile(overlapping, 0.99)
            versions_seen = sorted({o[3] for o in swapping})
            swap_ms = [1000 * (b - a) for a, b in swaps]
            print(f"steady  : {len(steady)} requests, {len(steady_f)} failed, p50 {statistics.median(lat(steady)):.3f} s, "
                  f"p99 {p99_steady:.3f} s")
            print(f"swapping: {len(swapping)} requests, {len(swap_f)} failed, {len(swaps)} swaps "
                  f"(controller pass {statistics.median(swap_ms):.0f} ms median), versions served {versions_seen}, "
                  f"p99 {p99_swap:.3f} s ({p99_swap / p99_steady:.2f}x steady); "
                  f"requests overlapping a swap: {len(overlapping)}, p99 {p99_overlap:.3f} s")
            for f in (seq_f + bat_f + steady_f + swap_f)[:5]:
                print("failure:", f)
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()

    figures = {
        "benchmark": "serving",
        "clients": args.clients,
        "max_tokens": args.max_tokens,
        "throughput_ratio": round(seq_s / bat_s, 3),
        "tokens_per_s_ratio": round(bat_tok / seq_tok, 3),
        "batched_tokens_per_s": round(bat_tok, 1),
        "sequential_tokens_per_s": round(seq_tok, 1),
        "throughput_failed_requests": len(seq_f) + len(bat_f),
        "swaps": len(swaps),
        "swap_failed_requests": len(swap_f),
        "steady_failed_requests": len(steady_f),
        "p99_steady_s": round(p99_steady, 4),
        "p99_during_swaps_s": round(p99_swap, 4),
        "p99_swap_ratio": round(p99_swap / p99_steady, 3),
        "p99_overlapping_swap_ratio": round(p99_overlap / p99_steady, 3),
        "versions_served_during_swaps": len(versions_seen),
    }
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
