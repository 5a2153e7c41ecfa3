"""Compile the fused MoE-LoRA Triton kernels for a GPU target without a GPU, and report their resources.

    python benchmarks/kernels_compile.py [--tokens 16384] [--arch 90] [--tile 128,64,4,3,tma [--block-m 64]]

Runs one fused forward+backward of the benchmark's Qwen3-30B-A3B MoE layer (hidden 2048, 128
experts of 768, top-8, LoRA r=16, bf16) on the `meta` device, recording every Triton launch
instead of running it; then compiles each distinct launch for `sm_<arch>` with triton's bundled
ptxas, specialized as the JIT would be for those arguments (ints equal to 1 become constants,
multiples of 16 and pointers get the divisibility hint). Prints per kernel: registers, stack
bytes (spills), shared memory, resident blocks per SM, and how many of the K loop's operands are
copied asynchronously (cp.async or TMA, i.e. pipelined). `--tile` compiles every projection with
one 16-bit tile instead. Needs triton (`pip install -e '.[gpu]'`), no GPU: a session without one
can still catch a kernel that does not compile, spills, or loads an operand synchronously. Last
line: a JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import mangle_type
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    sys.exit("kernels_compile.py needs triton (pip install -e '.[gpu]'); no GPU is needed")

sys.path.insert(0, str(Path(__file__).parent))
from kernels import GPU_SHAPES, moe_layer  # noqa: E402

from looprl.kernels import enable_fused_moe_lora  # noqa: E402
from looprl.kernels import triton_moe_lora as tm  # noqa: E402

# Per-SM limits of the targets (CUDA occupancy tables): registers, shared memory, threads.
SM_LIMITS = {90: dict(regs=65536, smem=227 * 1024, threads=2048), 100: dict(regs=65536, smem=227 * 1024, threads=2048)}
TRITON_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int64: "i64",
                 torch.int32: "i32"}


class Recorder:
    """Stands in for a `@triton.jit` kernel: `kernel[grid](*args, **kw)` records the call."""

    def __init__(self, fn, calls: list):
        self.fn, self.calls = fn, calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((self.fn, args, kwargs))
        return launch


def specialize(fn, args: tuple, kwargs: dict) -> tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attrs, options) the way triton's JIT specializes these arguments."""
    names = [p.name for p in fn.params]
    values = dict(zip(names, args), **{k: v for k, v in kwargs.items() if k in names})
    options = {k: v for k, v in kwargs.items() if k not in names}
    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(names):
        v = values[name]
        if fn.params[i].is_constexpr:
            sig[name], consts[(i,)] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[name], attrs[(i,)] = "*" + TRITON_DTYPES[v.dtype], [["tt.divisibility", 16]]
        elif isinstance(v, TensorDescriptor):  # e.g. "tensordesc<bf16[1, 128, 64]>", as the JIT names it
            sig[name] = mangle_type(v)
        elif isinstance(v, float):
            sig[name] = "fp32"
        elif isinstance(v, bool) or v == 1:
            sig[name], consts[(i,)] = "constexpr", v
        else:
            sig[name] = "i32" if abs(v) < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs, options


def resources(kernel, arch: int) -> dict:
    """Registers and stack from the cubin (cuobjdump), shared memory and pipelining from triton."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    try:
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    finally:
        os.unlink(f.name)
    fields = dict(item.split(":", 1) for line in usage.splitlines() if "REG:" in line
                  for item in line.split() if ":" in item)
    regs, stack, smem = int(fields["REG"]), int(fields["STACK"]), kernel.metadata.shared
    threads = 32 * kernel.metadata.num_warps
    lim = SM_LIMITS[arch]
    blocks = min(lim["regs"] // (((regs + 7) // 8 * 8) * threads), lim["threads"] // threads,
                 lim["smem"] // smem if smem else 32)
    # A pipelined operand is copied asynchronously (cp.async or TMA) once per stage: num_stages - 1
    # copies before the loop and one inside it.
    ir = kernel.asm["ttgir"]
    copies = ir.count("ttg.async_copy_global_to_local ") + ir.count("ttng.async_tma_copy_global_to_local ")
    return dict(regs=regs, stack_bytes=stack, shared_bytes=smem, blocks_per_sm=blocks,
                async_operands=copies // max(kernel.metadata.num_stages, 1))


def describe(fn, kwargs: dict) -> str:
    flags = [k.lower() for k, v in kwargs.items() if k.startswith(("HAS_", "FUSE_", "TMA_")) and v is True]
    tiles = "x".join(str(kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK") if k in kwargs)
    return f"{fn.__name__} [{tiles}, {kwargs.get('num_warps')}w/{kwargs.get('num_stages', '-')}s] {' '.join(flags)}"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--arch", type=int, choices=sorted(SM_LIMITS), default=90)
    ap.add_argument("--tile", metavar="BLOCK_N,BLOCK_K,WARPS,STAGES[,tma]",
                    help="compile every projection with this 16-bit tile instead of TritonGrouped's defaults")
    ap.add_argument("--block-m", type=int, help="with --tile: the row tile")
    args = ap.parse_args(argv)
    if args.block_m and not args.tile:
        ap.error("--block-m needs --tile")
    if args.tile:
        *nums, last = args.tile.split(",")
        tma = last == "tma"
        tile = tm.GemmConfig(*map(int, nums if tma else [*nums, last]), tma=tma)
        tm.TritonGrouped.WIDE = {**tm.TritonGrouped.WIDE, "16bit": tm.every_kind(tile)}
        if args.block_m:
            tm.TritonGrouped.BLOCK_M = {**tm.TritonGrouped.BLOCK_M, "16bit": args.block_m}

    calls: list = []
    kernels = ("_gmm_kernel", "_gouter_kernel", "_glu_fwd_kernel", "_glu_bwd_kernel")
    saved = {name: getattr(tm, name) for name in kernels}
    for name in kernels:
        setattr(tm, name, Recorder(saved[name], calls))
    try:
        model = moe_layer(GPU_SHAPES, "meta", torch.bfloat16)
        enable_fused_moe_lora(model, "triton")
        x = torch.empty(1, args.tokens, GPU_SHAPES["hidden"], device="meta", dtype=torch.bfloat16,
                        requires_grad=True)
        model(x).backward(torch.empty_like(x))
    finally:
        for name in kernels:
            setattr(tm, name, saved[name])

    target = GPUTarget("cuda", args.arch, 32)
    print(f"triton {triton.__version__} | target sm_{args.arch} | {len(calls)} launches in one fused "
          f"fwd+bwd at {args.tokens} tokens", flush=True)
    rows, seen = [], set()
    for fn, a, kw in calls:
        sig, consts, attrs, options = specialize(fn, a, kw)
        key = (fn.__name__, tuple(sorted(sig.items())), tuple(sorted(consts.items())), tuple(sorted(options.items())))
        if key in seen:
            continue
        seen.add(key)
        kernel = triton.compile(ASTSource(fn, sig, consts, attrs), target=target, options=options)
        r = dict(kernel=describe(fn, kw), **resources(kernel, args.arch))
        rows.append(r)
        print(f"{r['kernel']:70s} regs {r['regs']:3d}  stack {r['stack_bytes']:4d} B  shared "
              f"{r['shared_bytes'] / 1024:6.1f} KiB  {r['blocks_per_sm']} blocks/SM  "
              f"{r['async_operands']} operands async", flush=True)
    result = dict(triton=triton.__version__, arch=args.arch, tokens=args.tokens, launches=len(calls),
                  kernels=rows, spills=any(r["stack_bytes"] for r in rows))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
