"""Gateway benchmark: what `looprl gateway` adds to a streamed answer, at 64 concurrent clients.

One run starts, each in its own process (so none shares another's GIL): a fast stub upstream
(vLLM's streaming API, pre-made tokens with no model behind them: tests/upstream_stub.py), `looprl
gateway` in front of it (the real command, logging every answer with its token ids to an embedded
Kafka, unless ``--no-kafka``), and the clients here: ``--clients`` concurrent streaming chat
clients. Windows alternate between the clients calling the stub directly and calling the gateway,
``--rounds`` times each, so both see the same machine load, in two regimes:

- throughput: a closed loop (each client sends its next request when its answer ended), which
  saturates the machine -> throughput ratio: answers per second through the gateway / direct
  (goal: at least 0.9), each gateway window against the direct window just before it, median
  over the rounds (on a machine shared with other jobs, the load drifts between windows);
- latency: the same clients paced to ``--load`` (default 0.3) of the direct closed-loop rate, so
  requests do not queue behind each other and the latency difference is what the extra hop
  costs -> added latency: p50 and p99 of the request time (to the last byte) through the gateway
  minus direct (goal: at most 2 ms at p50). Under saturation the difference is queueing instead
  (clients / throughput), and is reported too (``saturated_added_p50_ms``);
- time to first token, direct and through; answers the gateway dropped from its log (goal 0).

Prints human lines, then one JSON line of figures.

    python benchmarks/gateway.py [--clients 64] [--window 4] [--rounds 5] [--tokens 16] [--load 0.3] [--no-kafka] [--out F]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # tests/upstream_stub.py: the stub upstream


def _free_port() -> int:
    from looprl.ingest.broker import free_port

    return free_port()


def _serve_stub(port: int, tokens: int) -> None:
    """The stub upstream in this process until killed (``--serve-stub``)."""
    from upstream_stub import StubUpstream

    StubUpstream(tuple(f" tok{i}" for i in range(tokens)), port=port).start()
    while True:
        time.sleep(3600)


def _wait_http(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f}s")


async def _window(url: str, clients: int, seconds: float, rate: float | None = None,
                  ) -> tuple[list[float], list[float], int, float]:
    """``clients`` streaming chats until ``seconds`` pass: a closed loop, or (``rate``: answers per
    second in all) each client starting a request every ``clients / rate`` seconds, from staggered
    starts. (latencies, TTFTs, errors, wall)."""
    body = {"model": "policy", "messages": [{"role": "user", "content": "tell me about rain"}], "stream": True,
            "max_tokens": 16}
    lat: list[float] = []
    ttft: list[float] = []
    errors = 0
    # idle connections dropped before the servers' keep-alive timeout (uvicorn: 5 s), so none is
    # reused just as the server closes it
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients, keepalive_expiry=4.0)
    async with httpx.AsyncClient(base_url=url, timeout=60.0, limits=limits) as c:
        t_end = time.perf_counter() + seconds

        async def client(i: int) -> None:
            nonlocal errors
            n = 0
            period = clients / rate if rate else 0.0
            next_at = time.perf_counter() + period * i / clients
            while time.perf_counter() < t_end:
                if period:
                    await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
                    next_at += period
                t0 = time.perf_counter()
                first = None
                try:
                    async with c.stream("POST", "/v1/chat/completions", json={**body, "user": f"u{i}-{n}"}) as r:
                        async for chunk in r.aiter_raw():
                            if first is None and b"tok0" in chunk:
                                first = time.perf_counter()
                            last = chunk
                    ok = r.status_code == 200 and last.endswith(b"data: [DONE]\n\n")
                except httpx.HTTPError:
                    ok = False
                if ok:
                    lat.append(time.perf_counter() - t0)
                    ttft.append((first or time.perf_counter()) - t0)
                else:
                    errors += 1
                n += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(clients)))
        wall = time.perf_counter() - t0
    return lat, ttft, errors, wall


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def _metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--window", type=float, default=4.0, help="seconds of each direct and each gateway window")
    ap.add_argument("--rounds", type=int, default=5, help="direct/gateway window pairs")
    ap.add_argument("--tokens", type=int, default=16, help="tokens per streamed answer")
    ap.add_argument("--load", type=float, default=0.3, help="paced load of the latency windows, as a share of the "
                                                             "direct closed-loop rate")
    ap.add_argument("--no-kafka", action="store_true", help="the gateway logs nothing (no broker)")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON figures to this file")
    ap.add_argument("--note", default="", help="a remark stored with the figures (e.g. machine load)")
    ap.add_argument("--serve-stub", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_stub is not None:
        _serve_stub(args.serve_stub, args.tokens)
        return

    from looprl.ops.commands import looprl_argv

    procs: list[subprocess.Popen] = []
    broker = None
    tmp = tempfile.TemporaryDirectory(prefix="looprl-gateway-bench-")
    try:
        stub_port, gw_port, gw_metrics = _free_port(), _free_port(), _free_port()
        procs.append(subprocess.Popen([sys.executable, __file__, "--serve-stub", str(stub_port),
                                       "--tokens", str(args.tokens)], stdout=subprocess.DEVNULL))
        stub_url, gw_url = f"http://127.0.0.1:{stub_port}", f"http://127.0.0.1:{gw_port}"
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("LOOPRL_")},
               "LOOPRL_WORKSPACE": tmp.name, "LOOPRL_LOG_LEVEL": "WARNING",
               "LOOPRL_GATEWAY__UPSTREAMS": json.dumps([stub_url]), "LOOPRL_GATEWAY__PORT": str(gw_port),
               "LOOPRL_GATEWAY__METRICS_PORT": str(gw_metrics), "LOOPRL_GATEWAY__REQUEST_TOKEN_IDS": "true",
               "LOOPRL_GATEWAY__LOG_RESPONSES": str(not args.no_kafka).lower()}
        if not args.no_kafka:
            from looprl.ingest.broker import EmbeddedBroker
            from looprl.ingest.transport import ensure_topics

            broker = EmbeddedBroker().start(timeout=60)
            ensure_topics(broker.bootstrap, {"looprl.responses": 3})
            env["LOOPRL_KAFKA__BOOTSTRAP_SERVERS"] = broker.bootstrap
        procs.append(subprocess.Popen(looprl_argv("gateway"), env=env, stdout=subprocess.DEVNULL))
        _wait_http(f"{stub_url}/health")
        _wait_http(f"{gw_url}/health")
        print(f"stub upstream {stub_url}, gateway {gw_url}, {args.clients} streaming clients, "
              f"{args.tokens} tokens per answer, Kafka {'on: ' + broker.bootstrap if broker else 'off'}", flush=True)
        asyncio.run(_window(gw_url, args.clients, 1.0))  # warm both paths (pools, imports)
        asyncio.run(_window(stub_url, args.clients, 1.0))

        runs: dict[str, dict[str, list]] = {f"{k}{m}": {"lat": [], "rounds": [], "ttft": [], "errors": [], "rate": []}
                                            for k in ("direct", "gateway") for m in ("", "_paced")}

        def window(name: str, url: str, rate: float | None, r: int) -> None:
            lat, ttft, errors, wall = asyncio.run(_window(url, args.clients, args.window, rate))
            d = runs[name]
            d["lat"] += lat
            d["rounds"].append(lat)
            d["ttft"] += ttft
            d["errors"].append(errors)
            d["rate"].append(len(lat) / wall)
            print(f"  round {r + 1} {name:14s}: {len(lat) / wall:7.1f} answers/s, p50 {_pct(lat, .5) * 1e3:7.2f} ms, "
                  f"p99 {_pct(lat, .99) * 1e3:7.2f} ms, TTFT p50 {_pct(ttft, .5) * 1e3:7.2f} ms, {errors} errors",
                  flush=True)

        print("closed loop (throughput):", flush=True)
        for r in range(args.rounds):
            window("direct", stub_url, None, r)
            window("gateway", gw_url, None, r)
        paced = args.load * statistics.mean(runs["direct"]["rate"])
        print(f"paced at {paced:.0f} answers/s ({args.load:.0%} of direct; latency):", flush=True)
        for r in range(args.rounds):
            window("direct_paced", stub_url, paced, r)
            window("gateway_paced", gw_url, paced, r)

        time.sleep(2.0)  # let the gateway hand its last answers to Kafka
        metrics = httpx.get(f"http://127.0.0.1:{gw_metrics}/metrics").text
        d, g = runs["direct"], runs["gateway"]
        dp, gp = runs["direct_paced"], runs["gateway_paced"]
        ms = lambda xs, q: round(_pct(xs, q) * 1e3, 3)  # noqa: E731
        figures = {
            "benchmark": "gateway", "clients": args.clients, "tokens_per_answer": args.tokens,
            "window_s": args.window, "rounds": args.rounds, "kafka_logging": not args.no_kafka,
            "direct_answers_per_s": round(statistics.mean(d["rate"]), 1),
            "gateway_answers_per_s": round(statistics.mean(g["rate"]), 1),
            # each gateway window against the direct window just before it (the machine's other load
            # drifts between windows), the median over rounds; and the ratio of the means
            "throughput_ratio": round(statistics.median(x / y for x, y in zip(g["rate"], d["rate"])), 3),
            "throughput_ratio_of_means": round(statistics.mean(g["rate"]) / statistics.mean(d["rate"]), 3),
            "throughput_ratio_by_round": [round(x / y, 3) for x, y in zip(g["rate"], d["rate"])],
            "paced_answers_per_s": round(statistics.mean(dp["rate"]), 1), "paced_load": args.load,
            "direct_p50_ms": ms(dp["lat"], .5), "gateway_p50_ms": ms(gp["lat"], .5),
            "direct_p99_ms": ms(dp["lat"], .99), "gateway_p99_ms": ms(gp["lat"], .99),
            "added_p50_ms": round(ms(gp["lat"], .5) - ms(dp["lat"], .5), 3),
            "added_p50_ms_by_round": [round((_pct(a, .5) - _pct(b, .5)) * 1e3, 3)
                                      for a, b in zip(gp["rounds"], dp["rounds"])],
            "added_p99_ms": round(ms(gp["lat"], .99) - ms(dp["lat"], .99), 3),
            "direct_ttft_p50_ms": ms(dp["ttft"], .5), "gateway_ttft_p50_ms": ms(gp["ttft"], .5),
            "saturated_direct_p50_ms": ms(d["lat"], .5), "saturated_gateway_p50_ms": ms(g["lat"], .5),
            "saturated_added_p50_ms": round(ms(g["lat"], .5) - ms(d["lat"], .5), 3),
            "errors_direct": sum(d["errors"]) + sum(dp["errors"]),
            "errors_gateway": sum(g["errors"]) + sum(gp["errors"]),
            "gateway_logs_dropped": _metric(metrics, "looprl_gateway_response_logs_dropped_total"),
            "gateway_answers_counted": _metric(metrics, "looprl_gateway_requests_total"),
            "goal_added_p50_ms": 2.0, "goal_throughput_ratio": 0.9,
            "machine": f"{os.cpu_count()} CPU cores shared with other jobs (load {os.getloadavg()[0]:.1f} at the end); "
                       "stub, gateway and clients in separate processes, uvicorn with h11",
        }
        if args.note:
            figures["note"] = args.note
        figures["goals_met"] = figures["added_p50_ms"] <= 2.0 and figures["throughput_ratio"] >= 0.9
        print(f"added latency p50 {figures['added_p50_ms']:+.2f} ms, p99 {figures['added_p99_ms']:+.2f} ms; "
              f"throughput ratio {figures['throughput_ratio']:.3f} (goals: <= 2 ms, >= 0.9)", flush=True)
        if args.out is not None:
            args.out.write_text(json.dumps(figures) + "\n")
        print(json.dumps(figures))
    finally:
        for p in reversed(procs):  # the gateway before its upstream
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        if broker is not None:
            broker.stop()
        tmp.cleanup()


if __name__ == "__main__":
    main()
