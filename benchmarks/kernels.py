"""Benchmark looprl.kernels against the paths they replace.

    python benchmarks/kernels.py            # CUDA: Qwen3-30B-A3B shapes; CPU: scaled-down shapes
    python benchmarks/kernels.py --quick    # one token count per benchmark

1. One MoE layer (router + experts) with LoRA on the expert weights, forward + backward:
   peft's target_parameters path vs the fused path (torch reference, Triton on CUDA).
2. Per-token log-prob + entropy from final hidden states and the lm_head: naive full-vocabulary
   fp32 logits vs chunked (torch, Triton on CUDA).

Time is the median of several fwd+bwd steps. Memory is the peak allocated during one step above
what was allocated before it (weights, inputs): torch.cuda.max_memory_allocated on CUDA,
a dispatch-mode storage tracker on CPU; `peak_total_mb` adds the resident tensors back (CUDA only). Ratios are
against the baseline measured in the same run. Prints human lines, then one JSON line, and writes
benchmarks/results/kernels-<device>.json (`--quick`: kernels-<device>-quick.json, git-ignored).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import time
import weakref
from pathlib import Path
from typing import Callable

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

from looprl.kernels import chunked_logprobs_and_entropy, enable_fused_moe_lora, naive_logprobs_and_entropy, \
    triton_available

RESULTS = Path(__file__).parent / "results"

# Qwen3-30B-A3B: hidden 2048, 128 experts of intermediate 768, top-8; vocab 151936.
GPU_SHAPES = dict(hidden=2048, inter=768, experts=128, top_k=8, rank=16, moe_tokens=[4096, 8192, 16384],
                  vocab=151936, lp_tokens=[4096, 8192, 16384], chunk=4096, dtype="bfloat16", iters=10)
CPU_SHAPES = dict(hidden=256, inter=128, experts=16, top_k=4, rank=8, moe_tokens=[512, 1024],
                  vocab=16384, lp_tokens=[512, 1024], chunk=2048, dtype="float32", iters=3)


def device_tag(cuda_name: str) -> str:
    """"NVIDIA H100 80GB HBM3" -> "cuda-nvidia-h100-80gb-hbm3", the device part of a results file name."""
    return "cuda-" + re.sub(r"[^a-z0-9]+", "-", cuda_name.lower()).strip("-")


class MoELayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

        self.mlp = Qwen3MoeSparseMoeBlock(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


def moe_layer(s: dict, device: str, dtype: torch.dtype) -> nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3MoeConfig

    cfg = Qwen3MoeConfig(hidden_size=s["hidden"], moe_intermediate_size=s["inter"], num_experts=s["experts"],
                         num_experts_per_tok=s["top_k"], norm_topk_prob=True)
    cfg._experts_implementation = "grouped_mm"  # transformers' default for a loaded model
    layer = MoELayer(cfg)
    with torch.no_grad():  # the module leaves expert weights uninitialized and the router at zero
        for p in layer.parameters():
            p.normal_(0, s["hidden"] ** -0.5)
    layer = layer.to(device, dtype)
    lora = LoraConfig(r=s["rank"], lora_alpha=2 * s["rank"],
                      target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    return get_peft_model(layer, lora)


class CpuPeakMemory(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the context (CPU has no max_memory_allocated).

    Storages of `existing` tensors (weights, inputs) are not counted, nor are their views."""

    def __init__(self, existing: list[torch.Tensor]):
        super().__init__()
        self.keep = [t.untyped_storage() for t in existing]  # strong refs: ids stay valid
        self.seen = WeakIdKeyDictionary({st: None for st in self.keep})
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                st = t.untyped_storage()
                if st not in self.seen:
                    self.seen[st] = None
                    self.now += st.nbytes()
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(st, self._free, st.nbytes())
        return out

    def _free(self, nbytes: int) -> None:
        self.now -= nbytes


def measure(step: Callable[[], None], device: str, iters: int, existing: list[torch.Tensor]) -> dict:
    """Median ms of `step` and its peak extra memory in MB (None if it ran out of memory).

    `step` must start by dropping the gradients of the previous step; `existing` are the tensors
    alive before it (not counted on CPU)."""
    try:
        step()  # warm-up (Triton compile, cuBLAS heuristics)
        for t in existing:
            t.grad = None
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            mem = dict(peak_mb=(peak - base) / 2**20, peak_total_mb=peak / 2**20)
        else:
            with CpuPeakMemory(existing) as tracker:
                step()
            mem = dict(peak_mb=tracker.peak / 2**20)
        times = []
        for _ in range(iters):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
        return dict(ms=statistics.median(times), **mem)
    except torch.OutOfMemoryError:
        return dict(ms=None, peak_mb=None, oom=True)
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()


def bench_moe(s: dict, device: str, dtype: torch.dtype, impls: list[str], tokens: list[int]) -> list[dict]:
    torch.manual_seed(0)
    model = moe_layer(s, device, dtype)
    rows = []
    for n in tokens:
        x = torch.randn(1, n, s["hidden"], device=device, dtype=dtype, requires_grad=True)
        g = torch.randn_like(x)

        def step():
            for p in model.parameters():
                p.grad = None
            x.grad = None
            model(x).backward(g)

        for impl in impls:
            enable_fused_moe_lora(model, impl)  # "peft" restores peft's own forward
            r = dict(bench="moe_lora", tokens=n, impl=impl,
                     **measure(step, device, s["iters"], [x, g, *model.parameters()]))
            rows.append(r)
            print(_line(r), flush=True)
        del x, g
    return rows


def bench_logprob(s: dict, device: str, dtype: torch.dtype, impls: list[str], tokens: list[int]) -> list[dict]:
    torch.manual_seed(0)
    weight = (torch.randn(s["vocab"], s["hidden"], device=device) * s["hidden"] ** -0.5).to(dtype)  # frozen lm_head
    rows = []
    for n in tokens:
        hidden = torch.randn(n, s["hidden"], device=device, dtype=dtype, requires_grad=True)
        labels = torch.randint(0, s["vocab"], (n,), device=device)
        fns = {
            "naive": lambda: naive_logprobs_and_entropy(hidden, weight, labels),
            "chunked": lambda: chunked_logprobs_and_entropy(hidden, weight, labels, s["chunk"]),
            "triton": lambda: chunked_logprobs_and_entropy(hidden, weight, labels, s["chunk"], impl="triton"),
        }
        for impl in impls:
            def step(fn=fns[impl]):
                hidden.grad = None
                logp, ent = fn()
                (logp.sum() + 0.01 * ent.sum()).backward()

            r = dict(bench="logprob", tokens=n, impl=impl, **measure(step, device, s["iters"], [hidden, weight, labels]))
            rows.append(r)
            print(_line(r), flush=True)
        del hidden, labels
    return rows


def _line(r: dict) -> str:
    if r.get("oom"):
        return f"{r['bench']:9s} tokens={r['tokens']:6d} {r['impl']:8s}  out of memory"
    total = f" (total {r['peak_total_mb']:9.1f} MB)" if "peak_total_mb" in r else ""
    return f"{r['bench']:9s} tokens={r['tokens']:6d} {r['impl']:8s} {r['ms']:9.2f} ms  peak +{r['peak_mb']:9.1f} MB{total}"


def ratios(rows: list[dict], baseline: str) -> list[dict]:
    """speedup = baseline ms / ms; mem_ratio = peak / baseline peak (same bench, same tokens)."""
    out = []
    for r in rows:
        base = next(b for b in rows if b["bench"] == r["bench"] and b["tokens"] == r["tokens"] and b["impl"] == baseline)
        if r["impl"] == baseline or r.get("oom"):
            continue
        ok = not base.get("oom")
        out.append(dict(bench=r["bench"], tokens=r["tokens"], impl=r["impl"], vs=baseline,
                        speedup=base["ms"] / r["ms"] if ok else None,
                        mem_ratio=r["peak_mb"] / base["peak_mb"] if ok else None,
                        total_mem_ratio=(r["peak_total_mb"] / base["peak_total_mb"]
                                         if ok and "peak_total_mb" in r else None),
                        baseline_oom=not ok))
    return out


def goals(rs: list[dict]) -> dict:
    """Issue #8 targets, judged on the fastest kernel per token count."""
    out = {}
    for r in rs:
        if r["speedup"] is None:  # baseline ran out of memory: the kernel wins on memory by definition
            met = True
        elif r["bench"] == "moe_lora":  # >= 2x faster with <= half the peak memory
            met = r["speedup"] >= 2.0 and r["mem_ratio"] <= 0.5
        else:  # >= 4x lower peak memory at equal speed or better
            met = r["speedup"] >= 1.0 and r["mem_ratio"] <= 0.25
        key = f"{r['bench']}/{r['tokens']}"
        out[key] = out.get(key, False) or met
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one token count per benchmark, fewer iterations")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/kernels-<device>[-quick].json)")
    args = ap.parse_args(argv)

    device = args.device
    s = dict(GPU_SHAPES if device == "cuda" else CPU_SHAPES)
    if args.quick:
        s.update(moe_tokens=s["moe_tokens"][:1], lp_tokens=s["lp_tokens"][:1], iters=max(2, s["iters"] // 2))
    if device == "cpu":
        torch.set_num_threads(1)  # a shared 2-core box: one thread gives repeatable timings
    dtype = getattr(torch, s["dtype"])
    has_triton = device == "cuda" and triton_available()
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    print(f"device {name} | torch {torch.__version__} | triton {'yes' if has_triton else 'no'} | {s}", flush=True)

    rows = bench_moe(s, device, dtype, ["peft", "torch"] + ["triton"] * has_triton, s["moe_tokens"])
    rows += bench_logprob(s, device, dtype, ["naive", "chunked"] + ["triton"] * has_triton, s["lp_tokens"])
    rs = ratios([r for r in rows if r["bench"] == "moe_lora"], "peft") + \
        ratios([r for r in rows if r["bench"] == "logprob"], "naive")
    for r in rs:
        if r["speedup"] is not None:
            print(f"{r['bench']:9s} tokens={r['tokens']:6d} {r['impl']:8s} vs {r['vs']}: "
                  f"{r['speedup']:.2f}x speed, {r['mem_ratio']:.3f}x peak memory")

    tag = "cpu" if device == "cpu" else device_tag(name)
    result = dict(device=tag, device_name=name, torch=torch.__version__, triton=has_triton, shapes=s,
                  quick=args.quick, results=rows, ratios=rs, goals_met=goals(rs))
    # a --quick run never replaces the stored full results
    out = args.out or RESULTS / f"kernels-{tag}{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
