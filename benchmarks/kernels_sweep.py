"""Pick the Triton grouped-GEMM tiles of the fused MoE-LoRA path (CUDA only).

    python benchmarks/kernels_sweep.py [--tokens 16384] [--apply]

At Qwen3-30B-A3B layer shapes (hidden 2048, 128 experts of 768, top-8, LoRA rank 16, bf16) it
times the 4 projections of one fused forward+backward (`gmm_lora`: each computes its LoRA's
rank-r side product in its own K loop) and the `gouter` shapes under a list of tile configs,
checks each result against the torch reference, and prints TFLOP/s per shape and config (of the
projection alone: the rank-r work is not counted). Then it profiles one whole fused step with
the best configs (`--profile-tokens 4096 16384` for other sizes): wall time, the host's time to
issue the step, CUDA kernel time, synchronizing ops, top kernels and host ops. Each projection
kind gets its own tile (pointer or TMA loads); the row tile is shared. `--apply` also runs
`benchmarks/kernels.py`'s MoE benchmark with them (`--no-sweep`: profile the defaults only). The
defaults in `TritonGrouped` come from this script's output on an H200. Writes
benchmarks/results/kernels-sweep-<device>.json, rewritten after every timed config so a run cut off
(the device's 10-minute limit) keeps what it measured (`"complete": false` until the end); last
line: a JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from looprl.kernels import triton_available

if not triton_available():
    sys.exit("kernels_sweep.py needs CUDA and triton (pip install -e '.[gpu]'); "
             "benchmarks/kernels.py runs on CPU too")

from triton.testing import do_bench  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))  # benchmarks/kernels.py: the layer, shapes, results path

from kernels import GPU_SHAPES, RESULTS, bench_moe, device_tag, moe_layer, ratios  # noqa: E402

from looprl.kernels import enable_fused_moe_lora  # noqa: E402
from looprl.kernels.moe_lora import TorchGrouped  # noqa: E402
from looprl.kernels.triton_moe_lora import PROJECTIONS, GemmConfig, TritonGrouped, every_kind  # noqa: E402

H, I, E, TOP_K, R = 2048, 768, 128, 8, 16
DT = torch.bfloat16
# Pointer loads, and the same tiles with TMA weight tiles (and TMA rows where they are sorted).
# 128x256 tiles spilled before the LoRA product was accumulated into the projection's own
# accumulator (benchmarks/kernels_compile.py: 255 registers + 552 B stack, now 207-234, none).
WIDE = [GemmConfig(128, 64, 4, 3), GemmConfig(128, 64, 8, 4), GemmConfig(256, 64, 8, 3), GemmConfig(128, 128, 8, 3),
        GemmConfig(256, 32, 8, 4), GemmConfig(128, 32, 4, 4)]
WIDE += [replace(c, tma=True) for c in WIDE]
BLOCK_MS = [64, 128]
GOUTERS = [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=2) for bm in (32, 64, 128) for bn in (64, 128)
           for w in (4, 8)]


def problem(tokens: int, device: str = "cuda") -> dict:
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(DT)

    idx = torch.randn(tokens, E, generator=g, device=device).topk(TOP_K, dim=-1).indices
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    tok = order // TOP_K
    counts = torch.bincount(flat, minlength=E)
    S = flat.numel()
    x, gy = rand(tokens, H), rand(tokens, H)
    a, dh = rand(S, I), rand(S, 2 * I)
    w_gu, w_d = rand(E, 2 * I, H, scale=H ** -0.5), rand(E, H, I, scale=I ** -0.5)
    a_gu, b_gu, a_d, b_d = rand(E, R, H), rand(E, 2 * I, R), rand(E, R, I), rand(E, H, R)
    side = rand(S, R)
    # name: (x, w, rows, trans, (p, q, scale) of the LoRA, flops of the projection)
    calls = {
        "gate_up fwd": (x, w_gu, tok, True, (a_gu, b_gu, 2.0), 2 * S * 2 * I * H),
        "down fwd": (a, w_d, None, True, (a_d, b_d, 2.0), 2 * S * H * I),
        "down bwd": (gy, w_d, tok, False, (b_d, a_d, 2.0), 2 * S * I * H),
        "gate_up bwd": (dh, w_gu, None, False, (b_gu, a_gu, 2.0), 2 * S * H * 2 * I),
    }
    outers = {"dB_down (g^T aa)": (gy, side, tok, 2 * S * H * R), "dA_gu (x^T dhb)": (x, side, tok, 2 * S * H * R),
              "dB_gu (dh^T xa)": (dh, side, None, 2 * S * 2 * I * R)}
    return dict(counts=counts, S=S, calls=calls, outers=outers)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def time_ms(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def sweep(p: dict, result: dict, save: Callable[[], None]) -> None:
    """Fills result["rows"] (every config timed) and result["chosen"], calling save() after each row."""
    ref, tri = TorchGrouped(), TritonGrouped()
    p_ref = ref.plan(p["counts"], p["S"])
    refs = {n: ref.gmm_lora(x, w, p_ref, lo, rows=rows, trans=t) for n, (x, w, rows, t, lo, _) in p["calls"].items()}
    ref_outer = {n: ref.gouter(x, y, p_ref, rows=rows) for n, (x, y, rows, _) in p["outers"].items()}
    rows_out, best = result.setdefault("rows", []), {}

    def run(name, fn, flops, ref_out, cfg):
        out = fn()
        err = (max(rel_err(o, r) for o, r in zip(out, ref_out)) if isinstance(out, tuple)
               else rel_err(out, ref_out))
        ms = time_ms(fn) if err < 2e-2 else float("nan")
        r = dict(call=name, cfg=cfg, ms=ms, tflops=flops / ms / 1e9, rel_err=err)
        rows_out.append(r)
        print(f"{name:18s} {str(cfg):70s} {ms:8.3f} ms {r['tflops']:7.1f} TFLOP/s err {err:.1e}", flush=True)
        save()
        return ms

    # Each projection kind (rows gathered or sorted, weight transposed or not) gets its own tile;
    # the row tile is shared (one plan per layer call), so pick it by the sum of the kinds' best.
    for bm in BLOCK_MS:
        TritonGrouped.BLOCK_M["16bit"] = bm
        plan = tri.plan(p["counts"], p["S"], DT)
        by_kind = {}
        for c in WIDE:
            TritonGrouped.WIDE["16bit"] = every_kind(c)
            for n, (x, w, rows, t, lo, fl) in p["calls"].items():
                ms = run(n, lambda: tri.gmm_lora(x, w, plan, lo, rows=rows, trans=t), fl, refs[n],
                         dict(block_m=bm, **c.__dict__))
                if ms == ms and ms < by_kind.get(n, (float("inf"),))[0]:
                    by_kind[n] = (ms, c)
        total = sum(ms for ms, _ in by_kind.values())
        if len(by_kind) == len(PROJECTIONS) and total < best.get("wide_ms", float("inf")):
            best.update(wide_ms=total, block_m=bm, wide={n: c for n, (_, c) in by_kind.items()})
    TritonGrouped.BLOCK_M["16bit"] = best["block_m"]
    TritonGrouped.WIDE["16bit"] = {PROJECTIONS[n]: c for n, c in best["wide"].items()}
    plan = tri.plan(p["counts"], p["S"], DT)
    for c in GOUTERS:
        TritonGrouped.GOUTER["16bit"] = c
        total = 0.0
        for n, (x, y, rows, fl) in p["outers"].items():
            total += run(n, lambda: tri.gouter(x, y, plan, rows=rows), fl, ref_outer[n], c)
        if total == total and total < best.get("gouter_ms", float("inf")):
            best.update(gouter_ms=total, gouter=c)
    TritonGrouped.GOUTER["16bit"] = best["gouter"]
    chosen = dict(block_m=best["block_m"], wide={n: c.__dict__ for n, c in best["wide"].items()}, gouter=best["gouter"],
                  wide_ms=best["wide_ms"], gouter_ms=best["gouter_ms"])
    print("chosen:", chosen, flush=True)
    result["chosen"] = chosen
    save()


def grouped_mm_rate(p: dict) -> dict:
    """The vendor grouped GEMM (torch._grouped_mm, what transformers' "grouped_mm" experts and so
    peft's path use) on the projections: the rate a GEMM on these shapes can reach here."""
    if not hasattr(torch, "_grouped_mm"):
        return {}
    offs = torch.cumsum(p["counts"], 0).int()
    out = {}
    for name in ("gate_up fwd", "down fwd", "down bwd", "gate_up bwd"):
        x, w, rows, trans, _, flops = p["calls"][name]
        xs = x[rows] if rows is not None else x
        wt = w.transpose(1, 2) if trans else w
        ms = time_ms(lambda: torch._grouped_mm(xs, wt, offs=offs))
        out[name] = dict(ms=ms, tflops=flops / ms / 1e9)
        print(f"{name:18s} torch._grouped_mm {ms:8.3f} ms {flops / ms / 1e9:7.1f} TFLOP/s", flush=True)
    return out


def profile_step(tokens: int) -> dict:
    """One fused fwd+bwd step of the layer: its wall time, the host time to issue it (no sync inside
    the step, so the host runs ahead unless something synchronizes), the CUDA kernel time, the ops
    that synchronize (torch's sync debug mode), and the top kernels and host ops."""
    model = moe_layer(GPU_SHAPES, "cuda", DT)
    enable_fused_moe_lora(model, "triton")
    x = torch.randn(1, tokens, H, device="cuda", dtype=DT, requires_grad=True)
    gy = torch.randn_like(x)

    def step():
        model(x).backward(gy)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    walls, issues = [], []
    for _ in range(10):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        issues.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - t0) * 1e3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        step()
        torch.cuda.set_sync_debug_mode("default")
    syncs = sorted({str(w.message).splitlines()[0][:120] for w in caught if "synchroniz" in str(w.message)})
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    ev = prof.key_averages()
    # Only kernel events: a host op's self device time (an autograd Function's) repeats its kernels'.
    kernels = [e for e in ev if e.device_type == torch.autograd.DeviceType.CUDA]
    cuda_ms = sum(e.self_device_time_total for e in kernels) / 5 / 1e3
    out = dict(tokens=tokens, wall_ms=statistics.median(walls), issue_ms=statistics.median(issues),
               cuda_ms=cuda_ms, syncs=syncs, kernels=[], host_ops=[])
    print(f"profile at {tokens} tokens: wall {out['wall_ms']:.2f} ms, host issue {out['issue_ms']:.2f} ms, "
          f"CUDA kernels {cuda_ms:.2f} ms per fused fwd+bwd step; {len(syncs)} synchronizing ops", flush=True)
    for m in syncs:
        print(f"  sync: {m}", flush=True)
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:12]:
        out["kernels"].append(dict(name=e.key[:80], ms_per_step=e.self_device_time_total / 5 / 1e3,
                                   calls_per_step=e.count / 5))
    for e in sorted((e for e in ev if e.device_type == torch.autograd.DeviceType.CPU),
                    key=lambda e: -e.self_cpu_time_total)[:15]:
        out["host_ops"].append(dict(name=e.key[:80], ms_per_step=e.self_cpu_time_total / 5 / 1e3,
                                    calls_per_step=e.count / 5))
    for kind in ("kernels", "host_ops"):
        print(f" top {kind}:", flush=True)
        for d in out[kind]:
            print(f"  {d['ms_per_step']:7.3f} ms  x{d['calls_per_step']:4.0f}  {d['name']}", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--profile-tokens", type=int, nargs="*", default=None,
                    help="token counts to profile one fused step at (default: --tokens)")
    ap.add_argument("--apply", action="store_true", help="then run the MoE benchmark with the chosen tiles")
    ap.add_argument("--no-sweep", action="store_true", help="profile the current defaults only")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON path (default benchmarks/results/kernels-sweep-<device>.json)")
    args = ap.parse_args(argv)
    print(f"device {torch.cuda.get_device_name()} | torch {torch.__version__} | tokens {args.tokens}", flush=True)
    out = args.out or RESULTS / f"kernels-sweep-{device_tag(torch.cuda.get_device_name())}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = dict(device=torch.cuda.get_device_name(), tokens=args.tokens, complete=False)

    def save() -> None:  # write-then-rename: a run killed mid-write leaves the last whole file
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=1, default=str) + "\n")
        tmp.replace(out)

    p = problem(args.tokens)
    result["cublas_grouped_mm"] = grouped_mm_rate(p)
    save()
    if not args.no_sweep:
        sweep(p, result, save)
    result["profile"] = [profile_step(n) for n in (args.profile_tokens or [args.tokens])]
    save()
    if args.apply:
        rows = bench_moe(dict(GPU_SHAPES), "cuda", DT, ["peft", "triton"], GPU_SHAPES["moe_tokens"])
        result["moe"] = ratios(rows, "peft")
        for r in result["moe"]:
            print(f"moe_lora tokens={r['tokens']:6d} triton vs peft: {r['speedup']:.2f}x speed, "
                  f"{r['mem_ratio']:.3f}x peak memory", flush=True)
    result["complete"] = True
    save()
    print(json.dumps(result, default=str))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
